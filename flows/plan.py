"""The chain as data: the pipeline config, each stage's config under one run root, and what "complete" means.

A stage counts as complete when its outputs are (markers, checkpoints at max steps, files) and the pipeline's
record of its last successful run (``<output>/pipeline/<stage>.json``) holds the same config. ``missing``
says what is not there yet; ``progress_probe`` reads how far a running stage has got.
"""
from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipelines import StageError
from pipelines.checkpoints import latest_checkpoint, load_checkpoint, read_log, resolve_checkpoint
from pipelines.config import StageConfig
from storage.fs import filesystem, join, list_files, to_url
from storage.markers import read_json, write_json

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


class PipelineConfig(BaseModel):
    """The whole chain: a run root, a data source, and per-stage settings (any field of that stage's config)."""

    model_config = ConfigDict(extra="forbid")

    output: str = Field("runs/demo", description="run root (local or s3://): every stage writes under it")
    local_dir: str | None = Field(None, description="local folder, shared by the Ray nodes, for what must be "
                                                    "local (synthetic data, the converted VAE); default: output")
    data_path: str | None = Field(None, description="ImageNet-layout folder with train/ and val/ (local, shared "
                                                    "by the Ray nodes); default: <local_dir>/data")
    nproc_per_node: int = Field(1, ge=1, description="training processes per node (torchrun when > 1)")
    synthetic: dict[str, Any] | None = Field(None, description="SyntheticConfig fields: when set, a synthetic "
                                                               "dataset is written to data_path first")
    shard: dict[str, Any] = Field(default_factory=dict, description="ShardConfig fields (both splits)")
    train_vae: dict[str, Any] = Field(default_factory=dict, description="TrainVAEConfig fields")
    convert: dict[str, Any] = Field(default_factory=dict, description="ConvertConfig fields")
    encode: dict[str, Any] = Field(default_factory=dict, description="EncodeConfig fields")
    train_sit: dict[str, Any] = Field(default_factory=dict, description="TrainSiTConfig fields")
    sample: dict[str, Any] = Field(default_factory=dict, description="SampleConfig fields")
    make_reference: dict[str, Any] = Field(default_factory=dict, description="MakeReferenceConfig fields")
    evaluate: dict[str, Any] = Field(default_factory=dict, description="EvaluateConfig fields")
    downstream: dict[str, Any] | None = Field(None, description="DownstreamConfig fields: when set (and the data "
                                                                "has masks/depth), segmentation and depth run last")


def load_pipeline_config(path: str | os.PathLike | None = None, **overrides) -> PipelineConfig:
    """A PipelineConfig from YAML (default: the embedded demo config), with top-level overrides."""
    import yaml

    path = Path(path or DEMO_CONFIG)
    if not path.is_file():
        raise StageError(f"pipeline config not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return PipelineConfig(**data)
    except ValidationError as e:
        first = e.errors()[0]
        raise StageError(f"invalid pipeline config {path} {'.'.join(map(str, first['loc']))}: {first['msg']}") from None


# ---------------------------------------------------------------------------------------------------
# Layout and stage configs
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    """Where each stage writes: under the run root, or under the local folder for what must be local."""

    root: str
    local: str

    @property
    def data(self) -> str:
        return os.path.join(self.local, "data")

    @property
    def vae_dir(self) -> str:
        return os.path.join(self.local, "vae-dir")

    @property
    def shards(self) -> str:
        return join(self.root, "shards")

    @property
    def vae_run(self) -> str:
        return join(self.root, "vae")

    @property
    def store(self) -> str:
        return join(self.root, "latents")

    @property
    def sit_run(self) -> str:
        return join(self.root, "sit")

    @property
    def samples(self) -> str:
        return join(self.root, "samples", "samples.npz")

    @property
    def reference(self) -> str:
        return join(self.root, "reference", "val.npz")

    @property
    def metrics(self) -> str:
        return join(self.root, "metrics.json")

    @property
    def report(self) -> str:
        return join(self.root, "report")

    @property
    def downstream(self) -> str:
        return join(self.root, "downstream")


@dataclass(frozen=True)
class Step:
    """One stage run of the chain: its name in the run, which stage it is, its config, what it depends on."""

    name: str
    stage: str
    config: StageConfig
    after: tuple[str, ...]


def _config(cls: type[StageConfig], section: str, layout_values: dict, given: dict, fixed: dict | None = None):
    try:
        return cls(**{**layout_values, **given, **(fixed or {})})
    except ValidationError as e:
        first = e.errors()[0]
        raise StageError(f"invalid pipeline section {section}.{'.'.join(map(str, first['loc']))}: "
                         f"{first['msg']}") from None


def _has_val(pc: PipelineConfig, data_path: str) -> bool:
    if pc.synthetic is not None:
        return int(pc.synthetic.get("val_per_class", 0)) > 0
    return os.path.isdir(os.path.join(data_path.removeprefix("file://"), "val"))


def layout(pc: PipelineConfig) -> Layout:
    """The run's layout; ``local_dir`` defaults to the run root when that is local."""
    root = to_url(pc.output)
    local = pc.local_dir
    if local is None:
        fs, path = filesystem(root)
        if "file" not in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
            raise StageError(f"output {pc.output} is not local: give local_dir, a local folder shared by the Ray "
                             "nodes, for the synthetic data and the converted VAE")
        local = path
    return Layout(root, os.path.abspath(os.path.expanduser(local.removeprefix("file://"))))


def plan_steps(pc: PipelineConfig) -> list[Step]:
    """The stage runs of the chain, in order, with the layout filling every path a section leaves out."""
    from pipelines.convert import ConvertConfig
    from pipelines.downstream import DownstreamConfig
    from pipelines.encode import EncodeConfig
    from pipelines.evaluate import EvaluateConfig, MakeReferenceConfig
    from pipelines.sample import SampleConfig
    from pipelines.shard import ShardConfig
    from pipelines.synthetic import SyntheticConfig
    from pipelines.train_sit import TrainSiTConfig
    from pipelines.train_vae import TrainVAEConfig

    at = layout(pc)
    data = pc.data_path or at.data
    steps: list[Step] = []
    if pc.synthetic is not None:
        if "://" in data and not data.startswith("file://"):
            raise StageError(f"data_path {data} is not local: the synthetic dataset is written to a local folder")
        steps.append(Step("synthetic", "synthetic", _config(SyntheticConfig, "synthetic", {"output": data},
                                                            pc.synthetic), ()))
    elif pc.data_path is None:
        raise StageError("the pipeline config needs data_path (an ImageNet-layout folder) or a synthetic section")
    source = ("synthetic",) if pc.synthetic is not None else ()
    steps.append(Step("shard-train", "shard", _config(ShardConfig, "shard", {"data_path": data, "output": at.shards},
                                                      pc.shard, {"split": "train"}), source))
    val = _has_val(pc, data)
    if val:
        steps.append(Step("shard-val", "shard", _config(ShardConfig, "shard", {"data_path": data, "output": at.shards},
                                                        pc.shard, {"split": "val"}), ("shard-train",)))
    steps.append(Step("train-vae", "train-vae", _config(TrainVAEConfig, "train_vae", {
        "data_path": at.shards, "output": at.vae_run, "resume": True}, pc.train_vae), ("shard-train",)))
    steps.append(Step("convert", "convert", _config(ConvertConfig, "convert", {
        "ckpt": at.vae_run, "output_dir": at.vae_dir, "data_path": at.shards}, pc.convert), ("train-vae",)))
    steps.append(Step("encode", "encode", _config(EncodeConfig, "encode", {
        "data_path": at.shards, "vae_path": at.vae_dir, "output": at.store}, pc.encode), ("convert",)))
    steps.append(Step("train-sit", "train-sit", _config(TrainSiTConfig, "train_sit", {
        "data_path": at.store, "output": at.sit_run, "resume": True}, pc.train_sit), ("encode",)))
    steps.append(Step("sample", "sample", _config(SampleConfig, "sample", {
        "mode": "ODE", "ckpt": at.sit_run, "vae_path": at.vae_dir, "output": at.samples,
        "save_latents": pc.downstream is not None}, pc.sample), ("train-sit",)))
    evaluate_after = ("sample",)
    if "ref_batch" not in pc.evaluate:
        if not val:
            raise StageError(f"no val split in {data} for the reference: add a val/ folder or set evaluate.ref_batch")
        steps.append(Step("make-reference", "make-reference", _config(MakeReferenceConfig, "make_reference", {
            "data_path": at.shards, "split": "val", "output": at.reference}, pc.make_reference), ("shard-val",)))
        evaluate_after += ("make-reference",)
    steps.append(Step("evaluate", "evaluate", _config(EvaluateConfig, "evaluate", {
        "ref_batch": at.reference, "sample_batch": at.samples, "output": at.metrics}, pc.evaluate), evaluate_after))
    if pc.downstream is not None:
        steps.append(Step("downstream", "downstream", _config(DownstreamConfig, "downstream", {
            "tasks": ["seg", "depth"], "data_path": data, "vae_path": at.vae_dir, "output": at.downstream,
            "samples": at.samples}, pc.downstream), ("sample",) + (("shard-val",) if val else ())))
    return steps


# ---------------------------------------------------------------------------------------------------
# Records of finished stage runs
# ---------------------------------------------------------------------------------------------------

def record_url(root: str, step: Step) -> str:
    return join(to_url(root), "pipeline", f"{step.name}.json")


def write_record(root: str, step: Step, seconds: float) -> None:
    """Note that ``step`` finished with its config (written after the stage's own outputs)."""
    write_json(record_url(root, step), {"stage": step.stage, "config": step.config.model_dump(mode="json"),
                                        "seconds": round(seconds, 3), "finished": time.time()})


# ---------------------------------------------------------------------------------------------------
# Completeness of outputs
# ---------------------------------------------------------------------------------------------------

def _synthetic(c) -> str | None:
    root = Path(c.output)
    if not (root / "LOC_synset_mapping.txt").is_file():
        return "no LOC_synset_mapping.txt"
    for split, per_class in (("train", c.per_class), ("val", c.val_per_class)):
        found = sum(1 for _ in (root / split).glob("*/*.JPEG")) if per_class else 0
        if found != per_class * c.classes:
            return f"{found} of {per_class * c.classes} {split} images"
    return None


def _shard(c) -> str | None:
    from pipelines.shard import plan, shard_name

    manifest = read_json(join(to_url(c.output), "manifest.json"))
    info = (manifest or {}).get("splits", {}).get(c.split)
    if not info:
        return f"no split {c.split!r} in manifest.json"
    if (manifest["resolution"], manifest["image_format"], info["shard_size"]) != (c.resolution, c.image_format,
                                                                                  c.shard_size):
        return "manifest.json was written with other settings"
    _, units, _, split_fingerprint = plan(c)
    if info.get("fingerprint") != split_fingerprint or len(units) != len(info["shards"]):
        return f"the {c.split} folder changed since it was sharded"
    for u in units:
        marker = read_json(join(to_url(c.output), shard_name(c.split, u["index"]) + ".json"))
        if not marker or marker.get("unit") != u["fingerprint"]:
            return f"shard {shard_name(c.split, u['index'])} has no current marker"
    return None


def _training(c, epochs: int | None) -> str | None:
    latest = latest_checkpoint(to_url(c.output))
    if latest is None:
        return "no checkpoint"
    pointer = read_json(join(to_url(c.output), "latest.json")) or {}
    if c.max_steps is not None:
        step = pointer.get("step")
        if step is None:
            step = load_checkpoint(latest)["step"]
        return None if step >= c.max_steps else f"checkpoint at step {step} of {c.max_steps}"
    if epochs is None:
        return "neither max_steps nor epochs is set"
    done = load_checkpoint(latest)["epoch"]
    return None if done >= epochs else f"checkpoint after {done} of {epochs} epochs"


def _convert(c) -> str | None:
    from storage.markers import sha256_url

    out = Path(c.output_dir.removeprefix("file://")).expanduser()
    prov = read_json(str(out / "provenance.json"))
    if not prov or not (out / "mean_std.json").is_file():
        return "no converted VAE directory"
    conversion = prov.get("conversion", {})
    if conversion.get("checkpoint_sha256") != sha256_url(resolve_checkpoint(to_url(c.ckpt))):
        return "converted from another checkpoint"
    if (conversion.get("num_samples"), conversion.get("weights")) != (c.num_samples, "ema" if c.ema else "raw"):
        return "converted with other settings"
    return None


def _encode(c) -> str | None:
    from pipelines.encode import source_shards
    from storage.latent_store import LatentStore

    prov = read_json(join(to_url(c.vae_path), "provenance.json")) or {}
    fp = prov.get("fingerprint")
    if not fp or not LatentStore.has_version(c.output, fp):
        return "no store version for this VAE"
    store = _open_version(c.output, fp)
    _, shards = source_shards(c.data_path, c.split)
    entries = {e["name"]: e for e in store.shard_map}
    markers = store.markers()
    for s in shards:
        e = entries.get(s["name"])
        if e is None or not store.marker_agrees(markers.get(s["name"]), e, s["sha256"]):
            return f"shard {s['name']} not encoded"
    return None


def _open_version(root: str, fp: str):
    import warnings

    from storage.latent_store import LatentStore, MissingRowsWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MissingRowsWarning)
        return LatentStore.open(root, version=fp)


def _sample(c) -> str | None:
    from pipelines.report import npz_shape

    shape = npz_shape(c.output)
    if shape is None:
        return "no samples file"
    if shape[0] != c.num_fid_samples:
        return f"{shape[0]} of {c.num_fid_samples} samples"
    return None


def _make_reference(c) -> str | None:
    from pipelines.report import npz_shape

    return None if npz_shape(c.output) else "no reference file"


def _evaluate(c) -> str | None:
    report = read_json(c.output) if c.output else None
    if not report:
        return "no metrics.json"
    return None if report.get("config") == c.model_dump(mode="json") else "metrics.json was computed with other settings"


def _downstream(c) -> str | None:
    report = read_json(join(to_url(c.output), "metrics.json"))
    return None if report else "no downstream metrics.json"


OUTPUT_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "synthetic": _synthetic,
    "shard": _shard,
    "train-vae": lambda c: _training(c, c.max_epoch),
    "convert": _convert,
    "encode": _encode,
    "train-sit": lambda c: _training(c, c.epochs),
    "sample": _sample,
    "make-reference": _make_reference,
    "evaluate": _evaluate,
    "downstream": _downstream,
}


def outputs_missing(step: Step) -> str | None:
    """What is missing from ``step``'s outputs, or None when they are complete."""
    try:
        return OUTPUT_CHECKS[step.stage](step.config)
    except (StageError, OSError, KeyError, ValueError) as e:
        return f"outputs unreadable ({type(e).__name__}: {e})"


def missing(root: str, step: Step) -> str | None:
    """Why ``step`` must run (its outputs or its record of the same config are missing), or None to skip it."""
    why = outputs_missing(step)
    if why:
        return why
    record = read_json(record_url(root, step))
    if not record:
        return "no record of a finished run"
    if record.get("config") != step.config.model_dump(mode="json"):
        return "the config changed since the last run"
    return None


# ---------------------------------------------------------------------------------------------------
# Progress of a running stage
# ---------------------------------------------------------------------------------------------------

def _count(url: str, suffix: str, pattern: str = "") -> int:
    rx = re.compile(pattern)
    return sum(1 for u in list_files(url, suffix) if rx.search(u.rsplit("/", 1)[-1]))


def progress_probe(stage: str, c: StageConfig) -> Callable[[], float | None] | None:
    """A function giving the fraction done of a running stage (from its markers or log), or None."""
    if stage == "shard":
        from pipelines.shard import plan

        total = max(1, len(plan(c)[1]))
        return lambda: _count(to_url(c.output), ".json", rf"^{re.escape(c.split)}-\d{{6}}\.json$") / total
    if stage in ("train-vae", "train-sit") and c.max_steps:
        log = join(to_url(c.output), "log.jsonl")
        return lambda: (read_log(log) or [{"step": 0}])[-1]["step"] / c.max_steps
    if stage == "encode":
        from pipelines.encode import source_shards

        fp = (read_json(join(to_url(c.vae_path), "provenance.json")) or {}).get("fingerprint")
        total = max(1, len(source_shards(c.data_path, c.split)[1]))
        return (lambda: _count(join(to_url(c.output), fp, "markers"), ".json") / total) if fp else None
    if stage == "sample":
        total = math.ceil(c.num_fid_samples / c.unit_size)
        return lambda: _count(to_url(c.output) + ".parts", ".json") / total
    return None
