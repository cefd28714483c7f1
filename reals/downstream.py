"""Training-free downstream tasks: linear segmentation and depth heads in teacher-feature space.

A head is a per-patch linear map on patch features ``[B, D, h, w]`` (optionally concatenated with the
global token broadcast over the grid), whose output is upsampled bilinearly to pixels. Because the map
is per patch, a head fitted on a teacher's patch grid applies unchanged to any other grid, in particular
to ``ReaLSVAE.semantic_features`` of latents (real or generated): no decoding, no training.

The alignment loss matches directions (cosine), not norms, so a head that is to read the alignment
network's predictions reads tokens rescaled to a fixed norm (``token_norm``: each position's vector is
L2-normalised and multiplied by it; ``global_norm`` likewise for the global token). Fitted teacher heads
use unit norm; published heads use the teacher's mean token norms (calibrated on images); ``None`` reads
raw features (the baseline's latents).

Heads come from two sources:

- a closed-form ridge fit (``HeadFitter``) on patch features of labelled images, with the targets
  (one-hot class maps for segmentation, depth maps for depth) area-averaged onto the feature grid;
- DINOv2's published 1-layer linear heads (``load_dinov2_head``): segmentation
  ``dinov2_vit{s,b,l,g}14_{voc2012,ade20k}_linear_head.pth`` (an mmseg checkpoint: ``decode_head.bn`` +
  ``decode_head.conv_seg`` on the final-norm patch tokens) and depth
  ``dinov2_vit{s,b,l,g}14_{nyu,kitti}_linear_head.pth`` (``decode_head.conv_depth`` on patch tokens
  concatenated with the CLS token, 256 bins between 0.001 and 10 m (NYU) or 80 m (KITTI)). A head must
  read the width of the teacher it is used with (e.g. ``dinov2_vitb14_*`` heads need teacher
  ``dinov2_vitb14``, 768-d). The teachers here give final-layernorm tokens; DINOv2's depth heads were
  trained on un-normalised last-layer tokens, so their depths are an approximation.

Metrics: mIoU (over classes present in prediction or truth, background included) and pixel accuracy
for segmentation; RMSE and ``delta < 1.25`` (share of pixels with ``max(pred/gt, gt/pred) < 1.25``) for
depth. Depth maps must be positive: pixels whose truth is <= 0 are ignored, predictions are clamped to
``MIN_DEPTH`` before ratios are taken.
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from reals import ReaLSError

MIN_DEPTH = 1e-3
DINOV2_DEPTH_RANGE = {"nyu": (1e-3, 10.0), "kitti": (1e-3, 80.0)}
DINOV2_BIN_EPS = 0.1  # AdaBins-style "linear" bin normalisation used by DINOv2's depth heads


#################################################################################
#                               Ridge Regression                                #
#################################################################################

class RidgeAccumulator:
    """Streaming sufficient statistics of the ridge regression ``y = x W^T + b`` (float64).

    ``solve(alpha)`` returns the closed form on centred data, so the bias is not penalised::

        W^T = (Xc^T Xc + lam I)^-1 Xc^T Yc,   b = mean(y) - mean(x) W^T,   lam = alpha * trace(Xc^T Xc) / D
    """

    def __init__(self, in_dim: int, out_dim: int):
        self.in_dim, self.out_dim = in_dim, out_dim
        self.n = 0
        self.sum_x = torch.zeros(in_dim, dtype=torch.float64)
        self.sum_y = torch.zeros(out_dim, dtype=torch.float64)
        self.xx = torch.zeros(in_dim, in_dim, dtype=torch.float64)
        self.xy = torch.zeros(in_dim, out_dim, dtype=torch.float64)

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add rows ``x [N, D]`` with targets ``y [N, K]``."""
        if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0] or x.shape[1] != self.in_dim \
                or y.shape[1] != self.out_dim:
            raise ReaLSError(f"ridge: expected x [N, {self.in_dim}] and y [N, {self.out_dim}], "
                             f"got {tuple(x.shape)} and {tuple(y.shape)}")
        x, y = x.detach().double().cpu(), y.detach().double().cpu()
        self.n += x.shape[0]
        self.sum_x += x.sum(0)
        self.sum_y += y.sum(0)
        self.xx += x.T @ x
        self.xy += x.T @ y

    def solve(self, alpha: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weight [K, D], bias [K])`` in float32."""
        if self.n < 2:
            raise ReaLSError(f"ridge: need at least 2 samples to fit, got {self.n}")
        mean_x, mean_y = self.sum_x / self.n, self.sum_y / self.n
        cxx = self.xx - self.n * torch.outer(mean_x, mean_x)
        cxy = self.xy - self.n * torch.outer(mean_x, mean_y)
        lam = alpha * max(float(torch.trace(cxx)) / self.in_dim, 1e-12)
        weight_t = torch.linalg.solve(cxx + lam * torch.eye(self.in_dim, dtype=torch.float64), cxy)
        bias = mean_y - mean_x @ weight_t
        return weight_t.T.float().contiguous(), bias.float()


def ridge_fit(x: torch.Tensor, y: torch.Tensor, alpha: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form ridge regression of ``y [N, K]`` on ``x [N, D]``: ``(weight [K, D], bias [K])``."""
    acc = RidgeAccumulator(x.shape[-1], y.shape[-1])
    acc.update(x, y)
    return acc.solve(alpha)


def grid_rows(features: torch.Tensor) -> torch.Tensor:
    """Feature maps ``[B, D, h, w]`` -> one row per position ``[B*h*w, D]``."""
    return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])


def area_downsample(targets: torch.Tensor, grid) -> torch.Tensor:
    """Pixel targets ``[B, K, H, W]`` averaged over the area of each cell of ``grid`` (h, w)."""
    return F.adaptive_avg_pool2d(targets.float(), tuple(grid))


#################################################################################
#                                  Linear Heads                                 #
#################################################################################

def rescale_tokens(features: torch.Tensor, norm: float | None) -> torch.Tensor:
    """Every token (dim 1) L2-normalised and scaled to ``norm``; unchanged when ``norm`` is None."""
    return features if norm is None else F.normalize(features, dim=1) * norm


class LinearHead(nn.Module):
    """A per-patch linear map (1x1 convolution) on ``width``-d features, upsampled to pixels."""

    task = ""

    def __init__(self, width: int, out_dim: int, with_global: bool = False, source: str = "",
                 token_norm: float | None = None, global_norm: float | None = None):
        super().__init__()
        self.width = width
        self.with_global = with_global
        self.source = source
        self.token_norm = token_norm
        self.global_norm = global_norm
        in_dim = 2 * width if with_global else width
        self.proj = nn.Conv2d(in_dim, out_dim, kernel_size=1)

    def set_linear(self, weight: torch.Tensor, bias: torch.Tensor) -> LinearHead:
        """Load ``weight [K, in]`` and ``bias [K]`` into the projection."""
        with torch.no_grad():
            self.proj.weight.copy_(weight.reshape(self.proj.weight.shape))
            self.proj.bias.copy_(bias)
        return self

    def check_width(self, width: int, what: str) -> None:
        """Raise ReaLSError unless features of ``what`` have this head's width."""
        if width != self.width:
            raise ReaLSError(f"{self.task} head ({self.source}) reads {self.width}-d features, but {what} "
                             f"gives {width}-d")

    def project(self, patch: torch.Tensor, global_token: torch.Tensor | None = None,
                size: tuple[int, int] | None = None) -> torch.Tensor:
        """The linear output at every patch, bilinearly upsampled to ``size`` (kept on the grid if None)."""
        if patch.ndim != 4:
            raise ReaLSError(f"{self.task} head: expected patch features [B, D, h, w], got {tuple(patch.shape)}")
        self.check_width(patch.shape[1], "the input")
        x = rescale_tokens(patch.to(self.proj.weight), self.token_norm)
        if self.with_global:
            if global_token is None:
                raise ReaLSError(f"{self.task} head ({self.source}) needs the global token as well")
            g = rescale_tokens(global_token.to(x), self.global_norm)[:, :, None, None].expand(-1, -1, *x.shape[-2:])
            x = torch.cat([x, g], dim=1)
        out = self.proj(x)
        if size is not None and tuple(out.shape[-2:]) != tuple(size):
            out = F.interpolate(out, size=tuple(size), mode="bilinear", align_corners=False)
        return out


class SegmentationHead(LinearHead):
    """Per-patch linear classifier: class logits upsampled bilinearly, argmax per pixel."""

    task = "seg"

    def __init__(self, width: int, num_classes: int, with_global: bool = False, source: str = "",
                 token_norm: float | None = None, global_norm: float | None = None):
        super().__init__(width, num_classes, with_global, source, token_norm, global_norm)
        self.num_classes = num_classes

    def forward(self, patch, global_token=None, size=None) -> torch.Tensor:
        """Class logits ``[B, K, H, W]``."""
        return self.project(patch, global_token, size)

    @torch.no_grad()
    def predict(self, patch, global_token=None, size=None) -> torch.Tensor:
        """Class index per pixel ``[B, H, W]`` (int64)."""
        return self(patch, global_token, size).argmax(dim=1)


class DepthHead(LinearHead):
    """Per-patch linear depth regression (or DINOv2's classification over depth bins), upsampled."""

    task = "depth"

    def __init__(self, width: int, with_global: bool = False, source: str = "", bins: torch.Tensor | None = None,
                 token_norm: float | None = None, global_norm: float | None = None):
        super().__init__(width, 1 if bins is None else len(bins), with_global, source, token_norm, global_norm)
        self.register_buffer("bins", None if bins is None else torch.as_tensor(bins, dtype=torch.float32))

    def forward(self, patch, global_token=None, size=None) -> torch.Tensor:
        """Depth ``[B, 1, H, W]``: the regression, or the bin centres weighted by normalised relu(logits)."""
        out = self.project(patch, global_token, size)
        if self.bins is None:
            return out
        weights = F.relu(out) + DINOV2_BIN_EPS
        weights = weights / weights.sum(dim=1, keepdim=True)
        return torch.einsum("bkhw,k->bhw", weights, self.bins.to(weights))[:, None]

    @torch.no_grad()
    def predict(self, patch, global_token=None, size=None) -> torch.Tensor:
        """Depth per pixel ``[B, H, W]`` (float32)."""
        return self(patch, global_token, size)[:, 0].float()


HEADS: dict[str, type[LinearHead]] = {"seg": SegmentationHead, "depth": DepthHead}


#################################################################################
#                                 Fitting Heads                                 #
#################################################################################

class HeadFitter:
    """Ridge fit of a head on (patch features, pixel targets) pairs, streamed batch by batch.

    Targets: class index maps ``[B, H, W]`` (int, one-hot encoded) for ``seg``, depth maps ``[B, H, W]``
    (float) for ``depth``; both are area-averaged onto the feature grid before the fit. Features are
    rescaled to ``token_norm`` first (see the module docstring), and so are those the head reads later.
    """

    def __init__(self, task: str, width: int, num_classes: int | None = None, source: str = "",
                 token_norm: float | None = None):
        if task not in HEADS:
            raise ReaLSError(f"unknown downstream task {task!r}; choose one of {', '.join(HEADS)}")
        if task == "seg" and (num_classes is None or num_classes < 2):
            raise ReaLSError(f"segmentation head needs num_classes >= 2, got {num_classes}")
        self.task, self.width, self.num_classes, self.source = task, width, num_classes, source
        self.token_norm = token_norm
        self.acc = RidgeAccumulator(width, num_classes if task == "seg" else 1)
        self.images = 0

    def grid_targets(self, targets: torch.Tensor, grid) -> torch.Tensor:
        """Pixel targets ``[B, H, W]`` -> area-averaged targets ``[B, K, h, w]``."""
        if self.task == "seg":
            maps = F.one_hot(targets.long(), self.num_classes).permute(0, 3, 1, 2)
        else:
            maps = targets[:, None]
        return area_downsample(maps, grid)

    def update(self, patch: torch.Tensor, targets: torch.Tensor) -> None:
        """Add a batch: patch features ``[B, D, h, w]`` and pixel targets ``[B, H, W]``."""
        if patch.ndim != 4 or targets.ndim != 3 or patch.shape[0] != targets.shape[0]:
            raise ReaLSError(f"{self.task} fit: expected features [B, D, h, w] and targets [B, H, W], "
                             f"got {tuple(patch.shape)} and {tuple(targets.shape)}")
        if patch.shape[1] != self.width:
            raise ReaLSError(f"{self.task} fit ({self.source}): expected {self.width}-d features, "
                             f"got {patch.shape[1]}-d")
        if self.task == "seg" and int(targets.max()) >= self.num_classes:
            raise ReaLSError(f"segmentation fit: class {int(targets.max())} in the targets, but the head has "
                             f"{self.num_classes} classes")
        grid = self.grid_targets(targets.to(patch.device), patch.shape[-2:])
        self.acc.update(grid_rows(rescale_tokens(patch.float(), self.token_norm)), grid_rows(grid))
        self.images += patch.shape[0]

    def solve(self, alpha: float = 1e-3) -> LinearHead:
        """The fitted head (CPU, eval mode)."""
        weight, bias = self.acc.solve(alpha)
        source = f"ridge on {self.source} ({self.images} images, alpha {alpha:g})"
        if self.task == "seg":
            head = SegmentationHead(self.width, self.num_classes, source=source, token_norm=self.token_norm)
        else:
            head = DepthHead(self.width, source=source, token_norm=self.token_norm)
        return head.set_linear(weight, bias).eval()


#################################################################################
#                           DINOv2 Published Heads                              #
#################################################################################

def _head_state(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a head checkpoint, unwrapped from ``state_dict`` and stripped of ``decode_head.``."""
    if not os.path.isfile(path):
        raise ReaLSError(f"head file not found: {path} (expected a DINOv2 linear head .pth, e.g. "
                         "dinov2_vitb14_voc2012_linear_head.pth)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise ReaLSError(f"head {path}: not a weights-only torch checkpoint ({type(e).__name__}); if it holds "
                         "non-tensor metadata, re-save just its state_dict with torch.save") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ReaLSError(f"head {path}: expected a state_dict, got {type(state).__name__}")
    return {k.removeprefix("module.").removeprefix("decode_head."): v for k, v in state.items()
            if isinstance(v, torch.Tensor)}


def _fold_batchnorm(weight: torch.Tensor, bias: torch.Tensor, state: dict, eps: float = 1e-5):
    """Fold an eval-mode BatchNorm before the linear map into the map's weight and bias."""
    scale = state["bn.weight"] / torch.sqrt(state["bn.running_var"] + eps)
    shift = state["bn.bias"] - state["bn.running_mean"] * scale
    return weight * scale[None], bias + weight @ shift


def _input_layout(path: str, in_dim: int, teacher_name: str, teacher_width: int) -> bool:
    """Whether the head reads patch tokens plus the CLS token (``2D``) or patch tokens only (``D``)."""
    if in_dim == teacher_width:
        return False
    if in_dim == 2 * teacher_width:
        return True
    raise ReaLSError(f"head {os.path.basename(path)} reads {in_dim}-d features, but teacher {teacher_name} gives "
                     f"{teacher_width}-d patch tokens ({teacher_width} or {2 * teacher_width} with the CLS token "
                     "would fit); use the head of the same DINOv2 size (e.g. dinov2_vitb14_* heads with teacher "
                     "dinov2_vitb14), and a 1-layer *_linear_head.pth (not linear4/ms)")


def load_dinov2_head(path: str, task: str, teacher_name: str, teacher_width: int, token_norm: float | None = None,
                     global_norm: float | None = None) -> LinearHead:
    """A DINOv2 published 1-layer linear head (see the module docstring) for a teacher of ``teacher_width``.

    ``token_norm`` / ``global_norm``: the teacher's mean patch / CLS token norms, so that the head can also
    read the alignment network's predictions (None: raw features, the teacher only).
    """
    state = _head_state(path)
    name = os.path.basename(path)
    key = {"seg": "conv_seg", "depth": "conv_depth"}.get(task)
    if key is None:
        raise ReaLSError(f"unknown downstream task {task!r}; choose one of {', '.join(HEADS)}")
    if f"{key}.weight" not in state or f"{key}.bias" not in state:
        found = ", ".join(sorted(state)[:6]) or "nothing"
        raise ReaLSError(f"head {name}: no {key}.weight/{key}.bias (found {found}); a {task} head is e.g. "
                         + ("dinov2_vitb14_voc2012_linear_head.pth" if task == "seg"
                            else "dinov2_vitb14_nyu_linear_head.pth"))
    weight = state[f"{key}.weight"].float()
    weight = weight.reshape(weight.shape[0], -1)
    bias = state[f"{key}.bias"].float()
    with_global = _input_layout(path, weight.shape[1], teacher_name, teacher_width)
    if all(f"bn.{s}" in state for s in ("weight", "bias", "running_mean", "running_var")):
        weight, bias = _fold_batchnorm(weight, bias, {k: v.float() for k, v in state.items()})
    source = f"DINOv2 {name}"
    if task == "seg":
        head = SegmentationHead(teacher_width, weight.shape[0], with_global, source, token_norm, global_norm)
    else:
        dataset = next((d for d in DINOV2_DEPTH_RANGE if re.search(rf"_{d}_", name)), "nyu")
        lo, hi = DINOV2_DEPTH_RANGE[dataset]
        bins = torch.linspace(lo, hi, weight.shape[0]) if weight.shape[0] > 1 else None
        head = DepthHead(teacher_width, with_global, source, bins, token_norm, global_norm)
    return head.set_linear(weight, bias).eval()


#################################################################################
#                        Heads on Teachers and Latents                          #
#################################################################################

@torch.no_grad()
def predict_from_latents(vae, head: LinearHead, z_norm: torch.Tensor, size=None) -> torch.Tensor:
    """Training-free prediction from normalised latents: ``semantic_features`` -> head (no decoding)."""
    patch, global_token = vae.semantic_features(z_norm)
    head.check_width(patch.shape[1], "the VAE's alignment network")
    return head.predict(patch, global_token, size)


@torch.no_grad()
def predict_from_teacher(teacher: Callable, head: LinearHead, images: torch.Tensor, size=None) -> torch.Tensor:
    """Prediction from a teacher's own features of images in [0, 1] (the upper bound)."""
    patch, global_token = teacher(images)
    head.check_width(patch.shape[1], f"teacher {getattr(teacher, 'name', '?')}")
    return head.predict(patch, global_token, size)


#################################################################################
#                                    Metrics                                    #
#################################################################################

class SegmentationMeter:
    """Confusion matrix over a dataset -> mIoU and pixel accuracy."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add class maps of equal shape (rows of the confusion matrix: truth)."""
        if pred.shape != target.shape:
            raise ReaLSError(f"segmentation metric: prediction {tuple(pred.shape)} and truth "
                             f"{tuple(target.shape)} differ")
        p, t = pred.reshape(-1).long().cpu(), target.reshape(-1).long().cpu()
        k = self.num_classes
        if len(t) and (int(t.max()) >= k or int(p.max()) >= k or int(t.min()) < 0 or int(p.min()) < 0):
            raise ReaLSError(f"segmentation metric: class indices must lie in [0, {k})")
        self.confusion += torch.bincount(t * k + p, minlength=k * k).reshape(k, k)

    def compute(self) -> dict:
        """``miou`` (classes present in truth or prediction), ``pixel_accuracy``, per-class ``iou`` (None: absent)."""
        c = self.confusion.double()
        tp = c.diag()
        union = c.sum(0) + c.sum(1) - tp
        present = union > 0
        iou = torch.where(present, tp / union.clamp(min=1), torch.nan)
        total = c.sum()
        return {"miou": float(iou[present].mean()) if bool(present.any()) else float("nan"),
                "pixel_accuracy": float(tp.sum() / total) if total > 0 else float("nan"),
                "iou": [None if torch.isnan(v) else float(v) for v in iou],
                "pixels": int(total)}


class DepthMeter:
    """RMSE and ``delta < 1.25`` over all valid pixels (truth > 0) of a dataset."""

    def __init__(self, threshold: float = 1.25):
        self.threshold = threshold
        self.sq_err = 0.0
        self.within = 0
        self.count = 0

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add depth maps of equal shape; predictions are clamped to ``MIN_DEPTH``."""
        if pred.shape != target.shape:
            raise ReaLSError(f"depth metric: prediction {tuple(pred.shape)} and truth {tuple(target.shape)} differ")
        p, t = pred.double().cpu().reshape(-1), target.double().cpu().reshape(-1)
        valid = t > 0
        p, t = p[valid].clamp(min=MIN_DEPTH), t[valid]
        self.sq_err += float(((p - t) ** 2).sum())
        self.within += int((torch.maximum(p / t, t / p) < self.threshold).sum())
        self.count += int(valid.sum())

    def compute(self) -> dict:
        """``rmse``, ``delta1`` (share with ``max(p/t, t/p) < 1.25``) and the pixel count."""
        if not self.count:
            return {"rmse": float("nan"), "delta1": float("nan"), "pixels": 0}
        return {"rmse": (self.sq_err / self.count) ** 0.5, "delta1": self.within / self.count, "pixels": self.count}


METERS = {"seg": SegmentationMeter, "depth": DepthMeter}


class LatentFeatures:
    """A VAE's latents as plain features: a ReaLS dir gives normalised posterior means, a plain one raw means."""

    def __init__(self, path: str, device: torch.device, reals_vae=None):
        from reals.vae import ReaLSVAE, build_vae

        self.path = path
        if reals_vae is not None:
            self.vae, self.kind = reals_vae, "reals"
        elif os.path.isfile(os.path.join(path, "align_net.json")):
            self.vae, self.kind = ReaLSVAE.from_pretrained(path).to(device).eval(), "reals"
        else:
            self.vae, self.kind = build_vae(ckpt=path).to(device).eval(), "plain"

    @property
    def channels(self) -> int:
        return self.vae.latent_channels if self.kind == "reals" else self.vae.config.latent_channels

    @property
    def fingerprint(self) -> str:
        if self.kind == "reals":
            return self.vae.fingerprint
        from reals.vae import weights_fingerprint

        c = self.channels
        return weights_fingerprint({"vae": self.vae}, torch.zeros(c), torch.ones(c))

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> latents ``[B, C, h, w]``."""
        if self.kind == "reals":
            return self.vae.normalize(self.vae.encode(images)[0])
        return self.vae.encode(images).latent_dist.mean
