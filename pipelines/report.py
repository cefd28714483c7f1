"""The markdown run report: data, VAE (teacher, perceptual loss), latent store, SiT, samples and metrics.

``write_report`` reads only what the stages left on storage (manifest, provenance, store attributes,
``log.jsonl`` files, the samples ``.npz`` and ``metrics.json``), so it describes a run whether its stages
ran now or earlier. It writes ``report.md`` with, beside it, ``loss_curves_vae.png``, ``loss_curves_sit.png``
(matplotlib, from the logs), ``samples_grid.png`` (one row per class) and ``vae_reconstructions.png``, and
``report.html``: the same report as one page a browser opens by itself, its pictures inside (``data:`` URLs).
Every metric is listed with the feature space it was measured in: ``FD_effnet`` is a Frechet distance in
EfficientNet-Lite0 features, never FID.
"""
from __future__ import annotations

import base64
import html
import posixpath
import re
import time

import numpy as np
from pydantic import BaseModel, Field

from pipelines.checkpoints import read_log
from pipelines.config import OptionalShards, StageConfig
from pipelines.npz import npz_head, npz_shape
from pipelines.render import NON_CURVES, class_grid, loss_curves
from storage.fs import exists, join, list_files, read_bytes, to_url, write_bytes_atomic
from storage.markers import read_json

GRID_CLASSES, GRID_PER_CLASS, GRID_POOL = 10, 8, 2048


class ReportConfig(StageConfig):
    """Where a run's artifacts are; each part is optional and left out of the report when absent."""

    output: str = Field(description="folder (URL) to write report.md and its PNGs into")
    title: str = Field("ReaLS run report", description="report heading")
    shards: OptionalShards = Field(None, description="shards URL holding manifest.json")
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
    page: str = Field(description="report.html: the report as a self-contained page")
    images: dict[str, str] = Field(description="image name -> URL")
    metrics: dict[str, float]
    markdown: str


# ---------------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------------

def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(x).replace("|", "/") for x in r) + " |" for r in rows]
    return lines + [""]


def _data_section(shards: str) -> list[str]:
    manifest = read_json(join(to_url(shards), "manifest.json"))
    if not manifest:
        return []
    rows = [[s, v["count"], len(v["shards"]), v.get("skipped", 0)] for s, v in manifest["splits"].items()]
    return ["## Data", "", f"{manifest['num_classes']} classes at {manifest['resolution']} px "
            f"({manifest['image_format']}), from `{to_url(shards)}`.", "",
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


def _training_section(name: str, run: str, stage: str, save, png: str) -> list[str]:
    """A run's last logged interval and its loss curves (saved as ``png``)."""
    entries = read_log(join(to_url(run), "log.jsonl"))
    if not entries:
        return []
    curve = save(png, loss_curves(entries, stage))
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


IMAGE_REF = re.compile(r"!\[([^\]]*)\]\(([^)\s:]+\.png)\)")  # ![alt](name.png): a picture beside the report
PAGE_STYLE = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;line-height:1.45}"
              "table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:.25em .6em}"
              "th{background:#f3f3f3}img{max-width:100%;image-rendering:pixelated}code{background:#f3f3f3}")


def page(title: str, text: str, pictures: dict[str, bytes]) -> str:
    """The markdown ``text`` as one HTML page; its ``![alt](name.png)`` pictures (``pictures``: name -> PNG)
    inside it as ``data:`` URLs."""
    from markdown_it import MarkdownIt

    def embed(m: re.Match) -> str:
        data = pictures.get(m.group(2))
        return f"![{m.group(1)}](data:image/png;base64,{base64.b64encode(data).decode()})" if data else m.group(0)

    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(IMAGE_REF.sub(embed, text))
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{PAGE_STYLE}</style></head>\n<body>\n{body}</body></html>\n")


def write_report(config: ReportConfig) -> ReportSummary:
    """Write ``report.md``, its PNGs and ``report.html`` under ``config.output``; parts whose inputs are absent are
    left out."""
    out = to_url(config.output)
    images: dict[str, str] = {}
    pictures: dict[str, bytes] = {}

    def save(name: str, data: bytes | None) -> str | None:
        if data is None:
            return None
        write_bytes_atomic(join(out, name), data)
        images[name.removesuffix(".png")] = join(out, name)
        pictures[name] = data
        return name

    lines = [f"# {config.title}", "", f"Written {time.strftime('%Y-%m-%d %H:%M:%S %Z')}.", ""]
    if config.stages:
        lines += ["## Pipeline", ""]
        lines += _table(["stage", "status", "seconds"],
                        [[s.get("stage"), s.get("status"), s.get("seconds", "")] for s in config.stages])
    if config.shards:
        lines += _data_section(config.shards)
    if config.vae_dir:
        lines += _vae_section(config.vae_dir)
    if config.vae_run:
        lines += _training_section("VAE training", config.vae_run, "train-vae", save, "loss_curves_vae.png")
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
        lines += _training_section(f"{family} training" + (f" ({config.model})" if config.model else ""),
                                   config.sit_run, f"train-{family.lower()}", save, "loss_curves_sit.png")
    if config.samples and npz_shape(config.samples):
        shape = npz_shape(config.samples)
        pool = npz_head(config.samples, "arr_0", GRID_POOL)
        labels = npz_head(config.samples, "arr_1", len(pool)) if npz_shape(config.samples, "arr_1") else \
            np.zeros(len(pool), np.int64)
        name = save("samples_grid.png", class_grid(pool, labels, GRID_CLASSES, GRID_PER_CLASS))
        lines += ["## Samples", "", f"{shape[0]} samples of {'x'.join(map(str, shape[1:]))} in "
                  f"`{to_url(config.samples)}`; one row per class:", "", f"![samples]({name})", ""]
    values: dict[str, float] = {}
    if config.metrics:
        section, values = _metrics_section(config.metrics)
        lines += section
    if config.downstream and exists(join(to_url(config.downstream), "report.md")):
        lines += _downstream_section(to_url(config.downstream), save)
    text = "\n".join(lines).rstrip() + "\n"
    report, html_page = join(out, "report.md"), join(out, "report.html")
    write_bytes_atomic(report, text.encode())
    write_bytes_atomic(html_page, page(config.title, text, pictures).encode())
    return ReportSummary(report=report, page=html_page, images=images, metrics=values, markdown=text)
