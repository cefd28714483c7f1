"""Classifier-free guidance (CFG) around any conditional model ``model(x, t, y)``, with a guidance interval.

The guided prediction is ``uncond + cfg_scale * (cond - uncond)``, where ``uncond`` is the model's output for
the null class. It is linear in the prediction, so guiding a velocity also guides the score and the SDE drift.

Guidance interval convention (ReaLS "cfg=1.8, [0, 0.75]", written as in REPA whose sampler it follows): the
interval ``(lo, hi)`` is on the noise-level axis ``tau = 1 - t`` (tau=1 pure noise, tau=0 data; ``t`` is SiT's
time). Guidance applies where ``lo <= tau <= hi`` and is the identity (scale 1, the conditional prediction)
elsewhere; so ``(0, 0.75)`` leaves the noisiest quarter of the trajectory (t < 0.25) unguided. Models with another
time axis pass their own ``noise_level(t)`` (DiT: tau = t / T, see ``reals.diffusion``).
"""
from __future__ import annotations

from typing import Callable

import torch

from reals import ReaLSError


class ClassifierFreeGuidance:
    """Wraps ``model(x, t, y)``: one batch-doubled call (labels, then the null class) where guidance applies."""

    def __init__(self, model: Callable, cfg_scale: float, null_class: int | None = None,
                 cfg_channels: int | None = None, guidance_interval: tuple[float, float] | None = None,
                 noise_level: Callable[[torch.Tensor], torch.Tensor] = lambda t: 1 - t):
        """``null_class`` defaults to ``model.num_classes``; ``cfg_channels=k`` guides only the first k output
        channels (3 reproduces DiT/SiT, the rest keep the conditional prediction); None guides all.
        ``noise_level`` maps the model's time to tau (default SiT's 1 - t)."""
        null_class = getattr(model, "num_classes", None) if null_class is None else null_class
        if null_class is None:
            raise ReaLSError("classifier-free guidance needs null_class (the model has no num_classes)")
        if cfg_channels is not None and cfg_channels < 1:
            raise ReaLSError(f"cfg_channels must be a positive channel count or None, got {cfg_channels}")
        if guidance_interval is not None:
            lo, hi = guidance_interval
            if not 0 <= lo <= hi <= 1:
                raise ReaLSError(f"guidance interval must satisfy 0 <= lo <= hi <= 1, got {guidance_interval}")
        self.model, self.cfg_scale, self.null_class = model, float(cfg_scale), int(null_class)
        self.cfg_channels, self.guidance_interval, self.noise_level = cfg_channels, guidance_interval, noise_level

    def guided(self, t: torch.Tensor) -> torch.Tensor:
        """Bool [B]: whether guidance applies at each sample's time ``t`` [B] (the model's time)."""
        if self.guidance_interval is None:
            return torch.ones_like(t, dtype=torch.bool)
        lo, hi = self.guidance_interval
        tau = self.noise_level(t)
        return (tau >= lo) & (tau <= hi)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                 guidance_t: torch.Tensor | None = None) -> torch.Tensor:
        """The guided prediction at ``t``; guidance is decided at ``guidance_t`` when given (REPA's Heun corrector
        decides at the step's current time), else at ``t``."""
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        active = self.guided(t if guidance_t is None else guidance_t)
        if self.cfg_scale == 1.0 or not bool(active.any()):
            return self.model(x, t, y)
        out = self.model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, self.null_class)]))
        cond, uncond = out.chunk(2)
        k = cond.shape[1] if self.cfg_channels is None else self.cfg_channels
        guided = torch.cat([uncond[:, :k] + self.cfg_scale * (cond[:, :k] - uncond[:, :k]), cond[:, k:]], dim=1)
        return torch.where(active.reshape(-1, *([1] * (x.ndim - 1))), guided, cond)
