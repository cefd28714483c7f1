"""Improved Precision and Recall (Kynkaanniemi et al. 2019) with k-NN manifolds, as the ADM evaluator defines them.

A set's manifold is the union of balls around its points, each with radius the distance to the point's
k-th nearest neighbour in the same set (the point itself excluded). Precision is the fraction of samples
inside the reference manifold; recall the fraction of reference points inside the sample manifold.
Distances are computed in blocks (torch, float32) so memory stays ``batch_size x N``.
"""
from __future__ import annotations

import numpy as np
import torch

from reals import ReaLSError


def _as_tensor(feats: np.ndarray, device: str | torch.device) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(feats), dtype=torch.float32, device=device)
    if x.ndim != 2:
        raise ReaLSError(f"precision/recall: expected [N, D] features, got shape {tuple(x.shape)}")
    return x


def pairwise_sq_distances(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances ``[len(u), len(v)]``, clamped at 0 against round-off."""
    d = u.square().sum(1, keepdim=True) - 2.0 * (u @ v.T) + v.square().sum(1)[None, :]
    return d.clamp_min_(0.0)


def manifold_radii(feats, k: int = 3, batch_size: int = 2048, device: str | torch.device = "cpu") -> np.ndarray:
    """Squared distance from every point to its k-th nearest neighbour in the same set (self excluded)."""
    x = feats if isinstance(feats, torch.Tensor) else _as_tensor(feats, device)
    if len(x) <= k:
        raise ReaLSError(f"precision/recall with k={k} needs more than {k} points per set, got {len(x)}")
    radii = torch.empty(len(x), dtype=torch.float32, device=x.device)
    for start in range(0, len(x), batch_size):
        d = pairwise_sq_distances(x[start:start + batch_size], x)
        # the point itself sits at distance 0, so the k-th neighbour is the (k+1)-th smallest value
        radii[start:start + batch_size] = d.kthvalue(k + 1, dim=1).values
    return radii.cpu().numpy()


def precision_recall(real_feats, fake_feats, k: int = 3, batch_size: int = 2048,
                     device: str | torch.device = "cpu") -> tuple[float, float]:
    """``(precision, recall)`` of ``fake_feats`` against ``real_feats`` with k-NN manifolds."""
    real, fake = _as_tensor(real_feats, device), _as_tensor(fake_feats, device)
    if real.shape[1] != fake.shape[1]:
        raise ReaLSError(f"precision/recall: feature widths differ: {real.shape[1]} vs {fake.shape[1]}")
    r_real = torch.as_tensor(manifold_radii(real, k, batch_size), device=real.device)
    r_fake = torch.as_tensor(manifold_radii(fake, k, batch_size), device=real.device)
    real_in = torch.zeros(len(real), dtype=torch.bool, device=real.device)
    fake_in = torch.zeros(len(fake), dtype=torch.bool, device=real.device)
    for i in range(0, len(real), batch_size):
        for j in range(0, len(fake), batch_size):
            d = pairwise_sq_distances(real[i:i + batch_size], fake[j:j + batch_size])
            real_in[i:i + batch_size] |= (d <= r_fake[None, j:j + batch_size]).any(dim=1)
            fake_in[j:j + batch_size] |= (d <= r_real[i:i + batch_size, None]).any(dim=0)
    return float(fake_in.float().mean()), float(real_in.float().mean())
