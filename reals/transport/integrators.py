"""Numerical integrators over a time grid for a drift ``f(x, t)`` (``t`` a tensor [B] of one repeated time).

They know nothing of models or paths; ``trajectory`` (a list) collects the state after every step. A grid
``ts`` of N points makes N - 1 steps (SiT's convention: ``--num-sampling-steps N`` is ``linspace(t0, t1, N)``).
"""
from __future__ import annotations

from typing import Callable

import torch

Drift = Callable[..., torch.Tensor]
Noise = Callable[[torch.Tensor], torch.Tensor]


def batch_time(t: float, x: torch.Tensor) -> torch.Tensor:
    """The time ``t`` repeated for every sample of ``x``."""
    return torch.full((x.shape[0],), float(t), dtype=x.dtype, device=x.device)


def _steps(ts: torch.Tensor):
    return zip(ts[:-1].tolist(), ts[1:].tolist())


def euler(f: Drift, x: torch.Tensor, ts: torch.Tensor, trajectory: list | None = None) -> torch.Tensor:
    """Explicit Euler: one drift evaluation per step."""
    for t_cur, t_next in _steps(ts):
        x = x + (t_next - t_cur) * f(x, batch_time(t_cur, x))
        if trajectory is not None:
            trajectory.append(x)
    return x


def heun(f: Drift, x: torch.Tensor, ts: torch.Tensor, trajectory: list | None = None,
         repa: bool = False) -> torch.Tensor:
    """Heun's second-order method (explicit trapezoid, torchdiffeq's ``heun2``): two drift evaluations per step.

    ``repa`` follows REPA's sampler: no corrector on the last step (a plain Euler step), and the corrector's
    guidance is decided at the step's current time (``f`` receives ``guidance_t``).
    """
    steps = list(_steps(ts))
    for i, (t_cur, t_next) in enumerate(steps):
        h = t_next - t_cur
        d_cur = f(x, batch_time(t_cur, x))
        if repa and i == len(steps) - 1:
            x = x + h * d_cur
        else:
            extra = {"guidance_t": batch_time(t_cur, x)} if repa else {}
            d_next = f(x + h * d_cur, batch_time(t_next, x), **extra)
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
    """Euler-Maruyama for dx = f(x, t) dt + sqrt(2 D(t)) dW (SiT's form), standard normal draws from ``noise(x)``."""
    for t_cur, t_next in _steps(ts):
        h = t_next - t_cur
        dw = noise(x) * h ** 0.5
        x = x + h * f(x, batch_time(t_cur, x)) + (2 * diffusion(t_cur)) ** 0.5 * dw
        if trajectory is not None:
            trajectory.append(x)
    return x


def stochastic_heun(f: Drift, diffusion: Callable[[float], float], noise: Noise, x: torch.Tensor,
                    ts: torch.Tensor, trajectory: list | None = None) -> torch.Tensor:
    """SiT's SDE "Heun": add the step's noise first, then a deterministic Heun step from the noised state."""
    for t_cur, t_next in _steps(ts):
        h = t_next - t_cur
        x = x + (2 * diffusion(t_cur)) ** 0.5 * noise(x) * h ** 0.5
        k1 = f(x, batch_time(t_cur, x))
        k2 = f(x + h * k1, batch_time(t_next, x))
        x = x + 0.5 * h * (k1 + k2)
        if trajectory is not None:
            trajectory.append(x)
    return x
