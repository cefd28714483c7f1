"""The domain evaluator: a small CNN classifier of the dataset's own classes, independent of any teacher.

Its penultimate activations (global average pool of the last stage, ``width * 2**(stages-1)``-d) are the
``domain`` feature space, as MNIST-style FIDs use a classifier trained on the domain: a Frechet distance
there is ``FD_domain``, never FID. Its logits give the conditional accuracy of class-conditional samples:
the share of samples the evaluator assigns to the class they were conditioned on.

A saved evaluator is a folder with ``evaluator.safetensors`` (weights) and ``evaluator.json`` (the constructor
arguments and how it was trained, held-out accuracy included); the json is written last.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from reals import ReaLSError
from reals.metrics.features import FeatureExtractor
from reals.metrics.suite import space_metrics
from reals.pretrained import PretrainedMixin, register_to_config


#################################################################################
#                                   The Model                                   #
#################################################################################

class ConvStage(nn.Module):
    """Two 3x3 convolutions with batch norm and SiLU; the first halves the resolution."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.SiLU(),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.SiLU(),
        )

    def forward(self, x):
        return self.body(x)


class DomainClassifier(nn.Module, PretrainedMixin):
    """Images in [0, 1] at ``resolution`` px -> (penultimate features [B, D], logits [B, num_classes])."""

    config_name = "evaluator.json"
    weights_name = "evaluator.safetensors"

    @register_to_config
    def __init__(self, num_classes: int, resolution: int = 32, width: int = 32, stages: int = 3,
                 dropout: float = 0.1):
        super().__init__()
        if num_classes < 2:
            raise ReaLSError(f"domain evaluator: needs at least 2 classes, got {num_classes}")
        self.resolution = resolution
        widths = [width * 2 ** i for i in range(stages)]
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.SiLU())
        self.stages = nn.Sequential(*[ConvStage(c_in, c_out) for c_in, c_out in zip([width] + widths, widths)])
        self.feature_dim = widths[-1]
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(self.feature_dim, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate activations [B, D] of images [B, 3, H, W] in [0, 1] (resized to ``resolution``)."""
        if images.shape[-2:] != (self.resolution, self.resolution):
            images = F.interpolate(images, size=(self.resolution, self.resolution), mode="bilinear",
                                   align_corners=False, antialias=True)
        h = self.stages(self.stem(images * 2 - 1))
        return h.mean(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.features(images)
        return feats, self.head(self.dropout(feats))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> DomainClassifier:
        """A saved evaluator in eval mode; ``saved_extra`` holds how it was trained."""
        if not all((Path(path) / name).is_file() for name in (cls.config_name, cls.weights_name)):
            raise ReaLSError(f"{path} is not a domain evaluator (needs {cls.config_name} and {cls.weights_name}); "
                             "train one with `reals train-evaluator`")
        return super().from_pretrained(path).eval()


#################################################################################
#                            Feature Space and Metrics                          #
#################################################################################

class DomainFeatures(FeatureExtractor):
    """The ``domain`` space: the evaluator's penultimate features (``global``) and its ``logits``."""

    space = "domain"
    outputs = ("global", "logits")

    def __init__(self, evaluator: DomainClassifier | str | Path, device: str | torch.device = "cpu"):
        super().__init__(device)
        if not isinstance(evaluator, DomainClassifier):
            self.weights = str(evaluator)
            evaluator = DomainClassifier.from_pretrained(evaluator)
        else:
            self.weights = "in memory"
        self.model = evaluator.eval().to(self.device)
        c = evaluator.config
        self.description = (f"domain classifier ({c['num_classes']} classes, {c['stages']} stages of width "
                            f"{c['width']}) at {c['resolution']}px; penultimate {evaluator.feature_dim}-d")

    def features(self, images):
        feats, logits = self.model(images)
        return {"global": feats, "logits": logits}


def extract(extractor: FeatureExtractor, images: np.ndarray, batch_size: int = 256) -> dict[str, np.ndarray]:
    """Activations of uint8 NHWC ``images`` in batches: ``{name: [N, D]}``."""
    parts = [extractor(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
    return {k: np.concatenate([p[k] for p in parts]) for k in extractor.outputs}


def conditional_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Share of samples whose arg-max class is the class they were conditioned on."""
    logits, labels = np.asarray(logits), np.asarray(labels)
    if len(logits) != len(labels) or len(labels) == 0:
        raise ReaLSError(f"conditional accuracy: {len(logits)} logits for {len(labels)} labels")
    return float((logits.argmax(axis=1) == labels).mean())


def domain_metrics(extractor: DomainFeatures, reference: np.ndarray, samples: np.ndarray,
                   labels: np.ndarray | None = None, k: int = 3, batch_size: int = 256) -> dict[str, float]:
    """``FD_domain``, ``Precision_domain``, ``Recall_domain`` (k-NN) and, given labels, ``cond_accuracy``."""
    ref, smp = extract(extractor, reference, batch_size), extract(extractor, samples, batch_size)
    out = {r["metric"]: float(r["value"])
           for r in space_metrics("domain", {"global": ref["global"]}, {"global": smp["global"]}, k=k)}
    if labels is not None:
        out["cond_accuracy"] = conditional_accuracy(smp["logits"], labels)
    return out
