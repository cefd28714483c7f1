"""The generator of a chain (the pipeline, the experiment): a SiT or a DiT, with its training stage and sampler."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipelines import StageError
from pipelines.config import StageConfig
from reals import ReaLSError
from reals.models import model_family


SIT_SAMPLER_KEYS = ("mode", "num_sampling_steps", "sampling_method", "atol", "rtol", "diffusion_norm", "last_step",
                    "last_step_size", "path_type", "prediction")


def generator_sections(train_sit: dict, sample: dict, sample_dit: dict, model: str | None = None,
                       family: str | None = None) -> tuple[str, dict, dict]:
    """``(training stage, train section, sample section)`` of a chain's generator.

    ``model`` replaces the section's model; ``family`` keeps its size in the other family (SiT-T/2 -> DiT-T/2).
    A DiT trains with train-dit on the train_sit settings and samples with ``sample_dit`` in place of the sample
    section's SiT sampler settings (``SIT_SAMPLER_KEYS``)."""
    name = model or train_sit.get("model") or f"{family or 'SiT'}-XL/2"
    try:
        if family and model_family(name) != family:
            name = f"{family}-{name.split('-', 1)[1]}"
        family = model_family(name)
    except ReaLSError as e:
        raise StageError(str(e)) from None
    train_sit = {**train_sit, "model": name}
    if family == "SiT":
        return "train-sit", train_sit, sample
    kept = {k: v for k, v in sample.items() if k not in SIT_SAMPLER_KEYS}
    return "train-dit", train_sit, {**kept, **sample_dit}


class SampleDiTSection(StageConfig):
    """How a DiT generator samples: these replace the sample section's SiT sampler settings."""

    mode: Literal["DDPM", "DDIM"] = Field("DDPM", description="DDPM (ancestral, with the learned variance) or DDIM")
    num_sampling_steps: int = Field(250, ge=2, description="respaced timesteps of the 1000 (model evaluations), "
                                                           "as in DiT's sample_ddp.py")
