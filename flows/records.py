"""Records of finished steps, and whether a step must run.

A step is skipped when its stage says its outputs are complete (``missing`` in the stage registry) and the record
of its last successful run (``<output>/pipeline/<step>.json``) holds the same config. ``missing`` says why a step
must run.
"""
from __future__ import annotations

import time

from pydantic import BaseModel

from pipelines.chain import Step
from pipelines.registry import outputs_missing
from storage.fs import join, to_url
from storage.markers import read_json, write_json


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
