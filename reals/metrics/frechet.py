"""Frechet distance between Gaussians fitted to activations (FID, sFID, FD in any feature space).

Matches the ADM evaluator / pytorch-fid / TTUR definition: ``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrtm(S1 S2))``
with the product's matrix square root from ``scipy.linalg.sqrtm`` and an ``eps`` diagonal offset when
the product is singular.
"""
from __future__ import annotations

import warnings

import numpy as np
from scipy import linalg

from reals import ReaLSError


def activation_statistics(acts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of activations ``[N, D]``, in float64 as the ADM evaluator keeps them."""
    acts = np.asarray(acts, dtype=np.float64)
    if acts.ndim != 2 or len(acts) < 2:
        raise ReaLSError(f"activation statistics need at least 2 rows of [N, D] activations, got shape {acts.shape}")
    return acts.mean(axis=0), np.cov(acts, rowvar=False)


def _sqrtm(a: np.ndarray) -> np.ndarray:
    """``scipy.linalg.sqrtm`` without its conditioning chatter (the ADM evaluator calls it with ``disp=False``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        return linalg.sqrtm(a)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise ReaLSError(f"Frechet distance: statistics disagree in shape: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    covmean = _sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        warnings.warn(f"Frechet distance: singular covariance product; adding {eps} to the diagonals", stacklevel=2)
        offset = np.eye(len(mu1)) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ReaLSError(f"Frechet distance: matrix square root has an imaginary component "
                             f"{np.abs(covmean.imag).max():.3g}; use more samples than feature dimensions")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def frechet_distance_from_activations(acts1: np.ndarray, acts2: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two activation sets ``[N1, D]`` and ``[N2, D]``.

    With fewer rows than dimensions (``N1 + N2 <= D``) both fitted Gaussians live in the span of the
    centred rows, so the distance is computed exactly in that subspace (an orthonormal basis from a QR
    factorisation) instead of through a ``D x D`` matrix square root: same value, seconds saved.
    """
    a1, a2 = np.asarray(acts1, np.float64), np.asarray(acts2, np.float64)
    if a1.ndim != 2 or a2.ndim != 2 or a1.shape[1] != a2.shape[1]:
        raise ReaLSError(f"Frechet distance: activations disagree in shape: {a1.shape} vs {a2.shape}")
    if len(a1) + len(a2) <= a1.shape[1]:
        rows = np.concatenate([a1, a2])
        centre = rows.mean(axis=0)
        basis, _ = np.linalg.qr((rows - centre).T)
        a1, a2 = (a1 - centre) @ basis, (a2 - centre) @ basis
    return frechet_distance(*activation_statistics(a1), *activation_statistics(a2))
