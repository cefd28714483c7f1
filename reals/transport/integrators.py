"""Numerical integrators over a time grid for a drift ``f(x, t)`` (``t`` a tensor [B] of one repeated time).

They know nothing of models or paths; ``trajectory`` (a list) collects the state after every step.
"""
from __future__ import annotations

from typing import Callable

import torch

Drift = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Noise = Callable[[torch.Tensor], torch.Tensor]


def batch_time(t: float, x: torch.Tensor) -> torch.Tensor:
    """The time ``t`` repeated for every sample of ``x``."""
    return torch.full((x.shape[0],), float(t), dtype=x.dtype, device=x.device)


def euler(f: Drift, x: torch.Tensor, ts: torch.Tensor, trajectory: list | None = None) -> torch.Tensor:
    """Explicit Euler: one drift evaluation per step."""
    for t_cur, t_next in zip(ts[:-1].tolist(), ts[1:].tolist()):
        x = x + (t_next - t_cur) * f(x, batch_time(t_cur, x))
        if trajectory is not None:
            trajectory.append(x)
    return x


def heun(f: Drift, x: torch.Tensor, ts: torch.Tensor, trajectory: list | None = None) -> torch.Tensor:
    """Heun's second-order method (explicit trapezoid): two drift evaluations per step."""
    for t_cur, t_next in zip(ts[:-1].tolist(), ts[1:].tolist()):
        h = t_next - t_cur
        d_cur = f(x, batch_time(t_cur, x))
        d_next = f(x + h * d_cur, batch_time(t_next, x))
        x = x + 0.5 * h * (d_cur + d_next)
        if trajectory is not None:
            trajectory.append(x)
    return x


def dopri5(f: Drift, x: torch.Tensor, ts: torch.Tensor, atol: float, rtol: float,
           trajectory: list | None = None) -> torch.Tensor:
    """Adaptive Dormand-Prince 5(4) (torchdiffeq); ``ts`` are output times, steps are chosen by the error.

    The step-size control uses one error norm over the whole batch, so a sample's result depends on its
    batch-mates only within the tolerances.
    """
    from torchdiffeq import odeint

    out = odeint(lambda t, y: f(y, t.expand(y.shape[0]).to(y.dtype)), x, ts.to(x.dtype),
                 method="dopri5", atol=atol, rtol=rtol)
    if trajectory is not None:
        trajectory.extend(out[1:])
    return out[-1]


def euler_maruyama(f: Drift, diffusion: Callable[[float], float], noise: Noise, x: torch.Tensor,
                   ts: torch.Tensor, trajectory: list | None = None) -> torch.Tensor:
    """Euler-Maruyama for dx = f(x, t) dt + sqrt(w(t)) dW, with standard normal draws from ``noise(x)``."""
    for t_cur, t_next in zip(ts[:-1].tolist(), ts[1:].tolist()):
        h = t_next - t_cur
        x = x + h * f(x, batch_time(t_cur, x)) + (diffusion(t_cur) * h) ** 0.5 * noise(x)
        if trajectory is not None:
            trajectory.append(x)
    return x
