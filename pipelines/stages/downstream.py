"""Training-free segmentation and depth from ReaLS latents (``reals downstream seg|depth``).

Linear heads (``reals.downstream``) are fitted in closed form (ridge) on the teacher's patch features of
``--num-fit`` labelled ``--fit-split`` images, or loaded from DINOv2's published heads (``--seg-head`` /
``--depth-head``), then evaluated on ``--num-eval`` held-out ``--eval-split`` images with three feature
sources side by side:

- ``teacher``: the head on the teacher's own features (the upper bound);
- ``reals``: the same head on ``semantic_features`` of the ReaLS latents (normalised posterior means
  through the alignment network): training-free, no decoding;
- ``baseline``: a head ridge-fitted directly on a plain VAE's latents (``--baseline-vae-path``: a
  diffusers AutoencoderKL dir or a ReaLS VAE dir, whose normalised latents are used), or on the ReaLS
  VAE's own latents when that flag is absent (the report says so).

Generated latents (``--samples``: the sampler's normalised latents, ``latents`` in the ``.npz`` or a
``.latents.npy`` beside it, or a ``.npy``) go through the same head as ``reals``, straight from the sampler.

Data: a synthetic folder (``reals synthetic``) or shards (``reals shard``) whose samples' ``.json`` name
their source path, with ground truth under ``--ground-truth`` (default: the synthetic folder itself):
``masks/<split>/<class-id>/<stem>.png`` (class index + 1, 0 background) and ``depth/...`` (drawing order).
Images get the ADM center crop at the VAE's resolution, ground truth the same crop (nearest). Depth
truth is the positive, distance-like ``1.5 ** -order``: background 1, each later shape 1.5x nearer, so
adjacent layers differ by a ratio of 1.5 and ``delta < 1.25`` counts pixels put on the right layer.
Images whose ground truth is missing are skipped and reported.

Heads for the teacher and ReaLS read tokens rescaled to a fixed norm (the alignment loss matches
directions only, see ``reals.downstream``); a published head gets the teacher's mean token norms over
the fit images. Its predictions are in its own label set or metres, so with a published head the
teacher and ReaLS are scored against each other (``agreement``), not against the dataset's truth.
Output: ``report.md`` (a table), ``overlays_real.png`` / ``overlays_generated.png`` (image, masks, depths
side by side) and ``metrics.json``, written last; a re-run with the same inputs reuses it.
"""
from __future__ import annotations

import json
import math
import os
from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import Field

from pipelines import StageError
from pipelines.config import Cli, Images, OptionalTeacher, ShowProgress, StageConfig, TeacherInputSize
from pipelines.devices import torch_device
from pipelines.placement import Placed, task_resources
from pipelines.downstream_data import DEPTH_RATIO, Dataset, depth_from_order, load_generated, truth_tensor
from pipelines.parallel import progress_bar
from pipelines.registry import Chain, Output, Stage
from pipelines.render import compose, overlay_rows
from pipelines.report_parts import Card, ReportPart, Save, image, markdown
from reals.images import to_uint8, to_unit_images
from storage import fs as sfs
from storage.markers import fingerprint, read_json, sha256_bytes, sha256_url, write_json

TASKS = ("seg", "depth")
SOURCES = ("teacher", "reals", "baseline")
SOURCE_TITLES = {"teacher": "teacher (upper bound)", "reals": "ReaLS latents (training-free)", "baseline": "baseline"}


class DownstreamConfig(StageConfig):
    """Settings of ``reals downstream``."""

    tasks: Annotated[list[Literal["seg", "depth"]], Cli(positional=True, metavar="seg|depth")] = Field(min_length=1, description="tasks to evaluate: seg, depth or both")
    images: Images = Field(description="synthetic folder (reals synthetic) or shards URL (reals shard)")
    vae_path: str = Field(description="converted ReaLS VAE directory (local)")
    output: str = Field(description="folder (URL) for report.md, metrics.json and the overlay PNGs")
    samples: str | None = Field(None, description="generated latents: .npz with `latents` (or a .latents.npy "
                                                  "beside it), or a .npy")
    baseline_vae_path: str | None = Field(None, description="plain VAE dir for the baseline (default: the ReaLS "
                                                            "VAE's own raw latents)")
    ground_truth: str | None = Field(None, description="folder with masks/ and depth/ (default: --data-path "
                                                       "when it is a synthetic folder)")
    seg_head: str | None = Field(None, description="DINOv2 published segmentation linear head (.pth) instead "
                                                   "of the ridge head")
    depth_head: str | None = Field(None, description="DINOv2 published depth linear head (.pth) instead of the "
                                                     "ridge head")
    fit_split: str = Field("train", pattern=r"^[A-Za-z0-9_-]+$", description="split the heads are fitted on")
    eval_split: str = Field("val", pattern=r"^[A-Za-z0-9_-]+$", description="held-out split evaluated")
    num_fit: int = Field(256, ge=2, description="images to fit the heads on (spread evenly over the split)")
    num_eval: int = Field(64, ge=1, description="held-out images (and generated latents) to evaluate")
    resolution: int | None = Field(None, ge=8, description="image side (default: the VAE's resolution)")
    ridge: float = Field(1e-3, gt=0, description="ridge penalty, relative to the mean feature variance")
    batch_size: int = Field(16, ge=1, description="images per forward pass")
    num_overlays: int = Field(8, ge=0, description="rows in each overlay PNG")
    teacher: OptionalTeacher = Field(None, description="teacher name (default: the VAE's provenance)")
    teacher_input_size: TeacherInputSize = Field(None, ge=1, description="teacher input size (default: the provenance)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where the models run")
    show_progress: ShowProgress = Field(True, description="show a progress bar")


class DownstreamSummary(Placed):
    """What ``reals downstream`` measured (``metrics[task][source]``)."""

    output: str
    tasks: list[str]
    teacher: str
    vae_fingerprint: str
    baseline: str
    heads: dict[str, str]
    fit_images: int
    eval_images: int
    generated: int
    skipped: list[str]
    metrics: dict[str, dict[str, dict]]
    agreement: dict[str, dict]
    generated_metrics: dict[str, dict]
    files: list[str]
    reused: bool = False


# ---------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------

def _fmt(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


METRIC_COLUMNS = {"seg": [("miou", "seg mIoU"), ("pixel_accuracy", "seg pixel acc")],
                  "depth": [("rmse", "depth RMSE"), ("delta1", "depth δ<1.25")]}


def report_markdown(s: DownstreamSummary, source_notes: dict[str, str]) -> str:
    """The summary as a markdown report: one table of sources x metrics, then notes."""
    cols = [c for t in s.tasks for c in METRIC_COLUMNS[t]]
    lines = ["# Training-free downstream tasks", "",
             f"Teacher: {s.teacher}. ReaLS VAE fingerprint `{s.vae_fingerprint}`. "
             f"Heads fitted on {s.fit_images} images, evaluated on {s.eval_images} held-out images.", "",
             "| source | features | " + " | ".join(label for _, label in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for source in SOURCES:
        if not any(source in s.metrics.get(t, {}) for t in s.tasks) and source not in source_notes:
            continue
        values = [_fmt(s.metrics.get(t, {}).get(source, {}).get(key)) for t in s.tasks for key, _ in METRIC_COLUMNS[t]]
        lines.append(f"| {SOURCE_TITLES[source]} | {source_notes.get(source, '')} | " + " | ".join(values) + " |")
    if s.agreement:
        values = [_fmt(s.agreement.get(t, {}).get(key)) for t in s.tasks for key, _ in METRIC_COLUMNS[t]]
        lines.append("| ReaLS vs teacher predictions | agreement (teacher predictions as truth) | "
                     + " | ".join(values) + " |")
    lines += ["", "Heads:"] + [f"- {t}: {h}" for t, h in s.heads.items()]
    lines += ["", f"Baseline: {s.baseline}.",
              f"Depth truth is `{DEPTH_RATIO} ** -(drawing order)` (background 1; δ<1.25 = right layer); "
              "mIoU includes the background class.", ""]
    if s.generated:
        lines.append(f"Generated latents: {s.generated}, through the alignment network (no decoding).")
        for t, m in s.generated_metrics.items():
            lines.append(f"- {t}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in m.items()))
        lines.append("")
    if s.skipped:
        lines += [f"Skipped {len(s.skipped)} images (first: {s.skipped[0]}).", ""]
    lines += ["Overlays: " + ", ".join(f for f in s.files if f.endswith(".png")), ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Stage
# ---------------------------------------------------------------------------------------------------

def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _file_digest(path: str | None) -> str | None:
    return sha256_url(sfs.to_url(path)) if path and sfs.exists(sfs.to_url(path)) else None


class Evaluation:
    """Holds the models and heads of one run; fits, evaluates and renders."""

    def __init__(self, cfg: DownstreamConfig):
        from pipelines.encoding import teacher_spec
        from reals.downstream import LatentFeatures
        from reals.teachers import build_teacher
        from reals.vae import ReaLSVAE

        self.cfg = cfg
        self.device = torch_device(cfg.device)
        self.data = Dataset(cfg.images, cfg.ground_truth)
        self.vae = ReaLSVAE.from_pretrained(cfg.vae_path).to(self.device).eval()
        spec = teacher_spec(self.vae.provenance, cfg.teacher, cfg.teacher_input_size)
        self.teacher = build_teacher(spec.name, input_size=spec.input_size, layer=spec.layer).to(self.device)
        self.vae.require_heads(f"reals downstream (VAE {cfg.vae_path})")
        if self.vae.align_net.teacher_width != self.teacher.width:
            raise StageError(f"the VAE's alignment network predicts {self.vae.align_net.teacher_width}-d features "
                             f"but teacher {self.teacher.name} gives {self.teacher.width}-d; pass the VAE's teacher")
        self.size = cfg.resolution or self.vae.resolution
        if self.size % self.vae.downsample_factor:
            raise StageError(f"resolution {self.size} is not a multiple of the VAE's downsample factor "
                             f"{self.vae.downsample_factor}")
        self.has_truth = self.data.truth_root is not None
        self.published = {"seg": cfg.seg_head, "depth": cfg.depth_head}
        missing = [t for t in cfg.tasks if not self.published[t] and not self.has_truth]
        if missing:
            raise StageError(f"no ground truth to fit the {'/'.join(missing)} head: give --ground-truth DIR (a "
                             f"synthetic folder with masks/ and depth/) or --{missing[0]}-head FILE (a DINOv2 head)")
        self.baseline = LatentFeatures(cfg.baseline_vae_path or cfg.vae_path, self.device,
                                       None if cfg.baseline_vae_path else self.vae)
        self.heads: dict[str, dict] = {t: {} for t in cfg.tasks}
        self.skipped: list[str] = []
        self.samples = load_generated(cfg.samples, cfg.num_eval) if cfg.samples else None
        c = self.vae.latent_channels
        if self.samples is not None and (self.samples[0].ndim != 4 or self.samples[0].shape[1] != c):
            raise StageError(f"--samples latents have shape {tuple(self.samples[0].shape)}, but the VAE "
                             f"{cfg.vae_path} has {c} latent channels (expected [N, {c}, h, w])")

    # -- describing -------------------------------------------------------------------------------------

    def baseline_note(self) -> str:
        if self.cfg.baseline_vae_path:
            kind = "normalised" if self.baseline.kind == "reals" else "raw (un-normalised)"
            return f"{kind} posterior-mean latents of {self.cfg.baseline_vae_path}, ridge heads fitted on them"
        return ("no --baseline-vae-path given: the ReaLS VAE's own normalised latents, without the alignment "
                "network, ridge heads fitted on them")

    def fingerprint(self) -> str:
        settings = self.cfg.model_dump(exclude={"output", "show_progress", "device"})
        return fingerprint({"settings": settings, "vae": self.vae.fingerprint, "baseline": self.baseline.fingerprint,
                            "data": self.data.fingerprint([self.cfg.fit_split, self.cfg.eval_split], self.cfg.tasks),
                            "samples": sha256_bytes(self.samples[0].tobytes()) if self.samples else None,
                            "seg_head": _file_digest(self.cfg.seg_head),
                            "depth_head": _file_digest(self.cfg.depth_head)})

    # -- fitting ----------------------------------------------------------------------------------------

    def fit(self) -> int:
        """Ridge-fit heads on the fit split (with truth) and calibrate published heads' token norms."""
        from reals.downstream import HeadFitter, load_dinov2_head

        for task in self.cfg.tasks:
            if self.published[task]:
                self.heads[task]["teacher"] = load_dinov2_head(self.published[task], task, self.teacher.name,
                                                               self.teacher.width).to(self.device)
        k = self.data.num_seg_classes
        fitters = {}
        for task in self.cfg.tasks if self.has_truth else ():
            if not self.published[task]:
                fitters[task, "teacher"] = HeadFitter(task, self.teacher.width, k, f"teacher {self.teacher.name}",
                                                      token_norm=1.0)
            fitters[task, "baseline"] = HeadFitter(task, self.baseline.channels, k, "baseline latents")
        examples = self.data.examples(self.cfg.fit_split, self.cfg.num_fit, self.size, self.cfg.tasks, self.skipped)
        if len(examples) < 2:
            raise StageError(f"only {len(examples)} usable images in split {self.cfg.fit_split!r} of "
                             f"{self.cfg.images} to fit the heads (need >= 2; see skipped files)")
        norms = torch.zeros(2, dtype=torch.float64)
        with progress_bar(disable=not self.cfg.show_progress) as bar:
            job = bar.add_task("fit heads", total=len(examples))
            for batch in _batches(examples, self.cfg.batch_size):
                x = to_unit_images(np.stack([e["image"] for e in batch]), self.device)
                patch, global_token = self.teacher(x)
                norms += torch.stack([patch.norm(dim=1).mean() * len(batch), global_token.norm(dim=1).sum()]).cpu()
                latents = self.baseline(x * 2 - 1) if fitters else None
                for (task, source), fitter in fitters.items():
                    truth = truth_tensor(task, [e["truth"][task] for e in batch]).to(self.device)
                    fitter.update(patch if source == "teacher" else latents, truth)
                bar.advance(job, len(batch))
        for (task, source), fitter in fitters.items():
            self.heads[task][source] = fitter.solve(self.cfg.ridge).to(self.device)
        token_norm, global_norm = (norms / len(examples)).tolist()
        for task in self.cfg.tasks:
            if self.published[task]:
                head = self.heads[task]["teacher"]
                head.token_norm, head.global_norm = token_norm, global_norm
        return len(examples)

    # -- evaluating -------------------------------------------------------------------------------------

    def evaluate(self) -> tuple[dict, dict, int, list[list[np.ndarray]], list[str]]:
        """Metrics per task and source, ReaLS-vs-teacher agreement, image count, overlay rows and labels."""
        from reals.downstream import METERS, SegmentationMeter

        examples = self.data.examples(self.cfg.eval_split, self.cfg.num_eval, self.size, self.cfg.tasks,
                                      self.skipped)
        if not examples:
            raise StageError(f"no usable images in split {self.cfg.eval_split!r} of {self.cfg.images}")

        def meter(task, head):
            return SegmentationMeter(head.num_classes) if task == "seg" else METERS[task]()

        meters = {t: {s: meter(t, self.heads[t]["baseline" if s == "baseline" else "teacher"])
                      for s in self.scored_sources(t)} for t in self.cfg.tasks}
        agree = {t: meter(t, self.heads[t]["teacher"]) for t in self.cfg.tasks}
        shown, columns = [], []
        with progress_bar(disable=not self.cfg.show_progress) as bar:
            job = bar.add_task("evaluate", total=len(examples))
            for batch in _batches(examples, self.cfg.batch_size):
                x = to_unit_images(np.stack([e["image"] for e in batch]), self.device)
                preds = self._predict_real(x)
                for task in self.cfg.tasks:
                    truth = truth_tensor(task, [e["truth"][task] for e in batch]) if self.has_truth else None
                    for source, m in meters[task].items():
                        m.update(preds[task][source].cpu(), truth)
                    agree[task].update(preds[task]["reals"].cpu(), preds[task]["teacher"].cpu())
                if len(shown) < self.cfg.num_overlays:
                    take = self.cfg.num_overlays - len(shown)
                    shown.extend(batch[:take])
                    columns.append({(t, s): preds[t][s][:take].cpu().numpy() for t in self.cfg.tasks
                                    for s in preds[t]})
                bar.advance(job, len(batch))
        metrics = {t: {s: m.compute() for s, m in meters[t].items()} for t in self.cfg.tasks}
        rows, labels = self._real_overlays(shown, columns)
        return metrics, {t: m.compute() for t, m in agree.items()}, len(examples), rows, labels

    def scored_sources(self, task: str) -> list[str]:
        """Sources scored against the truth: none without truth, only the baseline with a published head."""
        if not self.has_truth:
            return []
        return ["baseline"] if self.published[task] else list(SOURCES)

    @torch.no_grad()
    def _predict_real(self, x: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
        """Predictions ``[B, H, W]`` per task and source for images ``x`` in [0, 1]."""
        from reals.downstream import predict_from_latents

        size = tuple(x.shape[-2:])
        patch, global_token = self.teacher(x)
        z = self.vae.normalize(self.vae.encode(x * 2 - 1)[0])
        latents = z if self.baseline.vae is self.vae else self.baseline(x * 2 - 1)
        out = {}
        for task in self.cfg.tasks:
            heads = self.heads[task]
            out[task] = {"teacher": heads["teacher"].predict(patch, global_token, size),
                         "reals": predict_from_latents(self.vae, heads["teacher"], z, size)}
            if "baseline" in heads:
                out[task]["baseline"] = heads["baseline"].predict(latents, None, size)
        return out

    def _real_overlays(self, shown: list[dict], columns: list[dict]):
        if not shown:
            return [], []
        keys = list(columns[0])
        merged = {k: np.concatenate([c[k] for c in columns])[:len(shown)] for k in keys}
        cols = []
        for task in self.cfg.tasks:
            for source in [s for s in SOURCES if (task, s) in merged]:
                maps = merged[task, source]
                cols.append((task, f"{task} {'ReaLS' if source == 'reals' else source}", maps))
            if self.has_truth:
                truth = np.stack([e["truth"][task] for e in shown])
                cols.append((task, f"{task} truth", depth_from_order(truth) if task == "depth" else truth))
        images = np.stack([e["image"] for e in shown])
        return overlay_rows(images, cols), ["image"] + [c[1] for c in cols]

    # -- generated latents ------------------------------------------------------------------------------

    @torch.no_grad()
    def generated(self) -> tuple[int, dict, list[list[np.ndarray]], list[str]]:
        """Heads on the sampler's latents: count, label agreement (seg), overlay rows and labels."""
        from reals.downstream import predict_from_latents

        latents, labels, images = self.samples
        size = tuple(s * self.vae.downsample_factor for s in latents.shape[2:])
        preds = {t: [] for t in self.cfg.tasks}
        for start in range(0, len(latents), self.cfg.batch_size):
            z = torch.from_numpy(latents[start:start + self.cfg.batch_size]).to(self.device)
            for task in self.cfg.tasks:
                preds[task].append(predict_from_latents(self.vae, self.heads[task]["teacher"], z, size).cpu())
        preds = {t: torch.cat(p) for t, p in preds.items()}
        metrics = {}
        if "seg" in preds and labels is not None and not self.published["seg"]:
            fg = preds["seg"] > 0
            match = preds["seg"] == torch.as_tensor(labels, dtype=torch.int64)[:, None, None] + 1
            metrics["seg"] = {"foreground_share": float(fg.float().mean()),
                              "label_agreement": float(match.sum() / fg.sum().clamp(min=1))}
        n = min(self.cfg.num_overlays, len(latents))
        if not n:
            return len(latents), metrics, [], []
        shown = self._generated_images(latents[:n], images, size)
        cols = [(task, f"{task} ReaLS", preds[task][:n].numpy()) for task in self.cfg.tasks]
        return len(latents), metrics, overlay_rows(shown, cols), ["image"] + [c[1] for c in cols]

    @torch.no_grad()
    def _generated_images(self, latents: np.ndarray, images: np.ndarray | None, size) -> np.ndarray:
        """The samples' own images when the file has them, else the latents decoded (for display only)."""
        from PIL import Image

        if images is not None and len(images) >= len(latents):
            return np.stack([np.asarray(Image.fromarray(im).resize(size[::-1], Image.Resampling.BICUBIC))
                             for im in images[:len(latents)]])
        z = torch.from_numpy(latents).to(self.device)
        return to_uint8(self.vae.decode(self.vae.denormalize(z)))


def _describe_heads(ev: Evaluation) -> dict[str, str]:
    out = {}
    for task, heads in ev.heads.items():
        parts = [f"teacher/ReaLS: {heads['teacher'].source}"]
        if "baseline" in heads:
            parts.append(f"baseline: {heads['baseline'].source}")
        out[task] = "; ".join(parts)
    return out


def run(config: DownstreamConfig) -> DownstreamSummary:
    """Fit the heads, evaluate the three feature sources (and generated latents), write the report."""
    out = sfs.to_url(config.output)
    ev = Evaluation(config)
    digest = ev.fingerprint()
    previous = read_json(sfs.join(out, "metrics.json"))
    if previous and previous.get("fingerprint") == digest \
            and all(sfs.exists(sfs.join(out, f)) for f in previous.get("summary", {}).get("files", [])):
        return DownstreamSummary(**{**previous["summary"], "reused": True})

    fit_images = ev.fit()
    metrics, agreement, eval_images, rows, labels = ev.evaluate()
    panel = max(ev.size, 96)
    files = []
    if rows:
        sfs.write_bytes_atomic(sfs.join(out, "overlays_real.png"), compose(rows, labels, panel))
        files.append("overlays_real.png")
    generated, generated_metrics = 0, {}
    if config.samples:
        generated, generated_metrics, grows, glabels = ev.generated()
        if grows:
            sfs.write_bytes_atomic(sfs.join(out, "overlays_generated.png"), compose(grows, glabels, panel))
            files.append("overlays_generated.png")
    files += ["report.md", "metrics.json"]
    summary = DownstreamSummary(
        output=out, tasks=list(config.tasks), teacher=ev.teacher.description, vae_fingerprint=ev.vae.fingerprint,
        baseline=ev.baseline_note() if ev.has_truth else "none (no ground truth to fit it)",
        heads=_describe_heads(ev), fit_images=fit_images, eval_images=eval_images, generated=generated,
        skipped=ev.skipped, metrics=metrics, agreement=agreement, generated_metrics=generated_metrics, files=files)
    notes = {"teacher": f"{ev.teacher.name} patch tokens", "reals": "semantic_features(ReaLS latents) via align_net"}
    if ev.has_truth:
        notes["baseline"] = "ReaLS VAE latents, no align_net" if not config.baseline_vae_path \
            else f"latents of {os.path.basename(config.baseline_vae_path.rstrip('/'))}"
    sfs.write_bytes_atomic(sfs.join(out, "report.md"), report_markdown(summary, notes).encode())
    write_json(sfs.join(out, "metrics.json"), {"fingerprint": digest, "summary": json.loads(summary.model_dump_json())})
    return summary


def missing_outputs(config: DownstreamConfig) -> str | None:
    """Whether the downstream metrics.json is written."""
    return None if read_json(sfs.join(sfs.to_url(config.output), "metrics.json")) else "no downstream metrics.json"


def show(s: DownstreamSummary) -> None:
    """The metrics table on the console."""
    from rich.console import Console
    from rich.table import Table

    cols = [(t, key, label) for t in s.tasks for key, label in METRIC_COLUMNS[t]]
    table = Table(title=f"reals downstream {' '.join(s.tasks)}" + (" (reused)" if s.reused else ""))
    table.add_column("source")
    for _, _, label in cols:
        table.add_column(label, justify="right")
    for source in SOURCES:
        if any(source in s.metrics.get(t, {}) for t in s.tasks):
            values = [_fmt(s.metrics.get(t, {}).get(source, {}).get(k)) for t, k, _ in cols]
            table.add_row(SOURCE_TITLES[source], *values)
    if s.agreement:
        table.add_row("ReaLS vs teacher", *[_fmt(s.agreement.get(t, {}).get(k)) for t, k, _ in cols])
    console = Console()
    console.print(table)
    console.print(f"{s.fit_images} fit / {s.eval_images} eval images, {s.generated} generated latents, "
                  f"{len(s.skipped)} skipped; baseline: {s.baseline}", markup=False, highlight=False)
    console.print(f"-> {s.output}/report.md", markup=False, highlight=False)


OVERLAYS = ("overlays_real", "overlays_generated")


def cards(summary: DownstreamSummary) -> list[Card]:
    """The three-way segmentation/depth table and the overlays of real and generated images."""
    out = []
    report_md = sfs.join(summary.output, "report.md")
    if sfs.exists(report_md):
        out.append(markdown("downstream-report", sfs.read_bytes(report_md).decode(),
                            "training-free segmentation and depth"))
    for name in OVERLAYS:
        url = sfs.join(summary.output, f"{name}.png")
        if sfs.exists(url):
            out.append(image(f"downstream-{name.replace('_', '-')}", url, name.replace("_", " ")))
    return out


def report(config: DownstreamConfig, save: Save) -> ReportPart | None:
    """Its own report, headings demoted one level, with its overlays."""
    folder = sfs.to_url(config.output)
    if not sfs.exists(sfs.join(folder, "report.md")):
        return None
    body = sfs.read_bytes(sfs.join(folder, "report.md")).decode().splitlines()
    lines = ["## Downstream (training-free segmentation and depth)", ""]
    lines += ["#" + line if line.startswith("#") else line for line in body if not line.startswith("# ")]
    for name in OVERLAYS:
        png = sfs.join(folder, f"{name}.png")
        if sfs.exists(png):
            lines += ["", f"![{name.replace('_', ' ')}]({save(f'downstream_{name}.png', sfs.read_bytes(png))})"]
    return ReportPart(lines + [""])


STAGES = [Stage("downstream", DownstreamConfig, DownstreamSummary, run, missing=missing_outputs, show=show, cards=cards,
                report=report, runs_on="task", resources=lambda c: task_resources(c.device),
                reads={"images": "images", "vae_path": "vae_dir", "samples": "sample_latents"},
                writes={"output": Output("downstream", "downstream")},
                chain=Chain("downstream", "when set (and the data has masks and depth), segmentation and depth run "
                                          "last", sets={"tasks": ["seg", "depth"]}, optional=True, target=True),
                help="training-free segmentation/depth from ReaLS latents", description=__doc__.splitlines()[0])]
