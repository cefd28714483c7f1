"""How a plan's steps run: one after another as Prefect subflows (``reals pipeline``), or phase by phase as Ray
tasks (``reals experiment``). Both take the steps of ``pipelines.chain.plan`` and give back each step's record
(``flows.records``): the plan is one, where its steps run is the executor's choice.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

import torch
from prefect import tags, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed

from flows.records import missing, record_url, recorded, same_config, write_record
from flows.runtime import run_name
from flows.stages import STAGE_FLOWS
from pipelines import StageError
from pipelines.chain import Step, phases, produced
from pipelines.experiment import config_differences
from pipelines.registry import stage
from storage.markers import read_json

SKIPPED = "skipped (complete)"


class Executor(Protocol):
    def run(self, steps: list[Step]) -> dict[str, dict]:
        """Run the steps (in plan order, each after those it reads from); every step's record by name."""


# ---------------------------------------------------------------------------------------------------
# Prefect subflows
# ---------------------------------------------------------------------------------------------------

@task(task_run_name="{name}: skipped (complete)", cache_policy=NO_CACHE, persist_result=False)
def skipped(name: str):
    """Shows in the run that a stage was not started because its outputs are complete."""
    return Completed(name="Skipped", message=f"{name}: {SKIPPED}")


def run_step(step: Step, nproc_per_node: int = 1, name: str | None = None):
    """Start the stage flow of ``step`` as a subflow tagged with its stage, named ``name`` or
    ``<step> <where it writes> <start>`` (the step is the stage, or the stage and its split: ``shard-val``)."""
    where = next(iter(produced(step).values()), "")
    stage_flow = STAGE_FLOWS[step.stage].with_options(
        flow_run_name=name or run_name(lambda c: f"{step.name} {where}".rstrip()))
    with tags(f"stage:{step.stage}"):
        if stage(step.stage).runs_on == "train":
            return stage_flow(step.config, nproc_per_node=nproc_per_node)
        return stage_flow(step.config)


class Subflows:
    """Each step as a subflow of the running flow, in plan order, its record under ``<root>/pipeline``. A step is
    skipped when its outputs are complete and recorded with the same config, unless a step it reads from ran."""

    def __init__(self, root: str, nproc_per_node: int = 1):
        self.root, self.nproc_per_node = root, nproc_per_node

    def run(self, steps: list[Step]) -> dict[str, dict]:
        records: dict[str, dict] = {}
        for step in steps:
            upstream = [name for name in step.after if records.get(name, {}).get("status") == "ran"]
            why = f"{upstream[0]} ran" if upstream else missing(self.root, step)
            if why is None:
                skipped(step.name)
                print(f"{step.name}: {SKIPPED}")
                records[step.name] = {"name": step.name, "status": SKIPPED, "seconds": 0.0, "reason": ""}
                continue
            print(f"{step.name}: running ({why})")
            t0 = time.perf_counter()
            summary = run_step(step, self.nproc_per_node)
            record = write_record(self.root, step, time.perf_counter() - t0, summary)
            records[step.name] = {**record, "status": "ran", "reason": why}
        return records


# ---------------------------------------------------------------------------------------------------
# Ray tasks
# ---------------------------------------------------------------------------------------------------

def cpus(step: Step) -> int:
    """CPUs a step's Ray task reserves: none for a Ray driver (its own tasks or actors take them), else one."""
    return 0 if stage(step.stage).runs_on == "ray" else 1


def run_in_task(step: Step, root: str, folder: str) -> dict:
    """Run one step in this process (one torch thread) and write its record last; errors come back as text."""
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    try:
        summary = stage(step.stage).run(step.config)
    except Exception as e:  # noqa: BLE001 - reported per step by the driver, the other steps go on
        return {"name": step.name, "error": f"{type(e).__name__}: {e}"}
    return write_record(root, step, time.perf_counter() - t0, summary, folder)


class _Submitter:
    """``remote(step)`` starts the step's Ray task with the step's CPUs (what ``map_units`` calls)."""

    def __init__(self, root: str, folder: str):
        import ray

        self.root, self.folder = root, folder
        self.fn = ray.remote(max_retries=0)(run_in_task)  # map_units re-submits steps lost with their node

    def remote(self, step: Step):
        return self.fn.options(num_cpus=cpus(step)).remote(step, self.root, self.folder)


class RayTasks:
    """The steps phase by phase (``pipelines.chain.phases``), each phase's steps side by side as Ray tasks with
    one torch thread, their records under ``<root>/records``. A step recorded with the same config is reused; one
    recorded with other settings is refused before anything runs. ``describe(phase)`` names a phase."""

    FOLDER = "records"

    def __init__(self, root: str, show_progress: bool = True,
                 describe: Callable[[list[Step]], str] = lambda phase: ", ".join(s.name for s in phase)):
        self.root, self.show_progress, self.describe = root, show_progress, describe
        self.counts = {"run": 0, "reused": 0}
        self.phase_seconds: dict[str, float] = {}

    def refuse_changed(self, steps: list[Step]) -> None:
        """Raise when a step was recorded with other settings: its outputs would not match its config."""
        for step in steps:
            rec = read_json(record_url(self.root, step, self.FOLDER))
            if rec is not None and not same_config(rec["config"], step):
                diffs = config_differences(rec["config"], step.config.model_dump(mode="json"))
                raise StageError(f"{step.name} under {self.root} was run with other settings ({', '.join(diffs)}); "
                                 f"use another --output, or delete its outputs and {self.FOLDER}/{step.name}.json")

    def run(self, steps: list[Step]) -> dict[str, dict]:
        from pipelines.parallel import ensure_ray

        self.refuse_changed(steps)
        ensure_ray()
        records: dict[str, dict] = {}
        for phase in phases(steps):
            t = time.perf_counter()
            name = self.describe(phase)
            records.update(self.run_phase(phase, name))
            self.phase_seconds[name] = round(time.perf_counter() - t, 2)
        return records

    def run_phase(self, steps: list[Step], description: str) -> dict[str, dict]:
        """Run the steps not yet recorded with the same config, in parallel on Ray; their records by name."""
        import ray

        from pipelines.parallel import map_units

        records, todo = {}, []
        for step in steps:
            rec = recorded(self.root, step, self.FOLDER)
            if rec is not None:
                records[step.name] = rec
            else:
                todo.append(step)
        self.counts["reused"] += len(records)
        if todo:
            drivers = sum(cpus(s) == 0 for s in todo)
            limit = int(ray.cluster_resources().get("CPU", 1)) if drivers else None
            results = map_units(_Submitter(self.root, self.FOLDER), todo, f"{description} ({len(todo)})",
                                max_in_flight=limit, show_progress=self.show_progress)
            failed = [r for r in results if "error" in r]
            if failed:
                raise StageError(f"{len(failed)} of {len(todo)} {description} steps failed (first: "
                                 f"{failed[0]['name']}: {failed[0]['error']}); fix it and re-run: finished steps "
                                 "are kept")
            records.update({r["name"]: r for r in results})
            self.counts["run"] += len(todo)
        return records
