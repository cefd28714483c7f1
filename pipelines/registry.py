"""The stage registry: one record per stage, defined next to its code; the CLI, the flows and the experiment read it.

Each stage module defines ``STAGES = [Stage(...), ...]``. Adding a stage means writing its module and adding
its name to ``STAGE_MODULES``; nothing else names it.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Literal

from pydantic import BaseModel

from pipelines import StageError
from pipelines.config import StageConfig

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


@dataclass(frozen=True)
class Stage:
    """One stage: its config and summary models, what runs it, and how to tell it is done.

    ``runs_on``: ``ray`` (a driver that fans its units out to Ray itself, reserving no CPU), ``train`` (a
    training loop: Ray Train workers or torchrun's processes), ``task`` (one Ray task with the Ray options
    ``resources(config)`` declares, e.g. a GPU when the cluster has one), ``local`` (one process).
    ``complete(config)`` says what is missing from the stage's outputs, or None when they are complete;
    ``progress(config)`` gives a function returning the fraction done of a running stage, or None.
    ``show(summary)`` prints the summary for ``reals <stage>`` and may return an exit status.
    """

    name: str
    config: type[StageConfig]
    summary: type[BaseModel]
    run: Callable[[StageConfig], BaseModel]
    help: str
    description: str = ""
    runs_on: Literal["ray", "train", "task", "local"] = "local"
    complete: Callable[[StageConfig], str | None] | None = None
    progress: Callable[[StageConfig], Callable[[], float | None] | None] | None = None
    show: Callable[[BaseModel], int | None] | None = None
    resources: Callable[[StageConfig], dict] | None = None
    epilog: str | None = None


@cache
def stages() -> dict[str, Stage]:
    """Every registered stage by name, in pipeline order."""
    out: dict[str, Stage] = {}
    for module in STAGE_MODULES:
        for record in importlib.import_module(module).STAGES:
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
    if record.complete is None:
        return f"{name} has no completeness check"
    try:
        return record.complete(config)
    except (StageError, OSError, KeyError, ValueError) as e:
        return f"outputs unreadable ({type(e).__name__}: {e})"
