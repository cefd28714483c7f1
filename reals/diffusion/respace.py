"""Respacing a DDPM schedule onto fewer timesteps, as DiT / improved DDPM (``respace.py``) do.

``space_timesteps(T, N)`` keeps N of the timesteps 0..T-1 at the fractional stride (T-1)/(N-1), accumulated step
by step and rounded (Python's ``round``), so ``N`` = 250 of 1000 gives 0, 4, 8, ... 999 and any N, odd ones
included, gives DiT's ``create_diffusion(str(N))`` timesteps. ``respaced`` is the diffusion over the kept
timesteps: betas ``1 - ab[t_i] / ab[t_{i-1}]`` so that its cumulative products are the kept ones.
"""
from __future__ import annotations

import torch

from reals import ReaLSError
from reals.diffusion.gaussian import GaussianDiffusion


def space_timesteps(num_timesteps: int, count: int) -> list[int]:
    """``count`` timesteps of ``0..num_timesteps-1`` (ascending), DiT's one-section respacing."""
    if not 1 <= count <= num_timesteps:
        raise ReaLSError(f"cannot respace {num_timesteps} timesteps into {count}")
    stride = 1.0 if count == 1 else (num_timesteps - 1) / (count - 1)
    kept, position = [], 0.0
    for _ in range(count):
        kept.append(round(position))
        position += stride
    return kept


def trailing_timesteps(num_timesteps: int, count: int) -> list[int]:
    """diffusers' "trailing" timesteps (ascending): T/N - 1, 2T/N - 1, ... T - 1; ``count`` must divide T."""
    if num_timesteps % count:
        raise ReaLSError(f"trailing DDIM timesteps need num_steps to divide the {num_timesteps} training "
                         f"timesteps, got {count}")
    step = num_timesteps // count
    return list(range(step - 1, num_timesteps, step))


def respaced(diffusion: GaussianDiffusion, timesteps: list[int]) -> GaussianDiffusion:
    """The diffusion whose step i goes from kept timestep ``timesteps[i]`` to ``timesteps[i-1]`` (float64)."""
    kept = diffusion.alphas_cumprod[torch.as_tensor(sorted(timesteps))]
    previous = torch.cat([torch.ones(1, dtype=torch.float64), kept[:-1]])
    return GaussianDiffusion(1 - kept / previous)
