"""ODE and SDE samplers for a transport: noise at t0 (near 0) is carried to data at t=1 (SiT's convention).

- ODE: the probability-flow ODE dx = v(x, t) dt, by Euler, Heun or adaptive dopri5.
- SDE: dx = [v + w(t)/2 * s] dt + sqrt(w(t)) dW with w(t) = diffusion_norm * sigma_t (SiT's "sigma" form),
  Euler-Maruyama up to t = 1 - last_step_size, then one last deterministic step along the drift (the mean).
  Any w(t) >= 0 keeps the marginals of the path; w = 0 is the ODE.

Each sampler is a callable ``sampler(x0, model, **model_kwargs)``, where ``model(x, t, **model_kwargs)`` returns
the transport's prediction and ``t`` is a tensor [B]. Classifier-free guidance is a model wrapper
(``reals.transport.guidance``), so samplers work for any model. The initial noise ``x0`` comes from the caller.
``sampler.nfe`` is the number of drift evaluations of the last call: batched model calls, where a
guided call on the doubled batch counts once.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from reals import ReaLSError
from reals.transport import integrators
from reals.transport.path import expand_t_like_x
from reals.transport.transport import Transport

ODE_METHODS = ("euler", "heun", "dopri5")


def randn_per_sample(generators: Sequence[torch.Generator], shape: Sequence[int],
                     dtype=torch.float32, device=None) -> torch.Tensor:
    """Standard normal [len(generators), *shape], row i drawn from generator i alone."""
    rows = [torch.randn(tuple(shape), generator=g, device=g.device, dtype=dtype) for g in generators]
    return torch.stack(rows).to(device)


def _finish(x: torch.Tensor, trajectory: list | None, return_trajectory: bool):
    return (x, torch.stack(trajectory)) if return_trajectory else x


class ODESampler:
    """Deterministic sampler along the probability-flow ODE; ``num_steps`` grid steps (or output steps for dopri5)."""

    def __init__(self, transport: Transport, method: str = "heun", num_steps: int = 50,
                 atol: float = 1e-6, rtol: float = 1e-3):
        if method not in ODE_METHODS:
            raise ReaLSError(f"unknown ODE method {method!r}; choose one of: {', '.join(ODE_METHODS)}")
        if num_steps < 1:
            raise ReaLSError(f"num_steps must be at least 1, got {num_steps}")
        self.transport, self.method, self.num_steps = transport, method, num_steps
        self.atol, self.rtol = atol, rtol
        self.nfe = 0

    def velocity_fn(self, model: Callable, model_kwargs: dict) -> integrators.Drift:
        """The drift v(x, t) from the model's prediction, counting evaluations."""
        def f(x, t):
            self.nfe += 1
            return self.transport.velocity(model(x, t, **model_kwargs), x, t)
        return f

    @torch.no_grad()
    def __call__(self, x0: torch.Tensor, model: Callable, return_trajectory: bool = False, **model_kwargs):
        """Samples at t=1 from noise ``x0``; with ``return_trajectory`` also the states [steps+1, B, ...]."""
        self.nfe = 0
        t0, t1 = self.transport.sample_interval(sde=False)
        ts = torch.linspace(t0, t1, self.num_steps + 1, dtype=torch.float64)
        f = self.velocity_fn(model, model_kwargs)
        trajectory = [x0] if return_trajectory else None
        if self.method == "dopri5":
            x = integrators.dopri5(f, x0, ts, self.atol, self.rtol, trajectory)
        else:
            x = getattr(integrators, self.method)(f, x0, ts, trajectory)
        return _finish(x, trajectory, return_trajectory)


class SDESampler:
    """Stochastic sampler: Euler-Maruyama then a final mean step; ``num_steps`` drift evaluations in all."""

    def __init__(self, transport: Transport, num_steps: int = 250, diffusion_norm: float = 1.0,
                 last_step_size: float = 0.04):
        if num_steps < 2:
            raise ReaLSError(f"SDE num_steps must be at least 2, got {num_steps}")
        if not 0 < last_step_size < 1 - transport.sample_eps:
            raise ReaLSError(f"SDE last_step_size must lie in (0, {1 - transport.sample_eps}), got {last_step_size}")
        if diffusion_norm < 0:
            raise ReaLSError(f"SDE diffusion_norm must be non-negative, got {diffusion_norm}")
        self.transport, self.num_steps = transport, num_steps
        self.diffusion_norm, self.last_step_size = diffusion_norm, last_step_size
        self.nfe = 0

    def diffusion(self, t: float) -> float:
        """w(t) = diffusion_norm * sigma_t."""
        return self.diffusion_norm * float(self.transport.path.sigma(torch.tensor(t, dtype=torch.float64))[0])

    def drift_fn(self, model: Callable, model_kwargs: dict) -> integrators.Drift:
        """The SDE drift v + w(t)/2 * score from one model evaluation, counting evaluations."""
        def f(x, t):
            self.nfe += 1
            pred = model(x, t, **model_kwargs)
            w = self.diffusion_norm * self.transport.path.sigma(expand_t_like_x(t, x))[0]
            return self.transport.velocity(pred, x, t) + 0.5 * w * self.transport.score(pred, x, t)
        return f

    @torch.no_grad()
    def __call__(self, x0: torch.Tensor, model: Callable, generators: Sequence[torch.Generator] | None = None,
                 noise_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 return_trajectory: bool = False, **model_kwargs):
        """Samples from noise ``x0``; Brownian increments from per-sample ``generators`` (one per row of x0),
        else ``noise_fn(x)``, else the global RNG."""
        if generators is not None:
            if len(generators) != x0.shape[0]:
                raise ReaLSError(f"SDE sampler: {len(generators)} generators for a batch of {x0.shape[0]}")
            noise_fn = lambda x: randn_per_sample(generators, x.shape[1:], x.dtype, x.device)  # noqa: E731
        noise_fn = noise_fn or torch.randn_like
        self.nfe = 0
        t0, t1 = self.transport.sample_interval(sde=True, last_step_size=self.last_step_size)
        ts = torch.linspace(t0, t1, self.num_steps, dtype=torch.float64)
        f = self.drift_fn(model, model_kwargs)
        trajectory = [x0] if return_trajectory else None
        x = integrators.euler_maruyama(f, self.diffusion, noise_fn, x0, ts, trajectory)
        x = x + self.last_step_size * f(x, integrators.batch_time(t1, x))
        if trajectory is not None:
            trajectory.append(x)
        return _finish(x, trajectory, return_trajectory)
