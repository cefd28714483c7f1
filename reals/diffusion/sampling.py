"""DDPM and DDIM samplers for learned-variance ε-models, as DiT's ``p_sample_loop`` and ``ddim_sample_loop``.

Both carry pure noise x_T to data over ``num_steps`` kept timesteps of the training schedule (T = 1000), stepping
the respaced diffusion (``reals.diffusion.respace``) whose coefficients are float64, cast at use:
- DDPM: ancestral sampling with the learned-range variance; timesteps DiT's ``space_timesteps(T, N)`` for any N
  (``create_diffusion(str(N))``; 250 in DiT's ``sample_ddp.py``).
- DDIM: DiT's ``ddim_sample`` step on ε (the variance channels unused) with noise scale ``eta`` (0: deterministic);
  timesteps ``spacing="dit"`` (DiT's, as DDPM) or ``"trailing"`` (diffusers' T-1, T-1-T/N, ...; N must divide T).
Neither clips the x_0 estimate (DiT's sampling scripts pass ``clip_denoised=False``: latents are not in [-1, 1]).

A sampler is called as ``sampler(x_T, model, generators=None, **model_kwargs)`` where ``model(x, t, **kwargs)``
returns [B, 2C, ...] and ``t`` is a tensor [B] of (original) timesteps; noise is drawn row by row from
``generators`` (one per sample) when given, else from the global RNG. ``sampler.nfe`` counts the batched model
calls of the last run. Classifier-free guidance is a model wrapper (``reals.transport.guidance``) given
``noise_level=diffusion.noise_level``.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from reals import ReaLSError
from reals.diffusion.gaussian import GaussianDiffusion
from reals.diffusion.respace import respaced, space_timesteps, trailing_timesteps
from reals.transport.sampling import randn_per_sample

DDIM_SPACINGS = ("dit", "trailing")


class _Sampler:
    def __init__(self, diffusion: GaussianDiffusion, timesteps: list[int]):
        self.timesteps = torch.tensor(sorted(timesteps))
        self.num_steps = len(timesteps)
        self.spaced = respaced(diffusion, timesteps)
        self.nfe = 0

    def step(self, output: torch.Tensor, i: torch.Tensor, x: torch.Tensor, noise: Callable) -> torch.Tensor:
        """x at kept step i - 1 from x at step i [B] and the model's ``output`` there."""
        raise NotImplementedError

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, model: Callable, generators: Sequence[torch.Generator] | None = None,
                 **model_kwargs) -> torch.Tensor:
        if generators is not None and len(generators) != x.shape[0]:
            raise ReaLSError(f"{type(self).__name__}: {len(generators)} generators for a batch of {x.shape[0]}")
        gens = list(generators) if generators is not None else None

        def noise(like: torch.Tensor) -> torch.Tensor:
            return randn_per_sample(gens, like.shape[1:], like.dtype, like.device) if gens else torch.randn_like(like)

        self.nfe = 0
        for i in reversed(range(self.num_steps)):
            t = self.timesteps[i].to(x.device).expand(x.shape[0])
            output = model(x, t, **model_kwargs)
            self.nfe += 1
            x = self.step(output.float(), torch.full_like(t, i), x, noise)
        return x


def _check_steps(diffusion: GaussianDiffusion, num_steps: int) -> None:
    if not 1 <= num_steps <= diffusion.num_timesteps:
        raise ReaLSError(f"num_steps must lie in [1, {diffusion.num_timesteps}], got {num_steps}")


class DDPMSampler(_Sampler):
    """Ancestral DDPM with the model's learned-range variance on DiT's ``num_steps`` respaced timesteps."""

    def __init__(self, diffusion: GaussianDiffusion, num_steps: int = 250):
        _check_steps(diffusion, num_steps)
        super().__init__(diffusion, space_timesteps(diffusion.num_timesteps, num_steps))

    def step(self, output, i, x, noise):
        mean, log_var = self.spaced.p_mean_log_variance(output, x, i)
        if int(i[0]) == 0:
            return mean
        return mean + (0.5 * log_var).exp() * noise(x)


class DDIMSampler(_Sampler):
    """DDIM on the model's ε with noise scale ``eta`` (0: deterministic), DiT's or trailing timesteps."""

    def __init__(self, diffusion: GaussianDiffusion, num_steps: int = 250, eta: float = 0.0, spacing: str = "dit"):
        _check_steps(diffusion, num_steps)
        if eta < 0:
            raise ReaLSError(f"DDIM eta must be non-negative, got {eta}")
        if spacing not in DDIM_SPACINGS:
            raise ReaLSError(f"unknown DDIM spacing {spacing!r}; choose one of: {', '.join(DDIM_SPACINGS)}")
        spaced = space_timesteps if spacing == "dit" else trailing_timesteps
        super().__init__(diffusion, spaced(diffusion.num_timesteps, num_steps))
        self.eta, self.spacing = eta, spacing

    def step(self, output, i, x, noise):
        d = self.spaced
        x0 = d.predict_x0(x, i, output[:, : x.shape[1]])
        eps = d.predict_eps(x, i, x0)
        ab, ab_prev = d._at(d.alphas_cumprod, i, x), d._at(d.alphas_cumprod_prev, i, x)
        sigma = self.eta * ((1 - ab_prev) / (1 - ab)).sqrt() * (1 - ab / ab_prev).sqrt()
        x = x0 * ab_prev.sqrt() + (1 - ab_prev - sigma ** 2).sqrt() * eps
        if self.eta > 0 and int(i[0]) > 0:
            x = x + sigma * noise(x)
        return x
