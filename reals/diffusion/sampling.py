"""DDPM and DDIM samplers for learned-variance ε-models, stepping with diffusers' schedulers.

Both carry pure noise x_T to data over ``num_steps`` respaced timesteps of the training schedule (T = 1000):
- DDPM: ancestral sampling with the learned-range variance (``DDPMScheduler(variance_type="learned_range")``),
  timesteps ``linspace(0, T-1, num_steps)`` rounded: the respacing of DiT's ``sample_ddp.py`` (250 steps).
- DDIM: ``DDIMScheduler`` on ε alone (the variance channels are unused); ``eta`` = 0 is deterministic. Timesteps
  are ``trailing`` (T-1, T-1-T/N, ...), so ``num_steps`` must divide T.

A sampler is called as ``sampler(x_T, model, generators=None, **model_kwargs)`` where ``model(x, t, **kwargs)``
returns [B, 2C, ...] and ``t`` is a tensor [B] of timesteps; noise is drawn row by row from ``generators`` (one per
sample) when given. ``sampler.nfe`` counts the batched model calls of the last run. Classifier-free guidance is a
model wrapper (``reals.transport.guidance``) given ``noise_level=diffusion.noise_level``.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from diffusers import DDIMScheduler, DDPMScheduler

from reals import ReaLSError
from reals.diffusion.gaussian import GaussianDiffusion


def _scheduler_kwargs(diffusion: GaussianDiffusion) -> dict:
    return dict(num_train_timesteps=diffusion.num_timesteps, trained_betas=diffusion.betas.tolist(),
                prediction_type="epsilon", clip_sample=False)


class _Sampler:
    def __init__(self, diffusion: GaussianDiffusion, num_steps: int):
        if not 1 <= num_steps <= diffusion.num_timesteps:
            raise ReaLSError(f"num_steps must lie in [1, {diffusion.num_timesteps}], got {num_steps}")
        self.diffusion, self.num_steps = diffusion, num_steps
        self.nfe = 0

    def step(self, output: torch.Tensor, t: torch.Tensor, x: torch.Tensor, generators) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, model: Callable, generators: Sequence[torch.Generator] | None = None,
                 **model_kwargs) -> torch.Tensor:
        if generators is not None and len(generators) != x.shape[0]:
            raise ReaLSError(f"{type(self).__name__}: {len(generators)} generators for a batch of {x.shape[0]}")
        self.nfe = 0
        gens = list(generators) if generators is not None else None
        for t in self.scheduler.timesteps:
            output = model(x, t.to(x.device).expand(x.shape[0]), **model_kwargs)
            self.nfe += 1
            x = self.step(output.float(), t, x, gens)
        return x


class DDPMSampler(_Sampler):
    """Ancestral DDPM with the model's learned-range variance, ``num_steps`` respaced timesteps."""

    def __init__(self, diffusion: GaussianDiffusion, num_steps: int = 250):
        super().__init__(diffusion, num_steps)
        self.scheduler = DDPMScheduler(**_scheduler_kwargs(diffusion), variance_type="learned_range",
                                       timestep_spacing="linspace")
        self.scheduler.set_timesteps(num_steps)

    def step(self, output, t, x, generators):
        return self.scheduler.step(output, t, x, generator=generators).prev_sample


class DDIMSampler(_Sampler):
    """DDIM on the model's ε with noise scale ``eta`` (0: deterministic)."""

    def __init__(self, diffusion: GaussianDiffusion, num_steps: int = 250, eta: float = 0.0):
        super().__init__(diffusion, num_steps)
        if diffusion.num_timesteps % num_steps:
            raise ReaLSError(f"DDIM num_steps must divide the {diffusion.num_timesteps} training timesteps, "
                             f"got {num_steps}")
        if eta < 0:
            raise ReaLSError(f"DDIM eta must be non-negative, got {eta}")
        self.eta = eta
        self.scheduler = DDIMScheduler(**_scheduler_kwargs(diffusion), timestep_spacing="trailing")
        self.scheduler.set_timesteps(num_steps)

    def step(self, output, t, x, generators):
        eps = output[:, : x.shape[1]]
        return self.scheduler.step(eps, t, x, eta=self.eta, generator=generators).prev_sample
