"""The stage registry: one record per stage, defined next to its code; the CLI, the flows, the plan and the report
read it.

Each stage module defines ``STAGES = [Stage(...), ...]``. Adding a stage means writing its module and adding its
name to ``STAGE_MODULES`` (or, for a stage of your own outside this package, to ``$REALS_STAGE_MODULES``); nothing
else names it. What a stage reads and writes is declared by role (``reads``, ``writes``), so ``pipelines.chain``
places it in a chain, lays out its outputs and fills its inputs.
"""
from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Literal

from pydantic import BaseModel

from pipelines import StageError
from pipelines.config import StageConfig
from pipelines.report_parts import Card, ReportPart

# Stage modules in pipeline order.
STAGE_MODULES = [
    "pipelines.stages.synthetic",
    "pipelines.stages.shard",
    "pipelines.stages.train_vae",
    "pipelines.stages.convert",
    "pipelines.stages.encode",
    "pipelines.stages.verify_store",
    "pipelines.stages.migrate_store",
    "pipelines.stages.train_sit",
    "pipelines.stages.import_checkpoint",
    "pipelines.stages.sample",
    "pipelines.stages.evaluate",
    "pipelines.stages.train_evaluator",
    "pipelines.stages.assess",
    "pipelines.stages.downstream",
]
EXTRA_MODULES_VAR = "REALS_STAGE_MODULES"  # comma-separated modules of stages of your own, registered after ours


@dataclass(frozen=True)
class Output:
    """What a stage writes through one config field: its ``role``, its default ``path`` under a run root (under the
    run's local folder when ``local``), and the boolean field that switches it on, if any (``when``)."""

    role: str
    path: str
    local: bool = False
    when: str | None = None


@dataclass(frozen=True)
class Chain:
    """How a stage joins the chain of ``reals pipeline``: its ``section`` of the pipeline config (stages of one
    generator share one), the values the chain runs it with (``sets``; a section's own value wins), one step per
    split (``splits``), whether it runs only when its section is given (``optional``), whether it is an end of the
    chain that the plan works back from (``target``), and a check of its config before anything runs."""

    section: str
    description: str
    sets: Mapping[str, Any] = field(default_factory=dict)
    splits: tuple[str, ...] = ()
    optional: bool = False
    target: bool = False
    check: Callable[[StageConfig], None] | None = None


@dataclass(frozen=True)
class Stage:
    """One stage: its config and summary models, what runs it, what it reads and writes, and how it shows.

    ``runs_on``: ``ray`` (a driver that fans its units out to Ray itself, reserving no CPU), ``train`` (a
    training loop: Ray Train workers or torchrun's processes), ``task`` (one Ray task with the Ray options
    ``resources(config)`` declares, e.g. a GPU when the cluster has one), ``local`` (one process).
    ``reads``: config field -> the role (or roles) it reads, ``{field}`` standing for that field's value
    (``shards/{split}``); ``writes``: config field -> ``Output``.
    ``missing(config)`` says what is missing from the stage's outputs, or None when they are complete;
    ``progress(config)`` gives a function returning the fraction done of a running stage, or None.
    ``show(summary)`` prints the summary for ``reals <stage>`` and may return an exit status; ``cards(summary)``
    are its cards in the Prefect UI (default: the summary as a table); ``report(config, save)`` its part of the
    run report.
    """

    name: str
    config: type[StageConfig]
    summary: type[BaseModel]
    run: Callable[[StageConfig], BaseModel]
    help: str
    description: str = ""
    runs_on: Literal["ray", "train", "task", "local"] = "local"
    reads: Mapping[str, str | tuple[str, ...]] = field(default_factory=dict)
    writes: Mapping[str, Output] = field(default_factory=dict)
    chain: Chain | None = None
    missing: Callable[[StageConfig], str | None] | None = None
    progress: Callable[[StageConfig], Callable[[], float | None] | None] | None = None
    show: Callable[[BaseModel], int | None] | None = None
    cards: Callable[[BaseModel], list[Card]] | None = None
    report: Callable[[StageConfig, Callable[[str, bytes | None], str | None]], ReportPart | None] | None = None
    resources: Callable[[StageConfig], dict] | None = None
    epilog: str | None = None


def stage_modules() -> list[str]:
    """Our stage modules, then those named in ``$REALS_STAGE_MODULES``."""
    extra = [m.strip() for m in os.environ.get(EXTRA_MODULES_VAR, "").split(",") if m.strip()]
    return STAGE_MODULES + [m for m in extra if m not in STAGE_MODULES]


@cache
def stages() -> dict[str, Stage]:
    """Every registered stage by name, in pipeline order."""
    out: dict[str, Stage] = {}
    for module in stage_modules():
        try:
            records = importlib.import_module(module).STAGES
        except (ImportError, AttributeError) as e:
            raise StageError(f"stage module {module} cannot be registered ({type(e).__name__}: {e}); it must be "
                             f"importable on every node and define STAGES") from None
        for record in records:
            out[record.name] = record
    return out


def stage(name: str) -> Stage:
    """The record of stage ``name``."""
    try:
        return stages()[name]
    except KeyError:
        raise StageError(f"unknown stage {name!r}; stages: {', '.join(stages())}") from None


def outputs_missing(name: str, config: StageConfig) -> str | None:
    """What is missing from a stage run's outputs, or None when they are complete (no check: always missing)."""
    record = stage(name)
    if record.missing is None:
        return f"{name} has no completeness check"
    try:
        return record.missing(config)
    except (StageError, OSError, KeyError, ValueError) as e:
        return f"outputs unreadable ({type(e).__name__}: {e})"
