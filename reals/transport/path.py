"""Interpolation paths between noise and data, and conversions between velocity, score and noise.

Time convention (SiT's): ``t`` in [0, 1], t=0 is pure noise ``x0 ~ N(0, I)`` and t=1 is data ``x1``.
A path is ``x_t = alpha_t * x1 + sigma_t * x0`` with velocity ``u_t = dalpha_t * x1 + dsigma_t * x0``:
- Linear (rectified flow / SiT's ICPlan): alpha_t = t, sigma_t = 1 - t.
- GVP (generalised variance preserving): alpha_t = sin(pi t / 2), sigma_t = cos(pi t / 2).
The conversions hold for the minimisers of the transport losses: the velocity ``v = E[u_t | x_t]``, the
noise ``eps = E[x0 | x_t]`` and the score ``s = grad log p_t(x_t) = -eps / sigma_t``.
"""
from __future__ import annotations

import math

import torch


def expand_t_like_x(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Times [B] (or a scalar) reshaped to broadcast against ``x`` [B, ...]."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.ndim == 0:
        return t
    return t.reshape(t.shape[0], *([1] * (x.ndim - 1)))


class Path:
    """An interpolant ``x_t = alpha_t x1 + sigma_t x0``; subclasses give ``alpha`` and ``sigma``."""

    def alpha(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_t, d alpha_t / dt), the data coefficient and its derivative."""
        raise NotImplementedError

    def sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sigma_t, d sigma_t / dt), the noise coefficient and its derivative."""
        raise NotImplementedError

    def plan(self, t: torch.Tensor, x0: torch.Tensor, x1: torch.Tensor):
        """(t, x_t, u_t): the point on the path and its velocity at times ``t`` [B] for noise x0 and data x1."""
        te = expand_t_like_x(t, x1)
        alpha, d_alpha = self.alpha(te)
        sigma, d_sigma = self.sigma(te)
        return t, alpha * x1 + sigma * x0, d_alpha * x1 + d_sigma * x0

    def _coefficients(self, x: torch.Tensor, t: torch.Tensor):
        te = expand_t_like_x(t, x)
        return (*self.alpha(te), *self.sigma(te))

    def score_from_velocity(self, v: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Score from velocity; singular where sigma_t = 0 (t = 1)."""
        alpha, d_alpha, sigma, d_sigma = self._coefficients(x, t)
        ratio = alpha / d_alpha
        var = sigma ** 2 - ratio * d_sigma * sigma
        return (ratio * v - x) / var

    def noise_from_velocity(self, v: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Expected noise E[x0 | x_t] from velocity."""
        _, _, sigma, _ = self._coefficients(x, t)
        return -sigma * self.score_from_velocity(v, x, t)

    def velocity_from_score(self, s: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Velocity from score; singular where alpha_t = 0 (t = 0)."""
        alpha, d_alpha, sigma, d_sigma = self._coefficients(x, t)
        ratio = d_alpha / alpha
        return ratio * x + (ratio * sigma ** 2 - sigma * d_sigma) * s

    def score_from_noise(self, eps: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Score from expected noise: -eps / sigma_t."""
        _, _, sigma, _ = self._coefficients(x, t)
        return -eps / sigma

    def velocity_from_noise(self, eps: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Velocity from expected noise."""
        return self.velocity_from_score(self.score_from_noise(eps, x, t), x, t)

    def drift_variance(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The factor ``dalpha/alpha * sigma^2 - sigma * dsigma`` by which a score error enters the velocity."""
        alpha, d_alpha, sigma, d_sigma = self._coefficients(x, t)
        return d_alpha / alpha * sigma ** 2 - sigma * d_sigma


class LinearPath(Path):
    """Straight line from noise to data: alpha_t = t, sigma_t = 1 - t."""

    def alpha(self, t):
        return t, torch.ones_like(t)

    def sigma(self, t):
        return 1 - t, -torch.ones_like(t)


class GVPPath(Path):
    """Quarter circle from noise to data: alpha_t = sin(pi t / 2), sigma_t = cos(pi t / 2)."""

    def alpha(self, t):
        return torch.sin(t * math.pi / 2), math.pi / 2 * torch.cos(t * math.pi / 2)

    def sigma(self, t):
        return torch.cos(t * math.pi / 2), -math.pi / 2 * torch.sin(t * math.pi / 2)
