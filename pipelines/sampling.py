"""What `sample` and train-sit's sample grids share: per-sample random streams, guidance and decoding.

Each sample ``i`` draws its label and its noise from its own seed ``(global_seed, i, stream)``, so a result
does not depend on how the indices are split over workers or batches.
"""
from __future__ import annotations

import numpy as np
import torch

from reals.images import to_uint8
from reals.diffusion import GaussianDiffusion
from reals.transport import ClassifierFreeGuidance

LABEL_STREAM, NOISE_STREAM = 0, 1


def sample_seed(global_seed: int, index: int, stream: int) -> int:
    """The 64-bit seed of one random stream (label or noise) of sample ``index``."""
    return int(np.random.SeedSequence([global_seed, index, stream]).generate_state(1, np.uint64)[0])


def sample_generators(global_seed: int, indices, stream: int) -> list[torch.Generator]:
    """One CPU generator per sample index for ``stream``."""
    return [torch.Generator().manual_seed(sample_seed(global_seed, int(i), stream)) for i in indices]


def sample_labels(mode: str, num_classes: int, global_seed: int, indices) -> torch.Tensor:
    """Labels [B] of the samples ``indices``: from each sample's own seed, or ``i mod num_classes``."""
    if mode == "balanced":
        return torch.tensor([int(i) % num_classes for i in indices], dtype=torch.long)
    gens = sample_generators(global_seed, indices, LABEL_STREAM)
    return torch.cat([torch.randint(num_classes, (1,), generator=g) for g in gens])


@torch.no_grad()
def decode_latents(vae, z_norm: torch.Tensor) -> np.ndarray:
    """Normalised latents -> uint8 NHWC images through the ReaLS VAE (``z = z_norm * latents_std + latents_mean``)."""
    z = vae.denormalize(z_norm.to(device=vae.latents_mean.device, dtype=torch.float32))
    return to_uint8(vae.decode(z))


def guided_model(model, cfg_scale: float, cfg_channels: int | None, interval: tuple[float, float] | None):
    """The model wrapped in classifier-free guidance (the bare model when ``cfg_scale`` is 1). For DiT the guided
    channels are ε's ("all" = the latent channels; the variance values keep the conditional prediction) and the
    interval is on tau = t / T."""
    if cfg_scale == 1.0:
        return model
    if model.family == "DiT":
        return ClassifierFreeGuidance(model, cfg_scale, cfg_channels=cfg_channels or model.in_channels,
                                      guidance_interval=interval, noise_level=GaussianDiffusion().noise_level)
    return ClassifierFreeGuidance(model, cfg_scale, cfg_channels=cfg_channels, guidance_interval=interval)
