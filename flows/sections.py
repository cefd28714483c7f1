"""The pipeline config's stage sections as typed models, so the Prefect Run form shows real fields.

A section has its stage config's fields, defaults, choices and descriptions. The fields the pipeline fills from
its layout (paths, ``resume``) are empty by default, and their descriptions say what empty becomes; a value given
there wins. The stage's own validators run when the pipeline builds the stage config from the section.
"""
from __future__ import annotations

import copy
from typing import ClassVar, Literal

from pydantic import Field, create_model

from flows.layout import Layout, filled_by_layout
from pipelines.config import StageConfig
from pipelines.registry import stage

# The pipeline config's section of each stage.
SECTION_STAGES = {"synthetic": "synthetic", "shard": "shard", "train_vae": "train-vae", "convert": "convert",
                  "encode": "encode", "train_sit": "train-sit", "sample": "sample", "make_reference": "make-reference",
                  "evaluate": "evaluate", "downstream": "downstream"}
# Fields the pipeline sets itself, which a section cannot: both shard runs get their split.
FIXED = {"shard": {"split"}}


class Section(StageConfig):
    """A stage config as a pipeline section (unknown keys and booleans for numbers refused, as in the stage's);
    ``given()`` is what it sets."""

    filled: ClassVar[frozenset[str]] = frozenset()

    def given(self) -> dict:
        """Every field's value but those left empty for the layout to fill."""
        return {k: v for k, v in self.model_dump().items() if not (k in self.filled and v is None)}


def _words(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return ", ".join(value) if isinstance(value, list) else str(value)


def section_model(section: str, from_layout: dict[str, str]) -> type[Section]:
    """The section model of a stage: its config's fields; those the layout fills (``from_layout``: field -> what
    the pipeline sets, in words) or that have no default are empty by default; ``FIXED`` fields are left out."""
    config = stage(SECTION_STAGES[section]).config
    fields, filled = {}, set()
    for name, info in config.model_fields.items():
        if name in FIXED.get(section, ()):
            continue
        if name in from_layout or info.is_required():
            filled.add(name)
            empty = f"empty: {from_layout[name]}" if name in from_layout else "required"
            fields[name] = (info.annotation | None, Field(None, description=f"{info.description or name} ({empty})",
                                                          validation_alias=info.validation_alias))
        else:
            fields[name] = (info.annotation, copy.copy(info))
    model = create_model(f"{config.__name__.removesuffix('Config')}Section", __base__=Section,
                         __doc__=config.__doc__, **fields)
    model.filled = frozenset(filled)
    return model


# The layout in words: what a field left empty becomes.
_FROM_LAYOUT = {section: {k: _words(v) for k, v in values.items()} for section, values in filled_by_layout(
    Layout("{output}", "{local_dir}"), "{images}", "true when downstream is set").items()}
_FROM_LAYOUT["sample"]["mode"] = "ODE for a SiT; a DiT samples with sample_dit"

SyntheticSection = section_model("synthetic", _FROM_LAYOUT["synthetic"])
ShardSection = section_model("shard", _FROM_LAYOUT["shard"])
TrainVAESection = section_model("train_vae", _FROM_LAYOUT["train_vae"])
ConvertSection = section_model("convert", _FROM_LAYOUT["convert"])
EncodeSection = section_model("encode", _FROM_LAYOUT["encode"])
TrainSiTSection = section_model("train_sit", _FROM_LAYOUT["train_sit"])
SampleSection = section_model("sample", _FROM_LAYOUT["sample"])
MakeReferenceSection = section_model("make_reference", _FROM_LAYOUT["make_reference"])
EvaluateSection = section_model("evaluate", _FROM_LAYOUT["evaluate"])
DownstreamSection = section_model("downstream", _FROM_LAYOUT["downstream"])


class SampleDiTSection(StageConfig):
    """How a DiT generator samples: these replace the sample section's SiT sampler settings."""

    mode: Literal["DDPM", "DDIM"] = Field("DDPM", description="DDPM (ancestral, with the learned variance) or DDIM")
    num_sampling_steps: int = Field(250, ge=2, description="respaced timesteps of the 1000 (model evaluations), "
                                                           "as in DiT's sample_ddp.py")


class OptionalSection(StageConfig):
    """Stage fields of which only those given are set (the experiment fills the rest per arm and seed)."""

    def given(self) -> dict:
        """The fields given (not empty)."""
        return {k: v for k, v in self.model_dump().items() if v is not None}


def optional_section(name: str, *stage_names: str) -> type[OptionalSection]:
    """A model of the fields of ``stage_names``' configs (the first's description of a shared field), each optional
    and empty by default; empty means the stage's default or what the experiment sets."""
    fields = {}
    for stage_name in stage_names:
        for field, info in stage(stage_name).config.model_fields.items():
            fields.setdefault(field, (info.annotation | None, Field(
                None, description=info.description or field, validation_alias=info.validation_alias)))
    return create_model(name, __base__=OptionalSection, __doc__=f"fields of {', '.join(stage_names)}, all optional",
                        **fields)
