"""The chain as data: the pipeline config, each stage's config under one run root, and whether a step must run.

A step is skipped when its stage says its outputs are complete (``complete`` in the stage registry) and the
pipeline's record of its last successful run (``<output>/pipeline/<step>.json``) holds the same config.
``missing`` says why a step must run.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from flows.layout import Layout, filled_by_layout
from flows.sections import (SECTION_STAGES, ConvertSection, DownstreamSection, EncodeSection, EvaluateSection,
                            MakeReferenceSection, SampleDiTSection, SampleSection, ShardSection, SyntheticSection,
                            TrainSiTSection, TrainVAESection)
from pipelines import StageError
from pipelines.config import OptionalImages, StageConfig, build, former_names_win
from pipelines.registry import outputs_missing, stage
from storage.fs import join, local_path, to_url
from storage.markers import read_json, write_json

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


class PipelineConfig(BaseModel):
    """The whole chain: a run root, a data source, and per-stage settings (the fields of that stage's config)."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _former_names(cls, values):
        return former_names_win(cls, values)

    output: str = Field("runs/demo", description="run root (local or s3://): every stage writes under it")
    local_dir: str | None = Field(None, description="local folder, shared by the Ray nodes, for what must be "
                                                    "local (synthetic data, the converted VAE); default: output")
    images: OptionalImages = Field(None, description="ImageNet-layout folder with train/ and val/ (local, shared "
                                                     "by the Ray nodes); default: the folder data in local_dir")
    nproc_per_node: int = Field(1, ge=1, description="training processes per node (torchrun when > 1)")
    synthetic: SyntheticSection | None = Field(None, description="when set, a synthetic dataset is written to "
                                                                 "images first")
    shard: ShardSection = Field(default_factory=ShardSection, description="sharding (both splits)")
    train_vae: TrainVAESection = Field(default_factory=TrainVAESection, description="VAE training")
    convert: ConvertSection = Field(default_factory=ConvertSection, description="checkpoint to ReaLS VAE directory")
    encode: EncodeSection = Field(default_factory=EncodeSection, description="latent store")
    family: Literal["SiT", "DiT"] | None = Field(
        None, description="generator family: SiT (flow matching; ODE/SDE sampling) or DiT (DDPM with learned "
                          "variance; trained by train-dit on the train_sit settings at the same size, sampled with "
                          "sample_dit); default: the family of train_sit.model")
    train_sit: TrainSiTSection = Field(default_factory=TrainSiTSection, description="SiT (or DiT) training")
    sample: SampleSection = Field(default_factory=SampleSection, description="sampling")
    sample_dit: SampleDiTSection = Field(default_factory=SampleDiTSection,
                                         description="the sampler of a DiT, in place of the sample section's")
    make_reference: MakeReferenceSection = Field(default_factory=MakeReferenceSection,
                                                 description="reference batch from the val split")
    evaluate: EvaluateSection = Field(default_factory=EvaluateSection,
                                      description="metrics; set ref_batch to use a reference .npz of your own")
    downstream: DownstreamSection | None = Field(None, description="when set (and the data has masks and depth), "
                                                                   "segmentation and depth run last")


def load_pipeline_config(path: str | os.PathLike | None = None, **overrides) -> PipelineConfig:
    """A PipelineConfig from YAML (default: the embedded demo config), with top-level overrides."""
    import yaml

    path = Path(path or DEMO_CONFIG)
    if not path.is_file():
        raise StageError(f"pipeline config not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    return build(PipelineConfig, data, f"pipeline config {path} ")


# ---------------------------------------------------------------------------------------------------
# Layout and stage configs
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Step:
    """One stage run of the chain: its name in the run, which stage it is, its config, what it depends on."""

    name: str
    stage: str
    config: StageConfig
    after: tuple[str, ...] = ()


def _config(stage_name: str, section: str, layout_values: dict, given: dict, fixed: dict | None = None):
    return build(stage(stage_name).config, {**layout_values, **given, **(fixed or {})}, f"pipeline section {section}.")


def _step(name: str, section: str, pc: PipelineConfig, fill: dict, after: tuple[str, ...],
          fixed: dict | None = None) -> Step:
    return Step(name, SECTION_STAGES[section], _config(SECTION_STAGES[section], section, fill[section],
                                                       getattr(pc, section).given(), fixed), after)


def _has_val(pc: PipelineConfig, images: str) -> bool:
    if pc.synthetic is not None:
        return (pc.synthetic.val_per_class or 0) > 0
    return os.path.isdir(os.path.join(images.removeprefix("file://"), "val"))


def _no_val(images: str) -> StageError:
    """Why there is no val split for the reference batch: a missing, unreadable or split-less data folder."""
    folder = images.removeprefix("file://")
    if not os.path.exists(folder):
        return StageError(f"data folder {images} not found: images must be an ImageNet-layout folder "
                          "(train/ and val/ with one folder per class)")
    if not os.path.isdir(folder):
        return StageError(f"images {images} is not a folder")
    try:
        os.listdir(folder)
    except PermissionError:
        return StageError(f"data folder {images} is not readable (permission denied)")
    return StageError(f"no val/ folder in {images} for the reference batch: add one or set evaluate.ref_batch")


def layout(pc: PipelineConfig) -> Layout:
    """The run's layout; ``local_dir`` defaults to the run root when that is local."""
    root = to_url(pc.output)
    local = pc.local_dir or local_path(root)
    if local is None:
        raise StageError(f"output {pc.output} is not local: give local_dir, a local folder shared by the Ray "
                         "nodes, for the synthetic data and the converted VAE")
    return Layout(root, os.path.abspath(os.path.expanduser(local.removeprefix("file://"))))


def plan_steps(pc: PipelineConfig) -> list[Step]:
    """The stage runs of the chain, in order, with the layout filling every path a section leaves out."""

    at = layout(pc)
    data = pc.images or at.data
    fill = filled_by_layout(at, data, pc.downstream is not None)
    steps: list[Step] = []
    if pc.synthetic is not None:
        if local_path(data) is None:
            raise StageError(f"images {data} is not local: the synthetic dataset is written to a local folder")
        steps.append(_step("synthetic", "synthetic", pc, fill, ()))
    elif pc.images is None:
        raise StageError("the pipeline config needs images (an ImageNet-layout folder) or a synthetic section")
    source = ("synthetic",) if pc.synthetic is not None else ()
    steps.append(_step("shard-train", "shard", pc, fill, source, {"split": "train"}))
    val = _has_val(pc, data)
    if val:
        steps.append(_step("shard-val", "shard", pc, fill, ("shard-train",), {"split": "val"}))
    steps += [_step("train-vae", "train_vae", pc, fill, ("shard-train",)),
              _step("convert", "convert", pc, fill, ("train-vae",)), _step("encode", "encode", pc, fill, ("convert",))]
    from pipelines.generator import generator_sections

    train_stage, train_sit, sample = generator_sections(pc.train_sit.given(), pc.sample.given(),
                                                        pc.sample_dit.model_dump(), family=pc.family)
    steps.append(Step("train-sit", train_stage, _config(train_stage, "train_sit", fill["train_sit"], train_sit),
                      ("encode",)))
    steps.append(Step("sample", "sample", _config("sample", "sample", fill["sample"], sample), ("train-sit",)))
    evaluate_after = ("sample",)
    if pc.evaluate.ref_batch is None:
        if not val:
            raise _no_val(data)
        steps.append(_step("make-reference", "make_reference", pc, fill, ("shard-val",)))
        evaluate_after += ("make-reference",)
    steps.append(_step("evaluate", "evaluate", pc, fill, evaluate_after))
    if pc.downstream is not None:
        steps.append(_step("downstream", "downstream", pc, fill, ("sample",) + (("shard-val",) if val else ())))
    return steps


# ---------------------------------------------------------------------------------------------------
# Records of finished stage runs
# ---------------------------------------------------------------------------------------------------

def record_url(root: str, step: Step, folder: str = "pipeline") -> str:
    return join(to_url(root), folder, f"{step.name}.json")


def write_record(root: str, step: Step, seconds: float, summary: BaseModel | None = None,
                 folder: str = "pipeline") -> dict:
    """Note that ``step`` finished with its config and summary (written after the stage's own outputs)."""
    record = {"name": step.name, "stage": step.stage, "config": step.config.model_dump(mode="json"),
              "summary": summary.model_dump(mode="json") if summary is not None else None,
              "seconds": round(seconds, 3), "finished": time.time()}
    write_json(record_url(root, step, folder), record)
    return record


def same_config(saved: dict, step: Step) -> bool:
    """Whether a recorded config is ``step``'s: equal, where a setting added to the stage since reads as its
    default."""
    now, fields = step.config.model_dump(mode="json"), type(step.config).model_fields
    return set(saved) <= set(now) and all(
        saved[k] == v if k in saved else v == fields[k].get_default(call_default_factory=True)
        for k, v in now.items())


def recorded(root: str, step: Step, folder: str = "pipeline") -> dict | None:
    """The record of ``step``'s last finished run when it ran with the same config, else None."""
    record = read_json(record_url(root, step, folder))
    return record if record and same_config(record.get("config") or {}, step) else None


# ---------------------------------------------------------------------------------------------------
# Whether a step must run
# ---------------------------------------------------------------------------------------------------

def missing(root: str, step: Step) -> str | None:
    """Why ``step`` must run (its outputs or its record of the same config are missing), or None to skip it."""
    why = outputs_missing(step.stage, step.config)
    if why:
        return why
    if not read_json(record_url(root, step)):
        return "no record of a finished run"
    return None if recorded(root, step) else "the config changed since the last run"
