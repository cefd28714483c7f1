"""The config of ``reals pipeline``: a run root, a data source, the generator's family and one section per chain
stage (generated from the registry), and its plan."""
from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import AliasChoices, Field, create_model

from pipelines import StageError
from pipelines.chain import Layout, Step, local_folder, plan
from pipelines.config import OptionalImages, StageConfig, build, read_yaml, section_names
from pipelines.generator import SampleDiTSection, generator_sections
from pipelines.sections import section_models
from storage.fs import local_path, to_url

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


class PipelineBase(StageConfig):
    """The whole chain: a run root, a data source, and per-stage settings (the fields of that stage's config)."""

    stage_sections: ClassVar[tuple[str, ...]] = ()

    output: str = Field("runs/demo", description="run root (local or s3://): every stage writes under it")
    local_dir: str | None = Field(None, description="local folder, shared by the Ray nodes, for what must be "
                                                    "local (synthetic data, the converted VAE); default: output")
    images: OptionalImages = Field(None, description="ImageNet-layout folder with train/ and val/ (local, shared "
                                                     "by the Ray nodes); default: the folder data in local_dir")
    nproc_per_node: int = Field(1, ge=1, description="training processes per node (torchrun when > 1)")

    def sections(self) -> dict[str, dict | None]:
        """Each stage section's given values (None: an optional section not set)."""
        return {name: (v.given() if v is not None else None) for name, v in self
                if name in type(self).stage_sections}


# The generator's family (before its section) and a DiT's sampler (after the sample section's SiT sampler).
FAMILY = (Literal["SiT", "DiT"] | None, Field(
    None, description="generator family: SiT (flow matching; ODE/SDE sampling) or DiT (DDPM with learned variance; "
                      "trained by train-dit on the generator settings at the same size, sampled with sample_dit); "
                      "default: the family of generator.model"))
SAMPLE_DIT = (SampleDiTSection, Field(default_factory=SampleDiTSection,
                                      description="the sampler of a DiT, in place of the sample section's"))


def _pipeline_config() -> type[PipelineBase]:
    fields = {}
    for section, (record, model) in section_models().items():
        if section == "generator":
            fields["family"] = FAMILY
        names = section_names(section)
        alias = AliasChoices(*names) if len(names) > 1 else None
        if record.chain.optional:
            fields[section] = (model | None, Field(None, description=record.chain.description,
                                                   validation_alias=alias))
        else:
            fields[section] = (model, Field(default_factory=model, description=record.chain.description,
                                            validation_alias=alias))
        if section == "sample":
            fields["sample_dit"] = SAMPLE_DIT
    model = create_model("PipelineConfig", __base__=PipelineBase, __doc__=PipelineBase.__doc__, **fields)
    model.stage_sections = tuple(f for f in fields if f not in ("family", "sample_dit"))
    return model


PipelineConfig = _pipeline_config()


def load_pipeline_config(path: str | os.PathLike | None = None, **overrides) -> PipelineBase:
    """A PipelineConfig from YAML (default: the embedded demo config), with top-level overrides."""
    path = Path(path or DEMO_CONFIG)
    if not path.is_file():
        raise StageError(f"pipeline config not found: {path}")
    data = read_yaml(path) or {}
    if not isinstance(data, dict):
        raise StageError(f"pipeline config {path}: expected a mapping, got {type(data).__name__}")
    data.update({k: v for k, v in overrides.items() if v is not None})
    return build(PipelineConfig, data, f"pipeline config {path} ")


def layout(pc: PipelineBase) -> Layout:
    """The run's layout: its root, and ``local_dir`` (default: the root, when that is local)."""
    root = to_url(pc.output)
    return Layout(root, local_folder(root, pc.local_dir))


def pipeline_steps(pc: PipelineBase, provided: dict[str, str] | None = None, **kwargs) -> list[Step]:
    """The steps of ``reals pipeline`` for ``pc``, with ``provided`` roles beside its data (``kwargs``: more of
    ``chain.plan``'s, e.g. ``ends``)."""
    at, sections = layout(pc), pc.sections()
    if sections.get("synthetic") is None and pc.images is None:
        raise StageError("the pipeline config needs images (an ImageNet-layout folder) or a synthetic section")
    if pc.images is not None and sections.get("synthetic") is not None and local_path(pc.images) is None:
        raise StageError(f"images {pc.images} is not local: the synthetic dataset is written to a local folder")
    stage, sections["generator"], sections["sample"] = generator_sections(
        sections["generator"], sections["sample"], pc.sample_dit.model_dump(), family=pc.family)
    images = {"images": to_url(pc.images)} if pc.images else {}
    written = sections.get("synthetic") is not None  # the images are the synthetic step's output, else given
    provided = {**({} if written else images), **(provided or {})}
    return plan(at, sections, provided=provided, paths=images if written else {}, choose={"generator": stage},
                **kwargs)
