"""The markdown run report: one part per stage of the run, in the order of its plan.

``write_report`` asks each step's stage for its part (``report`` in the stage registry), and every part reads only
what its stage left on storage (manifest, provenance, store attributes, ``log.jsonl`` files, the samples ``.npz``,
``metrics.json``), so the report describes a run whether its stages ran now or earlier. It writes ``report.md``
with its PNGs beside it, and ``report.html``: the same report as one page a browser opens by itself, its pictures
inside (``data:`` URLs). Every metric is listed with the feature space it was measured in: ``FD_effnet`` is a
Frechet distance in EfficientNet-Lite0 features, never FID.
"""
from __future__ import annotations

import base64
import html
import re
import time

from pydantic import BaseModel, Field

from pipelines.config import StageConfig
from pipelines.registry import stage
from pipelines.report_parts import table_lines
from storage.fs import join, to_url, write_bytes_atomic


class ReportStep(BaseModel):
    """One step of the run: its stage and its config's fields."""

    stage: str
    config: dict


class ReportConfig(StageConfig):
    """A run's steps; each stage's part is left out of the report when its outputs are absent."""

    output: str = Field(description="folder (URL) to write report.md and its PNGs into")
    title: str = Field("ReaLS run report", description="report heading")
    steps: list[ReportStep] = Field(default_factory=list, description="the run's steps in plan order")
    stages: list[dict] = Field(default_factory=list, description="pipeline rows: stage, status, seconds")


class ReportSummary(BaseModel):
    report: str
    page: str = Field(description="report.html: the report as a self-contained page")
    images: dict[str, str] = Field(description="image name -> URL")
    metrics: dict[str, float]
    markdown: str


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
    """Write ``report.md``, its PNGs and ``report.html`` under ``config.output``: the pipeline's table, then each
    stage's part (once per stage, from its first step)."""
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
        lines += table_lines(["stage", "status", "seconds"],
                             [[s.get("stage"), s.get("status"), s.get("seconds", "")] for s in config.stages])
    values: dict[str, float] = {}
    for name in dict.fromkeys(step.stage for step in config.steps):
        record = stage(name)
        if record.report is None:
            continue
        first = next(step for step in config.steps if step.stage == name)
        part = record.report(record.config.model_validate(first.config), save)
        if part is not None:
            lines += part.lines
            values.update(part.metrics)
    text = "\n".join(lines).rstrip() + "\n"
    report, html_page = join(out, "report.md"), join(out, "report.html")
    write_bytes_atomic(report, text.encode())
    write_bytes_atomic(html_page, page(config.title, text, pictures).encode())
    return ReportSummary(report=report, page=html_page, images=images, metrics=values, markdown=text)
