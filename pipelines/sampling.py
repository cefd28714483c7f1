"""Drawing samples from a SiT or DiT, as `sample` and train-sit's sample grids do: per-sample random streams,
the sampler of a mode, guidance, decoding, and ``sample_images`` (one batch, as DiT's and SiT's sample.py).

Each sample ``i`` draws its label and its noise from its own seed ``(global_seed, i, stream)``, so a result
does not depend on how the indices are split over workers or batches.
"""
from __future__ import annotations

import numpy as np
import torch

from pipelines import StageError
from reals import ReaLSError
from reals.diffusion import DDIMSampler, DDPMSampler, GaussianDiffusion
from reals.images import to_uint8
from reals.models import model_family
from reals.transport import ClassifierFreeGuidance, ODESampler, SDESampler, create_transport, randn_per_sample

LABEL_STREAM, NOISE_STREAM = 0, 1
FAMILY_MODES = {"SiT": ("ODE", "SDE"), "DiT": ("DDPM", "DDIM")}


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


def check_mode(mode: str, name: str) -> None:
    """Refuse a sampler of the other family: SiT samples by ODE/SDE, DiT by DDPM/DDIM."""
    family = model_family(name)
    if mode not in FAMILY_MODES[family]:
        other = next(f for f, modes in FAMILY_MODES.items() if mode in modes)
        raise StageError(f"{mode} samples a {other}, but the checkpoint holds {name}, a {family}: sample it with "
                         f"{' or '.join(FAMILY_MODES[family])}")


def make_sampler(spec: dict):
    """The sampler of ``spec["mode"]`` with the spec's settings."""
    mode, steps = spec["mode"], spec["num_sampling_steps"]
    try:
        if mode == "ODE":
            return ODESampler(create_transport(spec["path_type"], spec["prediction"]), spec["sampling_method"], steps,
                              spec["atol"], spec["rtol"])
        if mode == "SDE":
            return SDESampler(create_transport(spec["path_type"], spec["prediction"]), steps, spec["diffusion_norm"],
                              spec["last_step_size"], spec["sampling_method"], spec["last_step"],
                              spec["diffusion_form"])
        if mode == "DDPM":
            return DDPMSampler(GaussianDiffusion(), steps)
        return DDIMSampler(GaussianDiffusion(), steps, spec["eta"], spec["ddim_spacing"])
    except ReaLSError as e:
        raise StageError(str(e)) from None


@torch.no_grad()
def sample_images(model, vae, sampler, labels: torch.Tensor, generators: list[torch.Generator], cfg_scale: float = 1.0,
                  cfg_channels: int | None = None, guidance_interval: tuple[float, float] | None = None
                  ) -> tuple[np.ndarray, torch.Tensor]:
    """One batch as DiT's and SiT's sample.py draw it: ``(uint8 NHWC images, normalised latents)``.

    Sample ``j``'s initial noise comes from ``generators[j]``, which goes on to give its sampler noise (SDE,
    DDPM, DDIM); ``sampler`` integrates ``model`` guided as ``guided_model``; the VAE decodes the latents."""
    device = next(model.parameters()).device
    x0 = randn_per_sample(generators, (model.in_channels, model.input_size, model.input_size), device=device)
    fn = guided_model(model, cfg_scale, cfg_channels, guidance_interval)
    noise = {} if isinstance(sampler, ODESampler) else {"generators": generators}
    z = sampler(x0, fn, y=labels.to(device), **noise)
    return decode_latents(vae, z), z
