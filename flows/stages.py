"""One Prefect flow per registered stage; each takes the stage's pydantic config, so the Prefect UI renders it as a form.

The flows are built from ``pipelines.registry``: a stage that ``runs_on`` Ray runs its driver as a task on
the ``SharedRayTaskRunner`` (zero CPUs reserved: the driver fans its units out to Ray itself), retried on a
transient storage error (the stage skips the units already done); a measurement stage (``task``) runs as one
Ray task with the resources it declares (a GPU when the cluster has one); a training stage runs on Ray Train
(``pipelines.ray_train``: its ``num_workers``, ``use_gpu``, ... fields), or under torchrun on this host when
``nproc_per_node > 1``, or in the flow's process with ``launcher: local``; the others run in the flow's
process, which itself holds no training or measurement. Every flow
publishes its summary as artifacts. Each flow is a module attribute named ``<stage>_flow`` (``train_vae_flow``),
so that a deployment's entrypoint ``flows.stages:<stage>_flow`` loads it.
"""
from __future__ import annotations

import inspect
from contextlib import nullcontext

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect_ray.context import remote_options

from flows import artifacts
from flows.runtime import (
    SharedRayTaskRunner,
    attach_stage_logs,
    ray_worker_logs,
    retry_on_transient,
    run_name,
    run_torchrun,
)
from pipelines import ray_train
from pipelines.config import StageConfig
from pipelines.registry import Stage, stage, stages

RETRY_DELAYS = [10, 30, 90]
attach_stage_logs()  # here and in every Ray worker that runs a stage task (it imports this module)


def stage_function(name: str):
    """What a stage task runs: the registered stage's ``run``."""
    return stage(name).run


def progress_probe(name: str, config: StageConfig):
    """The stage's progress function for ``config``, or None."""
    record = stage(name)
    return record.progress(config) if record.progress else None


# ---------------------------------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------------------------------

@task(task_run_name="{stage}", cache_policy=NO_CACHE, persist_result=False, retries=len(RETRY_DELAYS),
      retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=retry_on_transient)
def batch_stage(stage: str, config: StageConfig):
    """A batch stage's driver (on Ray), with a live progress artifact; retried on transient storage errors."""
    probe = progress_probe(stage, config)
    with artifacts.progress(stage, f"{stage}: units done", probe) if probe else nullcontext():
        return stage_function(stage)(config)


@task(task_run_name="{stage}", cache_policy=NO_CACHE, persist_result=False)
def local_stage(stage: str, config: StageConfig, nproc_per_node: int = 1):
    """A stage in this process; a training stage on Ray Train, or under torchrun with ``nproc_per_node``
    processes on this host."""
    probe = progress_probe(stage, config)
    with artifacts.progress(stage, f"{stage}: steps done", probe) if probe else nullcontext():
        if nproc_per_node > 1:
            return stages()[stage].summary.model_validate(run_torchrun(stage, config, nproc_per_node))
        if ray_train.wanted(config, under_flow=True):
            return ray_train.fit(stage, config)
        return stage_function(stage)(config)


def on_ray(stage: str, config: StageConfig):
    """Run a batch stage's driver as a Ray task that reserves no CPU (its units take them), on this
    process's node: the driver outlives the loss of any other node, and sees this host's files."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    with remote_options(num_cpus=0, scheduling_strategy=here):
        return batch_stage.submit(stage, config).result()


def as_ray_task(name: str, config: StageConfig):
    """Run a measurement stage as one Ray task with the resources it declares (wherever Ray finds them)."""
    resources = stage(name).resources
    with remote_options(**(resources(config) if resources else {"num_cpus": 1})):
        return batch_stage.submit(name, config).result()


# ---------------------------------------------------------------------------------------------------
# Flows
# ---------------------------------------------------------------------------------------------------

def flow_name(stage_name: str) -> str:
    """The module attribute (and entrypoint) of a stage's flow: ``train-vae`` -> ``train_vae_flow``."""
    return stage_name.replace("-", "_") + "_flow"


def build_flow(record: Stage):
    """The Prefect flow of one stage: run it where it runs, then publish its summary."""
    def stage_flow(config, nproc_per_node: int = 1):
        if record.runs_on == "local":
            summary = local_stage(record.name, config, nproc_per_node)
        else:  # on Ray: its workers' warnings and errors in the run's log
            with ray_worker_logs(get_run_logger()):
                placed = {"ray": on_ray, "task": as_ray_task}.get(record.runs_on)
                summary = placed(record.name, config) if placed else local_stage(record.name, config, nproc_per_node)
        artifacts.publish(record, config, summary)
        return summary

    params = [inspect.Parameter("config", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=record.config)]
    if record.runs_on == "train":
        params.append(inspect.Parameter("nproc_per_node", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=1,
                                        annotation=int))
    stage_flow.__signature__ = inspect.Signature(params, return_annotation=record.summary)
    stage_flow.__annotations__ = {**{p.name: p.annotation for p in params}, "return": record.summary}
    stage_flow.__name__ = stage_flow.__qualname__ = flow_name(record.name)
    stage_flow.__doc__ = record.description or record.help
    runner = SharedRayTaskRunner() if record.runs_on in ("ray", "task") else None
    return flow(stage_flow, name=record.name, task_runner=runner, log_prints=True, description=record.help,
                flow_run_name=run_name(lambda c: " ".join(filter(None, [record.name, c.get("output") or c.get("output_dir")]))))


STAGE_FLOWS = {name: build_flow(record) for name, record in stages().items()}
globals().update({flow_name(name): f for name, f in STAGE_FLOWS.items()})
