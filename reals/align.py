"""Alignment network of ReaLS and its loss: VAE latents -> the teacher's patch and global features.

``MLP_patch`` maps every latent position (1x1 convolutions over channels) to the teacher's width;
``MLP_cls`` maps the average of those patch predictions to the teacher's global token. Pooling the
predicted patch features, not the raw latent, gives the global head a teacher-width summary instead of
a handful of channel means (the ReaLS repo ships no alignment code; the paper describes the two MLP heads).

Grid rule (``check_compatible``): the teacher's patch grid must have the latent grid's aspect ratio, and
is mapped onto the latent grid by adaptive average pooling when it is at least as large (any factor), or
by bilinear upsampling when it is smaller, which must then divide the latent grid exactly (so every
teacher patch covers a whole block of latent positions).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from reals import ReaLSError
from reals.pretrained import PretrainedMixin, register_to_config


#################################################################################
#                                Alignment Heads                                #
#################################################################################

def _mlp(layer, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> nn.Sequential:
    """``num_layers`` layers ``in -> hidden -> ... -> out`` with SiLU between them."""
    dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
    layers = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        if i:
            layers.append(nn.SiLU())
        layers.append(layer(a, b))
    return nn.Sequential(*layers)


def _conv1x1(a: int, b: int) -> nn.Conv2d:
    return nn.Conv2d(a, b, kernel_size=1)


class AlignNet(nn.Module, PretrainedMixin):
    """MLP_patch at every latent position and MLP_cls on the pooled patch predictions; saved as
    ``align_net.json`` + ``align_net.safetensors``."""

    config_name = "align_net.json"
    weights_name = "align_net.safetensors"

    @register_to_config
    def __init__(self, latent_channels: int, teacher_width: int, hidden_dim: int = 1024, num_layers: int = 3):
        super().__init__()
        if min(latent_channels, teacher_width, hidden_dim, num_layers) < 1:
            raise ReaLSError(f"AlignNet: sizes must be positive, got latent_channels={latent_channels}, "
                             f"teacher_width={teacher_width}, hidden_dim={hidden_dim}, num_layers={num_layers}")
        self.latent_channels = latent_channels
        self.teacher_width = teacher_width
        self.hidden_dim = hidden_dim
        self.num_layers = num_layers
        self.mlp_patch = _mlp(_conv1x1, latent_channels, hidden_dim, teacher_width, num_layers)
        self.mlp_cls = _mlp(nn.Linear, teacher_width, hidden_dim, teacher_width, num_layers)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents ``[B, C, h, w]`` -> (patch features ``[B, D, h, w]``, global feature ``[B, D]``)."""
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise ReaLSError(f"AlignNet: expected latents [B, {self.latent_channels}, h, w], got {tuple(z.shape)}")
        patch = self.mlp_patch(z)
        return patch, self.mlp_cls(patch.mean(dim=(2, 3)))


#################################################################################
#                             Grids and the Loss                                #
#################################################################################

def _pair(grid) -> tuple[int, int]:
    return (int(grid), int(grid)) if isinstance(grid, int) else (int(grid[0]), int(grid[1]))


def check_compatible(latent_grid, teacher_grid) -> None:
    """Raise ReaLSError unless the teacher's patch grid can be mapped onto the latent grid (module rule)."""
    (lh, lw), (gh, gw) = _pair(latent_grid), _pair(teacher_grid)
    if min(lh, lw, gh, gw) < 1:
        raise ReaLSError(f"alignment: grids must be positive, got latent {lh}x{lw}, teacher {gh}x{gw}")
    if lh * gw != lw * gh:
        raise ReaLSError(f"alignment: teacher grid {gh}x{gw} and latent grid {lh}x{lw} differ in aspect ratio; "
                         "give the teacher an input of the images' aspect ratio")
    if gh < lh and lh % gh:
        raise ReaLSError(f"alignment: teacher grid {gh}x{gw} is smaller than the latent grid {lh}x{lw} by a "
                         f"non-integer factor {lh / gh:.3g}; change the teacher input size so that its grid is at "
                         f"least {lh}x{lw} or divides it (e.g. patch size x {lh})")


def teacher_to_latent_grid(teacher_patch: torch.Tensor, latent_grid) -> torch.Tensor:
    """Teacher patch features ``[B, D, gh, gw]`` resized to the latent grid (avg pool down, bilinear up)."""
    lh, lw = _pair(latent_grid)
    check_compatible((lh, lw), teacher_patch.shape[-2:])
    gh = teacher_patch.shape[-2]
    if gh == lh:
        return teacher_patch
    if gh > lh:
        return F.adaptive_avg_pool2d(teacher_patch, (lh, lw))
    return F.interpolate(teacher_patch, size=(lh, lw), mode="bilinear", align_corners=False)


def _cosine_matrix(x: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarities between the positions of ``[B, D, h, w]``: ``[B, hw, hw]``."""
    x = F.normalize(x.flatten(2), dim=1)
    return x.transpose(1, 2) @ x


def alignment_loss(pred_patch: torch.Tensor, pred_global: torch.Tensor, teacher_patch: torch.Tensor,
                   teacher_global: torch.Tensor, patch_weight: float = 1.0, global_weight: float = 1.0,
                   margin: float = 0.0, distmat_weight: float = 0.0, distmat_margin: float = 0.25) -> dict:
    """Cosine alignment of the heads' predictions to the (resized, detached) teacher features.

    ``patch_loss`` / ``global_loss``: mean ``relu(1 - margin - cos)`` (``1 - cos`` when ``margin`` is 0, VA-VAE's
    marginal cosine loss otherwise); ``distmat_loss``: VA-VAE's marginal distance-matrix similarity,
    mean ``relu(|cos(pred_i, pred_j) - cos(teacher_i, teacher_j)| - distmat_margin)`` over position pairs.
    ``loss = patch_weight * patch_loss + global_weight * global_loss + distmat_weight * distmat_loss``.
    """
    if pred_patch.ndim != 4 or teacher_patch.ndim != 4 or pred_patch.shape[:2] != teacher_patch.shape[:2]:
        raise ReaLSError(f"alignment: patch features disagree: predicted {tuple(pred_patch.shape)} vs teacher "
                         f"{tuple(teacher_patch.shape)} (expected [B, D, h, w] with the same B and D)")
    if pred_global.shape != teacher_global.shape or pred_global.shape != pred_patch.shape[:2]:
        raise ReaLSError(f"alignment: global features disagree: predicted {tuple(pred_global.shape)} vs teacher "
                         f"{tuple(teacher_global.shape)} (expected [B, {pred_patch.shape[1]}])")
    pred_patch, pred_global = pred_patch.float(), pred_global.float()
    target = teacher_to_latent_grid(teacher_patch.detach().float(), pred_patch.shape[-2:])
    target_global = teacher_global.detach().float()

    patch_cos = F.cosine_similarity(pred_patch, target, dim=1)
    global_cos = F.cosine_similarity(pred_global, target_global, dim=1)
    patch_loss = F.relu(1 - margin - patch_cos).mean()
    global_loss = F.relu(1 - margin - global_cos).mean()
    if distmat_weight:
        gap = (_cosine_matrix(pred_patch) - _cosine_matrix(target)).abs()
        distmat_loss = F.relu(gap - distmat_margin).mean()
    else:
        distmat_loss = pred_patch.new_zeros(())
    loss = patch_weight * patch_loss + global_weight * global_loss + distmat_weight * distmat_loss
    return {"loss": loss, "patch_loss": patch_loss.detach(), "global_loss": global_loss.detach(),
            "distmat_loss": distmat_loss.detach(), "patch_cos": patch_cos.mean().detach(),
            "global_cos": global_cos.mean().detach()}
