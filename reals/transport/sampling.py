"""ODE and SDE samplers for a transport: noise at t0 (near 0) is carried to data at t=1 (SiT's convention).

The flags mean what they mean in SiT's ``sample_ddp.py``:
- ``num_steps`` N is the number of grid points ``linspace(t0, t1, N)``: N - 1 integration steps.
- ODE: the probability-flow ODE dx = v(x, t) dt, by Euler, Heun (torchdiffeq's ``heun2``) or adaptive dopri5;
  ``heun-repa`` is REPA's variant (no corrector on the last step; the corrector's guidance is decided at the
  step's current time). REPA's ODE ``--num-steps N`` (``linspace(1, 0, N + 1)``) is ``num_steps = N + 1`` here.
- SDE: dx = [v + D(t) * score] dt + sqrt(2 D(t)) dW by Euler-Maruyama (or SiT's stochastic Heun) on
  ``linspace(t0, 1 - last_step_size, N)``, then SiT's last step (``mean``: one deterministic step along the SDE
  drift, the default; ``euler``: along the velocity; ``tweedie``: the denoised estimate; ``none``: no last step,
  integrating to t1). D(t) is SiT's ``diffusion_form``: ``sigma`` (D = diffusion_norm * sigma_t, SiT's default)
  or ``linear`` (D = diffusion_norm * (1 - t): REPA's ``compute_diffusion`` 2t in its time, on both its paths).
  Any D >= 0 keeps the marginals of the path; D = 0 is the ODE. REPA's SDE ``--num-steps N`` is ``num_steps = N``
  here (``linspace(1, 0.04, N)`` then a mean step), with ``linear`` (on REPA's linear path ``sigma`` is the same).

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
from reals.transport.guidance import ClassifierFreeGuidance
from reals.transport.path import expand_t_like_x
from reals.transport.transport import Transport

ODE_METHODS = ("euler", "heun", "heun-repa", "dopri5")
SDE_METHODS = ("euler", "heun")
LAST_STEPS = ("mean", "euler", "tweedie", "none")
DIFFUSION_FORMS = ("sigma", "linear")


def randn_per_sample(generators: Sequence[torch.Generator], shape: Sequence[int],
                     dtype=torch.float32, device=None) -> torch.Tensor:
    """Standard normal [len(generators), *shape], row i drawn from generator i alone."""
    rows = [torch.randn(tuple(shape), generator=g, device=g.device, dtype=dtype) for g in generators]
    return torch.stack(rows).to(device)


def _finish(x: torch.Tensor, trajectory: list | None, return_trajectory: bool):
    return (x, torch.stack(trajectory)) if return_trajectory else x


def _check_choice(value: str, choices: tuple[str, ...], what: str) -> None:
    if value not in choices:
        raise ReaLSError(f"unknown {what} {value!r}; choose one of: {', '.join(choices)}")


class ODESampler:
    """Deterministic sampler along the probability-flow ODE on ``num_steps`` grid points (dopri5: output times)."""

    def __init__(self, transport: Transport, method: str = "heun", num_steps: int = 50,
                 atol: float = 1e-6, rtol: float = 1e-3):
        _check_choice(method, ODE_METHODS, "ODE method")
        if num_steps < 2:
            raise ReaLSError(f"num_steps (grid points) must be at least 2, got {num_steps}")
        self.transport, self.method, self.num_steps = transport, method, num_steps
        self.atol, self.rtol = atol, rtol
        self.nfe = 0

    def velocity_fn(self, model: Callable, model_kwargs: dict) -> integrators.Drift:
        """The drift v(x, t) from the model's prediction, counting evaluations; ``guidance_t`` (REPA's Heun
        corrector) reaches a guided model only."""
        guided = isinstance(model, ClassifierFreeGuidance)

        def f(x, t, guidance_t=None):
            self.nfe += 1
            kwargs = dict(model_kwargs, guidance_t=guidance_t) if guided and guidance_t is not None else model_kwargs
            return self.transport.velocity(model(x, t, **kwargs), x, t)
        return f

    @torch.no_grad()
    def __call__(self, x0: torch.Tensor, model: Callable, return_trajectory: bool = False, **model_kwargs):
        """Samples at t1 from noise ``x0``; with ``return_trajectory`` also the states [num_steps, B, ...]."""
        self.nfe = 0
        t0, t1 = self.transport.sample_interval(sde=False)
        ts = torch.linspace(t0, t1, self.num_steps, dtype=torch.float64)
        f = self.velocity_fn(model, model_kwargs)
        trajectory = [x0] if return_trajectory else None
        if self.method == "dopri5":
            x = integrators.dopri5(f, x0, ts, self.atol, self.rtol, trajectory)
        elif self.method == "euler":
            x = integrators.euler(f, x0, ts, trajectory)
        else:
            x = integrators.heun(f, x0, ts, trajectory, repa=self.method == "heun-repa")
        return _finish(x, trajectory, return_trajectory)


class SDESampler:
    """Stochastic sampler (SiT's ``sample_sde``): ``num_steps`` grid points up to 1 - last_step_size, then the
    last step; Euler-Maruyama makes ``num_steps`` drift evaluations in all."""

    def __init__(self, transport: Transport, num_steps: int = 250, diffusion_norm: float = 1.0,
                 last_step_size: float = 0.04, method: str = "euler", last_step: str = "mean",
                 diffusion_form: str = "sigma"):
        _check_choice(method, SDE_METHODS, "SDE method")
        _check_choice(last_step, LAST_STEPS, "SDE last step")
        _check_choice(diffusion_form, DIFFUSION_FORMS, "SDE diffusion form")
        if method == "heun" and last_step == "none" and transport.sample_eps == 0:
            raise ReaLSError("SDE heun with last step none evaluates the score at t = 1, where it is infinite "
                             "(NaN samples, as in SiT): use another last step, or euler")
        if num_steps < 2:
            raise ReaLSError(f"SDE num_steps must be at least 2, got {num_steps}")
        if last_step != "none" and not 0 < last_step_size < 1 - transport.sample_eps:
            raise ReaLSError(f"SDE last_step_size must lie in (0, {1 - transport.sample_eps}), got {last_step_size}")
        if diffusion_norm < 0:
            raise ReaLSError(f"SDE diffusion_norm must be non-negative, got {diffusion_norm}")
        self.transport, self.num_steps, self.method, self.last_step = transport, num_steps, method, last_step
        self.diffusion_norm, self.diffusion_form = diffusion_norm, diffusion_form
        self.last_step_size = 0.0 if last_step == "none" else last_step_size
        self.nfe = 0

    def diffusion_coefficient(self, t: torch.Tensor) -> torch.Tensor:
        """D(t): diffusion_norm * sigma_t (``sigma``) or diffusion_norm * (1 - t) (``linear``)."""
        base = self.transport.path.sigma(t)[0] if self.diffusion_form == "sigma" else 1 - t
        return self.diffusion_norm * base

    def diffusion(self, t: float) -> float:
        """D(t) at one time (the noise added is sqrt(2 D dt))."""
        return float(self.diffusion_coefficient(torch.tensor(t, dtype=torch.float64)))

    def _prediction_fn(self, model: Callable, model_kwargs: dict) -> Callable:
        def predict(x, t):
            self.nfe += 1
            return model(x, t, **model_kwargs)
        return predict

    def drift_fn(self, model: Callable, model_kwargs: dict) -> integrators.Drift:
        """The SDE drift v + D(t) * score from one model evaluation, counting evaluations."""
        predict = self._prediction_fn(model, model_kwargs)

        def f(x, t):
            pred = predict(x, t)
            d = self.diffusion_coefficient(expand_t_like_x(t, x))
            return self.transport.velocity(pred, x, t) + d * self.transport.score(pred, x, t)
        return f

    def _last(self, x: torch.Tensor, t1: float, model: Callable, model_kwargs: dict) -> torch.Tensor:
        """SiT's last step from ``t1`` to 1."""
        t = integrators.batch_time(t1, x)
        if self.last_step == "mean":
            return x + self.last_step_size * self.drift_fn(model, model_kwargs)(x, t)
        pred = self._prediction_fn(model, model_kwargs)(x, t)
        if self.last_step == "euler":
            return x + self.last_step_size * self.transport.velocity(pred, x, t)
        te = expand_t_like_x(t, x)
        alpha, sigma = self.transport.path.alpha(te)[0], self.transport.path.sigma(te)[0]
        return x / alpha + sigma ** 2 / alpha * self.transport.score(pred, x, t)

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
        step = integrators.euler_maruyama if self.method == "euler" else integrators.stochastic_heun
        trajectory = [x0] if return_trajectory else None
        x = step(self.drift_fn(model, model_kwargs), self.diffusion, noise_fn, x0, ts, trajectory)
        if self.last_step != "none":
            x = self._last(x, t1, model, model_kwargs)
            if trajectory is not None:
                trajectory.append(x)
        return _finish(x, trajectory, return_trajectory)
