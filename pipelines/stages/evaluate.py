"""Stage `evaluate`: sample quality of an ADM-layout samples .npz against a reference .npz, in every feature
space available offline; and `make-reference`: an ADM-layout reference .npz from our WebDataset shards.

Standard numbers (FID, sFID, IS, Precision, Recall) need the FID-Inception weights file; without it the
output says so plainly and the teacher-space distances (``FD_effnet``, ``FD_dinov2``) are still computed.
Every number in metrics.json carries its feature space, extractor, weights source and sample counts.
"""
from __future__ import annotations

import hashlib
import heapq
import os
from typing import Annotated, Literal

import numpy as np
from pydantic import Field
from rich.console import Console
from rich.table import Table

from pipelines import StageError
from pipelines.config import Cli, Shards, ShowProgress, StageConfig
from pipelines.devices import torch_device
from pipelines.placement import Placed, task_resources
from pipelines.npz import open_npz, write_npz
from pipelines.registry import Chain, Output, Stage
from pipelines.parallel import progress_bar
from pipelines.report_parts import Card, ReportPart, Save, markdown, table, table_lines
from reals import ReaLSError
from storage.fs import exists, to_url
from storage.markers import fingerprint, write_json

FeatureSpace = Literal["inception", "effnet", "dinov2"]
DEFAULT_SPACES: tuple[str, ...] = ("inception", "effnet", "dinov2")


# ---------------------------------------------------------------------------------------------------
# Configs and summaries
# ---------------------------------------------------------------------------------------------------

class EvaluateConfig(StageConfig):
    """Inputs of `reals evaluate`."""

    ref_batch: Annotated[str, Cli(positional=True)] = Field(description="reference .npz (ADM layout: arr_0 uint8 NHWC; optional mu/sigma/mu_s/sigma_s)")
    sample_batch: Annotated[str, Cli(positional=True)] = Field(description="samples .npz (ADM layout: arr_0 uint8 NHWC)")
    features: list[FeatureSpace] | None = Field(
        None, description="feature spaces; default: inception and dinov2 when their weights exist, effnet always")
    output: str | None = Field(None, description="metrics.json URL (default: the sample batch's name + .metrics.json)")
    batch_size: int = Field(64, ge=1, description="images per feature-extraction batch")
    device: str = Field("auto", description="torch device: auto, cpu, cuda, cuda:1, ...")
    nearest_k: int = Field(3, ge=1, description="k of the k-NN manifolds for precision/recall")
    split_size: int = Field(5000, ge=1, description="Inception Score split size")
    inception_weights: str | None = Field(
        None, description="FID-Inception weights file (default: $REALS_INCEPTION_WEIGHTS, then torch hub checkpoints)")
    resize: Literal["pytorch-fid", "tf"] = Field(
        "pytorch-fid", description="Inception input resize and normalisation: pytorch-fid's, or tf (the ADM "
                                   "evaluator's TF graph; use it against ADM's reference batches and numbers)")
    dinov2_model: str = Field("dinov2_vitl14_reg", description="teacher name for the dinov2 feature space")
    dinov2_weights_dir: str | None = Field(None, description="folder holding DINOv2 weights (default: the HF cache)")
    allow_resolution_mismatch: bool = Field(False, description="compare batches of different image sizes (each "
                                                               "feature network resizes its input); without it "
                                                               "they are refused")
    show_progress: ShowProgress = Field(True, description="show a progress bar")


class EvaluateSummary(Placed):
    output: str
    num_reference: int
    num_samples: int
    metrics: dict[str, dict] = Field(description="metric name -> {value, feature_space, extractor, weights, ...}")
    skipped: dict[str, str] = Field(description="feature space -> why it was not computed")
    notes: list[str] = []


class MakeReferenceConfig(StageConfig):
    """Inputs of `reals make-reference`."""

    shards: Shards = Field(description="shards URL (a folder with manifest.json, from `reals shard`)")
    split: str = Field("val", description="split to draw the reference images from")
    output: str = Field(description="reference .npz URL to write")
    num_samples: int | None = Field(None, ge=2, description="images to draw (a seeded uniform subset; default: all)")
    seed: int = Field(0, description="seed of the subset draw")
    batch_size: int = Field(64, ge=1, description="images per Inception batch for the statistics")
    device: str = Field("auto", description="torch device for the Inception statistics")
    inception_weights: str | None = Field(
        None, description="FID-Inception weights file (default: found as by evaluate; no statistics when absent)")
    resize: Literal["pytorch-fid", "tf"] = Field("pytorch-fid", description="Inception resize, as `evaluate --resize`")
    show_progress: ShowProgress = Field(True, description="show a progress bar")


class MakeReferenceSummary(Placed):
    output: str
    count: int
    resolution: list[int]
    skipped: int
    skipped_samples: list[str] = []
    statistics: bool
    note: str = ""
    reused: bool = False


# ---------------------------------------------------------------------------------------------------
# npz files by URL
# ---------------------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------------------------------

def _extractors(config: EvaluateConfig, device: str) -> tuple[list, dict[str, str]]:
    """The feature extractors that can be built; requested spaces fail loudly, default ones skip with a reason."""
    from reals.metrics.features import build_feature_extractor

    options = {
        "inception": {"weights": config.inception_weights, "resize": config.resize},
        "effnet": {},
        "dinov2": {"model": config.dinov2_model, "weights_dir": config.dinov2_weights_dir},
    }
    extractors, skipped = [], {}
    for space in dict.fromkeys(config.features or DEFAULT_SPACES):
        try:
            extractors.append(build_feature_extractor(space, device, **options[space]))
        except ReaLSError as e:
            if config.features:
                raise
            skipped[space] = str(e)
    if not extractors:
        raise StageError("no feature space is available: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    return extractors, skipped


def _activations(file, extractors, batch_size: int, bar, task) -> dict[str, dict[str, np.ndarray]]:
    """``{space: {activation name: [N, D]}}`` over every image of an npz, read once in batches."""
    from reals.metrics.reference import iter_images

    parts: dict[str, dict[str, list]] = {e.space: {name: [] for name in e.outputs} for e in extractors}
    for batch in iter_images(file, batch_size):
        for e in extractors:
            for name, value in e(batch).items():
                parts[e.space][name].append(value)
        bar.advance(task, len(batch))
    return {space: {k: np.concatenate(v) for k, v in acts.items()} for space, acts in parts.items()}


def _size(shape: tuple[int, ...]) -> str:
    return "x".join(str(n) for n in shape[1:])


def _default_output(sample_batch: str) -> str:
    base = sample_batch[:-4] if sample_batch.endswith(".npz") else sample_batch
    return f"{base}.metrics.json"


def run(config: EvaluateConfig) -> EvaluateSummary:
    """Compute every metric the available feature spaces allow and write metrics.json."""
    from reals.metrics.reference import image_shape, read_meta, read_stats
    from reals.metrics.suite import space_metrics

    device = torch_device(config.device)
    output = config.output or _default_output(config.sample_batch)
    with open_npz(config.ref_batch, "reference batch") as ref, open_npz(config.sample_batch, "sample batch") as smp:
        ref_shape, smp_shape = image_shape(ref), image_shape(smp)
        if ref_shape[1:] != smp_shape[1:] and not config.allow_resolution_mismatch:
            raise StageError(f"reference images are {_size(ref_shape)}, samples {_size(smp_shape)}: metrics compare "
                             "like with like; sample at the reference resolution, or pass "
                             "--allow-resolution-mismatch to let each feature network resize both")
        for name, shape in (("reference batch", ref_shape), ("sample batch", smp_shape)):
            if shape[0] <= config.nearest_k:
                raise StageError(f"{name} holds {shape[0]} images; precision/recall with k={config.nearest_k} "
                                 f"needs more than {config.nearest_k}")
        extractors, skipped = _extractors(config, device)
        with progress_bar(disable=not config.show_progress) as bar:
            acts_ref = _activations(ref, extractors, config.batch_size, bar,
                                    bar.add_task("reference activations", total=ref_shape[0]))
            acts_smp = _activations(smp, extractors, config.batch_size, bar,
                                    bar.add_task("sample activations", total=smp_shape[0]))
        ref_stats, ref_meta = read_stats(ref), read_meta(ref)

    notes = []
    # ADM's reference batches (no meta) hold statistics of the TF graph; ours say how they were made.
    made_with = ref_meta.get("inception_resize", "pytorch-fid" if ref_meta else "tf")
    if ref_stats and made_with != config.resize:
        notes.append(f"the reference batch's precomputed Inception statistics were made with the {made_with} resize, "
                     f"this run uses {config.resize}: they were NOT used; FID/sFID come from its images instead "
                     f"(pass --resize {made_with} to use them)")
        ref_stats = {}

    counts = {"num_reference": ref_shape[0], "num_samples": smp_shape[0]}
    metrics: dict[str, dict] = {}
    for e in extractors:
        stats = ref_stats if e.space == "inception" else None
        for record in space_metrics(e.space, acts_ref[e.space], acts_smp[e.space], stats,
                                    k=config.nearest_k, split_size=config.split_size, device=device):
            name = record.pop("metric")
            metrics[name] = {**record, **e.info(), **counts}
    if "inception" in skipped:
        notes.append("FID, sFID, IS, Precision and Recall were NOT computed: the FID-Inception weights are missing "
                     "(see feature_spaces.inception). FD_* numbers are Frechet distances in teacher feature spaces, "
                     "not FID, and are not comparable with published FID.")
    report = {
        "ref_batch": to_url(config.ref_batch),
        "sample_batch": to_url(config.sample_batch),
        **counts,
        "image_shape": {"reference": list(ref_shape[1:]), "samples": list(smp_shape[1:])},
        "metrics": metrics,
        "feature_spaces": {
            **{e.space: {"status": "computed", **e.info()} for e in extractors},
            **{space: {"status": "skipped", "reason": reason} for space, reason in skipped.items()},
        },
        "notes": notes,
        "config": config.model_dump(mode="json"),
    }
    write_json(output, report)
    return EvaluateSummary(output=to_url(output), **counts, metrics=metrics, skipped=skipped, notes=notes)


def show(summary: EvaluateSummary, console: Console | None = None) -> None:
    """One screen: a table of the numbers, then what was skipped and why."""
    console = console or Console()
    table = Table(title=f"{summary.num_samples} samples vs {summary.num_reference} reference images")
    table.add_column("metric", no_wrap=True)
    table.add_column("value", justify="right", no_wrap=True)
    table.add_column("feature space", no_wrap=True)
    table.add_column("weights", max_width=40, overflow="ellipsis", no_wrap=True)
    for name, m in summary.metrics.items():
        table.add_row(name, f"{m['value']:.4f}", m["feature_space"], os.path.basename(m["weights"]))
    console.print(table)
    for space, reason in summary.skipped.items():
        console.print(f"[yellow]skipped {space}[/]: {reason}")
    for note in summary.notes:
        console.print(f"[bold yellow]note[/]: {note}")
    console.print(f"metrics written to {summary.output}")


# ---------------------------------------------------------------------------------------------------
# make-reference
# ---------------------------------------------------------------------------------------------------

def _priority(seed: int, key: str) -> int:
    """A seeded hash of a sample key: the subset is the ``num_samples`` keys of lowest priority."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big")


def _draw(urls: list[str], num_samples: int | None, seed: int, bad: list) -> list[dict]:
    """A seeded uniform subset of a split's samples (all when ``num_samples`` is None), sorted by key.

    The subset and its order depend only on the sample keys, never on shard order or on which other
    samples fail to decode.
    """
    from storage.shards import iter_shards

    heap: list = []
    shape = None
    for i, s in enumerate(iter_shards(urls, shuffle=0, split_by_worker=False, skipped=bad)):
        shape = shape or s["image"].shape
        if s["image"].shape != shape:
            bad.append((s["__key__"], f"image shape {s['image'].shape} differs from {shape}"))
            continue
        item = (-_priority(seed, s["__key__"]), s["__key__"], i, s)
        if num_samples is None or len(heap) < num_samples:
            heapq.heappush(heap, item)
        elif item[0] > heap[0][0]:
            heapq.heapreplace(heap, item)
    return [item[-1] for item in sorted(heap, key=lambda t: t[1:3])]


def _inception_statistics(images: np.ndarray, config: MakeReferenceConfig) -> tuple[dict, str, str]:
    """ADM statistics ``mu, sigma, mu_s, sigma_s`` of the images, or ``({}, "", why not)`` without weights."""
    from reals.metrics.features import InceptionFeatures
    from reals.metrics.frechet import activation_statistics

    try:
        extractor = InceptionFeatures(torch_device(config.device), weights=config.inception_weights,
                                      resize=config.resize)
    except ReaLSError as e:
        return {}, "", f"no Inception statistics written: {e}"
    pool, spatial = [], []
    with progress_bar(disable=not config.show_progress) as bar:
        task = bar.add_task("reference statistics", total=len(images))
        for start in range(0, len(images), config.batch_size):
            acts = extractor(images[start:start + config.batch_size])
            pool.append(acts["pool"])
            spatial.append(acts["spatial"])
            bar.advance(task, len(acts["pool"]))
    mu, sigma = activation_statistics(np.concatenate(pool))
    mu_s, sigma_s = activation_statistics(np.concatenate(spatial))
    return {"mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s}, extractor.weights, ""


def _inception_weights_exist(config: MakeReferenceConfig) -> bool:
    from reals.metrics.fid_inception import find_weights

    if config.inception_weights:
        return os.path.isfile(config.inception_weights)
    try:
        find_weights()
    except ReaLSError:
        return False
    return True


def make_reference(config: MakeReferenceConfig) -> MakeReferenceSummary:
    """Write an ADM-layout reference npz (images, labels, Inception statistics when possible) from shards."""
    from reals.metrics.reference import image_shape, read_meta, read_stats, write_reference
    from storage.shards import read_manifest, shard_urls

    manifest = read_manifest(config.shards)
    urls = shard_urls(config.shards, config.split)
    meta = {"source": to_url(config.shards), "split": config.split, "num_samples": config.num_samples,
            "seed": config.seed, "source_fingerprint": manifest.get("fingerprint"), "inception_resize": config.resize}
    if exists(config.output):
        with open_npz(config.output, "reference") as f:
            old, has_stats = read_meta(f), bool(read_stats(f))
            if {k: old.get(k) for k in meta} == meta and (has_stats or not _inception_weights_exist(config)):
                shape = image_shape(f)
                return MakeReferenceSummary(output=to_url(config.output), count=shape[0], resolution=list(shape[1:3]),
                                            skipped=old.get("skipped", 0), statistics=has_stats, reused=True)

    bad: list = []
    samples = _draw(urls, config.num_samples, config.seed, bad)
    if len(samples) < 2:
        raise StageError(f"split {config.split!r} of {config.shards} has {len(samples)} readable images; "
                         "need at least 2")
    images = np.empty((len(samples), *samples[0]["image"].shape), dtype=np.uint8)
    for i, s in enumerate(samples):
        images[i] = s.pop("image")
    labels = np.array([s["cls"] for s in samples], dtype=np.int64)
    stats, weights, note = _inception_statistics(images, config)
    meta.update(skipped=len(bad), count=len(images), inception_weights=weights,
                keys_fingerprint=fingerprint([s["__key__"] for s in samples]))
    write_npz(config.output, lambda f: write_reference(f, images, labels, stats, meta))
    return MakeReferenceSummary(output=to_url(config.output), count=len(images), resolution=list(images.shape[1:3]),
                                skipped=len(bad), skipped_samples=[f"{k}: {why}" for k, why in bad],
                                statistics=bool(stats), note=note)


# ---------------------------------------------------------------------------------------------------
# Stage records
# ---------------------------------------------------------------------------------------------------

def missing_outputs(config: EvaluateConfig) -> str | None:
    """Whether metrics.json exists and was computed with this config."""
    from storage.markers import read_json

    report = read_json(config.output) if config.output else None
    if not report:
        return "no metrics.json"
    return None if report.get("config") == config.model_dump(mode="json") else "metrics.json was computed with other settings"


def reference_missing(config: MakeReferenceConfig) -> str | None:
    """Whether the reference file exists."""
    from pipelines.npz import npz_shape

    return None if npz_shape(config.output) else "no reference file"


def show_reference(s: MakeReferenceSummary) -> None:
    what = "reused" if s.reused else "wrote"
    print(f"{what} {s.output}: {s.count} images at {s.resolution[0]}x{s.resolution[1]}, {s.skipped} skipped, "
          f"Inception statistics: {'yes' if s.statistics else 'no'}")
    for line in s.skipped_samples[:5]:
        print(f"  skipped {line}")
    if s.note:
        print(s.note)


def metric_rows(metrics: dict) -> list[dict]:
    """One row per number, each naming its feature space, extractor and weights."""
    return [{"metric": name, "value": round(float(m["value"]), 4), "feature space": m.get("feature_space"),
             "extractor": m.get("extractor"), "weights": m.get("weights"), "samples": m.get("num_samples"),
             "reference images": m.get("num_reference")} for name, m in metrics.items()]


def cards(summary: EvaluateSummary) -> list[Card]:
    """The metrics, and what was not computed and why."""
    out = [table("evaluate-metrics", metric_rows(summary.metrics),
                 "sample quality; FD_<space> is a Frechet distance in that teacher's feature space, not FID")]
    if summary.notes or summary.skipped:
        lines = [f"- **{space} skipped**: {why}" for space, why in summary.skipped.items()]
        lines += [f"- {note}" for note in summary.notes]
        out.append(markdown("evaluate-notes", "\n".join(lines), "what was not computed and why"))
    return out


def report(config: EvaluateConfig, save: Save) -> ReportPart | None:
    """Every metric with its feature space, extractor and weights; what was skipped and why."""
    from storage.markers import read_json

    metrics = read_json(to_url(config.output))
    if not metrics:
        return None
    rows, values = [], {}
    for name, m in metrics["metrics"].items():
        values[name] = float(m["value"])
        rows.append([name, float(m["value"]), m.get("feature_space"), m.get("extractor"), m.get("weights"),
                     m.get("num_samples"), m.get("num_reference")])
    lines = ["## Metrics", "", f"{metrics.get('num_samples')} samples against {metrics.get('num_reference')} "
             f"reference images (`{metrics.get('ref_batch')}`). Each number names the feature space it was measured "
             "in; `FD_<space>` is a Frechet distance in that network's features, not FID, and is not comparable "
             "with published FID.", "",
             *table_lines(["metric", "value", "feature space", "extractor", "weights", "samples", "reference"], rows)]
    for space, info in metrics.get("feature_spaces", {}).items():
        if info.get("status") == "skipped":
            lines.append(f"- {space} not computed: {info.get('reason')}")
    lines += [f"- note: {n}" for n in metrics.get("notes", [])]
    return ReportPart(lines + [""], values)


STAGES = [
    Stage("make-reference", MakeReferenceConfig, MakeReferenceSummary, make_reference, missing=reference_missing,
          show=show_reference, runs_on="task", resources=lambda c: task_resources(c.device),
          reads={"shards": "shards/{split}"}, writes={"output": Output("reference", "reference/{split}.npz")},
          chain=Chain("make_reference", "reference batch from the val split", sets={"split": "val"}),
          help="write an ADM-layout reference .npz from dataset shards",
          description="Draw a seeded uniform subset of a split's shards into an ADM-layout reference .npz (arr_0 "
                      "images, arr_1 labels, mu/sigma/mu_s/sigma_s when the FID-Inception weights exist)."),
    Stage("evaluate", EvaluateConfig, EvaluateSummary, run, missing=missing_outputs, show=show, cards=cards,
          report=report, runs_on="task", resources=lambda c: task_resources(c.device),
          reads={"ref_batch": "reference", "sample_batch": "samples"},
          writes={"output": Output("metrics", "metrics.json")},
          chain=Chain("evaluate", "metrics; set ref_batch to use a reference .npz of your own", target=True),
          help="FID, sFID, IS, precision/recall and teacher-space FDs of a samples .npz",
          description="Compare a samples .npz with a reference .npz (both ADM layout) in every available feature "
                      "space: FID, sFID, IS, Precision, Recall with the FID-Inception weights; FD_effnet (always) "
                      "and FD_dinov2 (DINOv2 weights) otherwise. Writes metrics.json and prints a table."),
]
