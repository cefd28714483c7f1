"""The markdown run report: data, VAE (teacher, perceptual loss), latent store, SiT, samples and metrics.

``write_report`` reads only what the stages left on storage (manifest, provenance, store attributes,
``log.jsonl`` files, the samples ``.npz`` and ``metrics.json``), so it describes a run whether its stages
ran now or earlier. It writes ``report.md`` with, beside it, ``loss_curves_vae.png``, ``loss_curves_sit.png``
(matplotlib, from the logs), ``samples_grid.png`` (one row per class) and ``vae_reconstructions.png``.
Every metric is listed with the feature space it was measured in: ``FD_effnet`` is a Frechet distance in
EfficientNet-Lite0 features, never FID.
"""
from __future__ import annotations

import io
import posixpath
import time
import zipfile

import numpy as np
from pydantic import BaseModel, Field

from pipelines.checkpoints import read_log
from pipelines.config import StageConfig
from storage.fs import exists, filesystem, join, list_files, read_bytes, to_url, write_bytes_atomic
from storage.markers import read_json

NON_CURVES = {"step", "epoch", "time", "lr", "seconds", "steps_per_sec", "samples_per_sec", "images_per_sec"}
GRID_CLASSES, GRID_PER_CLASS, GRID_POOL = 10, 8, 2048
PANELS = ("losses", "cosine alignment with the teacher", "gradient norm")


class ReportConfig(StageConfig):
    """Where a run's artifacts are; each part is optional and left out of the report when absent."""

    output: str = Field(description="folder (URL) to write report.md and its PNGs into")
    title: str = Field("ReaLS run report", description="report heading")
    data_path: str | None = Field(None, description="dataset URL holding manifest.json")
    vae_run: str | None = Field(None, description="train-vae run folder (log.jsonl, samples/)")
    vae_dir: str | None = Field(None, description="converted ReaLS VAE directory (provenance.json)")
    store: str | None = Field(None, description="latent store URL")
    sit_run: str | None = Field(None, description="train-sit or train-dit run folder (log.jsonl)")
    model: str | None = Field(None, description="the generator trained in sit_run, e.g. SiT-XL/2 or DiT-XL/2")
    samples: str | None = Field(None, description="samples .npz (ADM layout)")
    metrics: str | None = Field(None, description="metrics.json from `reals evaluate`")
    downstream: str | None = Field(None, description="output folder of `reals downstream` (report.md, overlays)")
    stages: list[dict] = Field(default_factory=list, description="pipeline rows: stage, status, seconds")


class ReportSummary(BaseModel):
    report: str
    images: dict[str, str] = Field(description="image name -> URL")
    metrics: dict[str, float]
    markdown: str


# ---------------------------------------------------------------------------------------------------
# npz access without loading whole arrays
# ---------------------------------------------------------------------------------------------------

def _npy_header(f) -> tuple[tuple[int, ...], np.dtype]:
    major, _ = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(f)
    if fortran:
        raise ValueError("Fortran-ordered arrays are not supported")
    return shape, dtype


def npz_shape(url: str, name: str = "arr_0") -> tuple[int, ...] | None:
    """The shape of one array of an ``.npz`` (its header only), or None when the file or array is absent."""
    if not exists(url):
        return None
    fs, path = filesystem(url)
    with fs.open(path, "rb") as raw, zipfile.ZipFile(raw) as z:
        if f"{name}.npy" not in z.namelist():
            return None
        with z.open(f"{name}.npy") as f:
            return _npy_header(f)[0]


def npz_head(url: str, name: str, n: int) -> np.ndarray:
    """The first ``n`` rows of one array of an ``.npz``, read without loading the rest."""
    fs, path = filesystem(url)
    with fs.open(path, "rb") as raw, zipfile.ZipFile(raw) as z, z.open(f"{name}.npy") as f:
        shape, dtype = _npy_header(f)
        n = min(n, shape[0])
        row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        return np.frombuffer(f.read(n * row), dtype=dtype).reshape((n, *shape[1:]))


# ---------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------

def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def loss_curves_png(entries: list[dict], title: str) -> bytes | None:
    """Curves of a ``log.jsonl``: losses, cosine alignment and gradient norms in separate panels; None if empty."""
    from matplotlib.figure import Figure

    series: dict[str, list[tuple[float, float]]] = {}
    for e in entries:
        for k, v in e.items():
            if isinstance(v, int | float) and k not in NON_CURVES:
                series.setdefault(k, []).append((e["step"], float(v)))
    series = {k: pts for k, pts in sorted(series.items()) if any(v != 0 for _, v in pts)}
    if not series:
        return None
    panels: dict[str, list[str]] = {name: [] for name in PANELS}
    for k in series:
        panels[PANELS[1] if k.endswith("_cos") else PANELS[2] if k.endswith("_norm") else PANELS[0]].append(k)
    panels = {name: keys for name, keys in panels.items() if keys}
    fig = Figure(figsize=(5.5 * len(panels), 3.6))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, keys) in zip(axes, panels.items()):
        for k in keys:
            ax.plot([p[0] for p in series[k]], [p[1] for p in series[k]], label=k, linewidth=1.2)
        values = [v for k in keys for _, v in series[k]]
        if name != PANELS[1] and min(values) > 0 and max(values) > 10 * min(values):
            ax.set_yscale("log")
        ax.set(xlabel="step", title=name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    return _png(fig)


def class_grid_png(images: np.ndarray, labels: np.ndarray, classes: int = GRID_CLASSES,
                   per_class: int = GRID_PER_CLASS) -> bytes:
    """One row per class (the lowest class ids present), up to ``per_class`` samples each."""
    from PIL import Image

    h, w, c = images.shape[1:]
    scale = max(1, 64 // h)  # small images are shown enlarged (nearest neighbour)
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    h, w = h * scale, w * scale
    rows = []
    for k in sorted(set(labels.tolist()))[:classes]:
        picked = images[labels == k][:per_class]
        row = np.zeros((per_class, h, w, c), np.uint8)
        row[:len(picked)] = picked
        rows.append(np.concatenate(list(row), axis=1))
    buf = io.BytesIO()
    Image.fromarray(np.concatenate(rows, axis=0)).save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------------

def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(x).replace("|", "/") for x in r) + " |" for r in rows]
    return lines + [""]


def _data_section(data_path: str) -> list[str]:
    manifest = read_json(join(to_url(data_path), "manifest.json"))
    if not manifest:
        return []
    rows = [[s, v["count"], len(v["shards"]), v.get("skipped", 0)] for s, v in manifest["splits"].items()]
    return ["## Data", "", f"{manifest['num_classes']} classes at {manifest['resolution']} px "
            f"({manifest['image_format']}), from `{to_url(data_path)}`.", "",
            *_table(["split", "images", "shards", "files skipped"], rows)]


def _vae_section(vae_dir: str) -> list[str]:
    prov = read_json(join(to_url(vae_dir), "provenance.json"))
    if not prov:
        return []
    teacher = prov.get("teacher") or {}
    perceptual = prov.get("perceptual") or "unknown"
    lines = ["## VAE", "",
             f"- architecture: {prov.get('vae_config')}, latents {'x'.join(map(str, prov.get('latent_shape', [])))} "
             f"(downsampling x{prov.get('downsample_factor')}), fingerprint `{prov.get('fingerprint')}`",
             f"- teacher: {teacher.get('description', teacher) if isinstance(teacher, dict) else teacher}",
             f"- alignment weight: {prov.get('align_weight')}",
             f"- perceptual loss: {perceptual}"]
    if not perceptual.startswith("LPIPS"):
        lines.append("  (LPIPS was not used: its ImageNet backbone weights cannot be downloaded offline)")
    training = prov.get("training") or {}
    stats = prov.get("latent_statistics") or {}
    lines += [f"- trained for {training.get('step')} steps (`{training.get('run')}`)",
              f"- latent statistics over {stats.get('num_images')} images: {stats.get('normalisation')}", ""]
    return lines


def _store_section(store: str) -> list[str]:
    from storage.latent_store import LatentStore

    try:
        s = LatentStore.open(store)
    except Exception:  # noqa: BLE001 - a missing or half-written store is left out of the report
        return []
    done = int(s.done_rows().sum())
    return ["## Latent store", "", f"`{s.url}`: {done} of {s.num_samples} rows encoded, latents "
            f"{'x'.join(map(str, s.latent_shape))}, horizontal flips {'stored' if s.has_flip else 'not stored'}.", ""]


def _training_section(name: str, run: str, curve: str | None) -> list[str]:
    entries = read_log(join(to_url(run), "log.jsonl"))
    if not entries:
        return []
    last = entries[-1]
    shown = {k: v for k, v in last.items() if k not in NON_CURVES}
    lines = [f"## {name}", "", f"{last['step']} steps logged in `{join(to_url(run), 'log.jsonl')}`; last interval: "
             + ", ".join(f"{k} {_fmt(v)}" for k, v in sorted(shown.items())), ""]
    if curve:
        lines += [f"![{name} loss curves]({curve})", ""]
    return lines


def _metrics_section(metrics_url: str) -> tuple[list[str], dict[str, float]]:
    report = read_json(metrics_url)
    if not report:
        return [], {}
    rows, values = [], {}
    for name, m in report["metrics"].items():
        values[name] = float(m["value"])
        rows.append([name, float(m["value"]), m.get("feature_space"), m.get("extractor"), m.get("weights"),
                     m.get("num_samples"), m.get("num_reference")])
    lines = ["## Metrics", "", f"{report.get('num_samples')} samples against {report.get('num_reference')} reference "
             f"images (`{report.get('ref_batch')}`). Each number names the feature space it was measured in; "
             "`FD_<space>` is a Frechet distance in that network's features, not FID, and is not comparable "
             "with published FID.", "",
             *_table(["metric", "value", "feature space", "extractor", "weights", "samples", "reference"], rows)]
    for space, info in report.get("feature_spaces", {}).items():
        if info.get("status") == "skipped":
            lines.append(f"- {space} not computed: {info.get('reason')}")
    lines += [f"- note: {n}" for n in report.get("notes", [])]
    return lines + [""], values


# ---------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------

def _downstream_section(folder: str, save) -> list[str]:
    """The downstream stage's own report, its headings demoted one level, with its overlays."""
    body = read_bytes(join(folder, "report.md")).decode().splitlines()
    lines = ["## Downstream (training-free segmentation and depth)", ""]
    lines += ["#" + line if line.startswith("#") else line for line in body if not line.startswith("# ")]
    for name in ("overlays_real", "overlays_generated"):
        if exists(join(folder, f"{name}.png")):
            lines += ["", f"![{name.replace('_', ' ')}]({save(f'downstream_{name}.png', read_bytes(join(folder, name + '.png')))})"]
    return lines + [""]


def write_report(config: ReportConfig) -> ReportSummary:
    """Write ``report.md`` and its PNGs under ``config.output``; parts whose inputs are absent are left out."""
    out = to_url(config.output)
    images: dict[str, str] = {}

    def save(name: str, data: bytes | None) -> str | None:
        if data is None:
            return None
        write_bytes_atomic(join(out, name), data)
        images[name.removesuffix(".png")] = join(out, name)
        return name

    lines = [f"# {config.title}", "", f"Written {time.strftime('%Y-%m-%d %H:%M:%S %Z')}.", ""]
    if config.stages:
        lines += ["## Pipeline", ""]
        lines += _table(["stage", "status", "seconds"],
                        [[s.get("stage"), s.get("status"), s.get("seconds", "")] for s in config.stages])
    if config.data_path:
        lines += _data_section(config.data_path)
    if config.vae_dir:
        lines += _vae_section(config.vae_dir)
    if config.vae_run:
        curve = save("loss_curves_vae.png", loss_curves_png(read_log(join(to_url(config.vae_run), "log.jsonl")),
                                                            "train-vae"))
        lines += _training_section("VAE training", config.vae_run, curve)
        grids = list_files(join(to_url(config.vae_run), "samples"), ".png")
        if grids:
            name = save("vae_reconstructions.png", read_bytes(grids[-1]))
            lines += [f"Originals (top) and reconstructions (bottom) at step "
                      f"{posixpath.basename(grids[-1]).removesuffix('.png').lstrip('0') or 0}:", "",
                      f"![VAE reconstructions]({name})", ""]
    if config.store:
        lines += _store_section(config.store)
    if config.sit_run:
        family = (config.model or "SiT").split("-", 1)[0]
        curve = save("loss_curves_sit.png", loss_curves_png(read_log(join(to_url(config.sit_run), "log.jsonl")),
                                                            f"train-{family.lower()}"))
        lines += _training_section(f"{family} training" + (f" ({config.model})" if config.model else ""),
                                   config.sit_run, curve)
    if config.samples and npz_shape(config.samples):
        shape = npz_shape(config.samples)
        pool = npz_head(config.samples, "arr_0", GRID_POOL)
        labels = npz_head(config.samples, "arr_1", len(pool)) if npz_shape(config.samples, "arr_1") else \
            np.zeros(len(pool), np.int64)
        name = save("samples_grid.png", class_grid_png(pool, labels))
        lines += ["## Samples", "", f"{shape[0]} samples of {'x'.join(map(str, shape[1:]))} in "
                  f"`{to_url(config.samples)}`; one row per class:", "", f"![samples]({name})", ""]
    values: dict[str, float] = {}
    if config.metrics:
        section, values = _metrics_section(config.metrics)
        lines += section
    if config.downstream and exists(join(to_url(config.downstream), "report.md")):
        lines += _downstream_section(to_url(config.downstream), save)
    text = "\n".join(lines).rstrip() + "\n"
    report = join(out, "report.md")
    write_bytes_atomic(report, text.encode())
    return ReportSummary(report=report, images=images, metrics=values, markdown=text)
