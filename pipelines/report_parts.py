"""What a stage contributes to how a run shows: its cards in the Prefect UI and its part of the run report.

Both are plain data built from what the stage left on storage, so a stage module describes itself without
importing Prefect or the report writer (``flows.artifacts`` draws the cards, ``pipelines.report`` joins the parts).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from pipelines.checkpoints import read_log
from pipelines.render import NON_CURVES, loss_curves
from storage.fs import join, to_url

# save(name, png) writes a picture beside the report and returns the name to reference it by (None: no picture)
Save = Callable[[str, bytes | None], str | None]


@dataclass(frozen=True)
class Card:
    """One card in the Prefect UI: a table (``rows``), markdown (``text``) or a PNG on storage (``url``)."""

    kind: Literal["table", "markdown", "image"]
    key: str
    description: str
    rows: list[dict] = field(default_factory=list)
    text: str = ""
    url: str = ""


def table(key: str, rows: list[dict], description: str) -> Card:
    return Card("table", key, description, rows=rows)


def markdown(key: str, text: str, description: str) -> Card:
    return Card("markdown", key, description, text=text)


def image(key: str, url: str, description: str) -> Card:
    return Card("image", key, description, url=url)


@dataclass(frozen=True)
class ReportPart:
    """A stage's part of the run report: markdown lines, and the numbers it measured (name -> value)."""

    lines: list[str]
    metrics: dict[str, float] = field(default_factory=dict)


def fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def table_lines(header: list[str], rows: list[list]) -> list[str]:
    """A markdown table, then a blank line."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(x).replace("|", "/") for x in r) + " |" for r in rows]
    return lines + [""]


def training_part(title: str, run: str, stage: str, save: Save, png: str) -> ReportPart | None:
    """A training run's last logged interval and its loss curves (saved as ``png``); None before any log."""
    entries = read_log(join(to_url(run), "log.jsonl"))
    if not entries:
        return None
    curve = save(png, loss_curves(entries, stage))
    last = entries[-1]
    shown = {k: v for k, v in last.items() if k not in NON_CURVES}
    lines = [f"## {title}", "", f"{last['step']} steps logged in `{join(to_url(run), 'log.jsonl')}`; last interval: "
             + ", ".join(f"{k} {fmt(v)}" for k, v in sorted(shown.items())), ""]
    if curve:
        lines += [f"![{title} loss curves]({curve})", ""]
    return ReportPart(lines)
