"""Training stages as a Ray Train ``TorchTrainer``: each worker runs the stage's own loop as one DDP rank.

``fit(stage, config)`` starts ``num_workers`` Ray Train workers (gloo on CPU, NCCL with ``use_gpu``); every
worker calls the stage's ``run(config)``, which joins the process group Ray Train made (``pipelines.distributed``),
so ranks split the data exactly as under torchrun. Checkpoints are the stage's own, under its ``--output``
(local or S3): Ray Train reports none and keeps nothing of ours. A worker or node lost mid-run makes Ray Train
restart the whole group (``FailureConfig``, up to ``max_failures`` times); every attempt runs with ``resume``, so
it continues from the latest checkpoint, and exact resume gives the weights of an uninterrupted run. The workers
get the job's environment (storage settings included) as every Ray task does; nothing secret is put in the
trainer's config. Rank 0's ``pipelines`` log records come back to the driver (into the flow run's log) through a
small relay actor on the driver's node; rank 0's summary comes back as the training function's return value.
Ray Train's own ``storage_path`` is a temporary folder on the driver, removed after the run.
"""
from __future__ import annotations

import contextvars
import logging
import os
import shutil
import tempfile
import threading
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, Field

from pipelines import StageError, user_errors
from pipelines.config import Cli, StageConfig

LOGGER = logging.getLogger(__name__)
RELAY_POLL_S = 0.5
# Start-up waits Ray Train gives a worker group that cannot be placed, before the run gives up.
START_ATTEMPTS = 5


class RayTrainSettings(StageConfig):
    """How a training stage runs on Ray Train (its flags: ``--launcher``, ``--num-workers``, ``--use-gpu``, ...)."""

    launcher: Literal["auto", "ray", "local"] = Field(
        "auto", description="where training runs: ray (Ray Train workers on the cluster at RAY_ADDRESS, else on a "
                            "local Ray), local (this process; torchrun's ranks under torchrun), auto (ray under a "
                            "flow or when RAY_ADDRESS is set, else local)")
    num_workers: int = Field(1, ge=1, description="Ray Train workers, one DDP rank each")
    use_gpu: Annotated[bool | Literal["auto"], Cli(metavar="{auto,true,false}")] = Field(
        "auto", description="GPUs for the Ray Train workers (NCCL): auto (when the cluster has any), true or false "
                            "(CPU, gloo)")
    cpus_per_worker: float = Field(1.0, ge=0, description="CPUs each Ray Train worker reserves")
    gpus_per_worker: float = Field(1.0, gt=0, description="GPUs each Ray Train worker reserves when it uses GPUs")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="how Ray places the workers: PACK (few nodes), SPREAD (many nodes), STRICT_PACK (one "
                            "node), STRICT_SPREAD (one worker per node)")
    max_failures: int = Field(3, ge=0, description="restarts of the Ray Train workers after a lost worker or node, "
                                                   "each from the latest checkpoint")


# ---------------------------------------------------------------------------------------------------
# Whether a stage runs on Ray Train
# ---------------------------------------------------------------------------------------------------

def under_torchrun() -> bool:
    """Whether this process is one rank of a torchrun (or another launcher's) process group."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def wanted(config: BaseModel, under_flow: bool = False) -> bool:
    """Whether ``config`` (a training stage's) runs on Ray Train here: ``launcher`` ray, or auto under a flow or
    with ``RAY_ADDRESS`` set; never inside a torchrun rank."""
    launcher = getattr(config, "launcher", None)
    if launcher is None or launcher == "local" or under_torchrun():
        return False
    return launcher == "ray" or under_flow or bool(os.environ.get("RAY_ADDRESS"))


# ---------------------------------------------------------------------------------------------------
# Rank 0's log records to the driver
# ---------------------------------------------------------------------------------------------------

class LogRelay:
    """Holds rank 0's log records until the driver takes them, and the first user error any rank met (a Ray actor
    on the driver's node)."""

    def __init__(self):
        self.records: list[tuple[str, int, str]] = []
        self.error: str | None = None
        self.ranks: dict[int, dict] = {}

    def joined(self, rank: int, where: dict) -> None:
        self.ranks[rank] = where

    def placement(self) -> list[dict]:
        return [self.ranks[r] for r in sorted(self.ranks)]

    def fail(self, message: str) -> None:
        self.error = self.error or message

    def failure(self) -> str | None:
        return self.error

    def add(self, name: str, level: int, message: str) -> None:
        self.records.append((name, level, message))

    def take(self) -> list[tuple[str, int, str]]:
        out, self.records = self.records, []
        return out


class RelayHandler(logging.Handler):
    """Sends a worker's log records to the relay (fire and forget: a lost relay never stops training)."""

    def __init__(self, relay):
        super().__init__(logging.INFO)
        self.relay = relay

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.relay.add.remote(record.name, record.levelno, record.getMessage())
        except Exception:  # noqa: BLE001 - logging must not fail the step
            self.handleError(record)


def _pump(relay, stop: threading.Event) -> None:
    """Re-emit the relayed records in this process until ``stop``, then once more."""
    import ray

    while True:
        done = stop.wait(RELAY_POLL_S)
        try:
            records = ray.get(relay.take.remote(), timeout=30)
        except Exception:  # noqa: BLE001 - the relay went away: the run itself decides the outcome
            return
        for name, level, message in records:
            logging.getLogger(name).log(level, message)
        if done:
            return


# ---------------------------------------------------------------------------------------------------
# The worker
# ---------------------------------------------------------------------------------------------------

def train_worker(params: dict) -> dict:
    """One Ray Train worker: the stage's ``run`` as one rank; rank 0 returns the summary (or the user error).

    A user error (a ``StageError``, a missing file...) on any rank is recorded in the relay and raised, so Ray
    Train tears the group down (the other ranks may wait in a collective); the restarted group then finds it
    there and every rank returns it at once, never training again.
    """
    import ray
    import ray.train

    from pipelines.placement import where_this_runs
    from pipelines.registry import stage

    if os.path.isdir(params["cwd"]):  # relative paths mean what they mean to the driver (as under torchrun)
        os.chdir(params["cwd"])
    relay = params["relay"]
    failed = ray.get(relay.failure.remote())
    if failed:
        return {"error": failed}
    rank = ray.train.get_context().get_world_rank()
    relay.joined.remote(rank, where_this_runs())
    record = stage(params["stage"])
    config = record.config.model_validate_json(params["config"])
    logger = logging.getLogger("pipelines")
    handler = RelayHandler(relay) if rank == 0 else None
    if handler:
        logger.addHandler(handler)
        logger.setLevel(min(logger.getEffectiveLevel(), logging.INFO))
    try:
        return {"summary": record.run(config).model_dump_json()}
    except user_errors() as e:
        ray.get(relay.fail.remote(str(e)))
        raise
    finally:
        if handler:
            logger.removeHandler(handler)


# ---------------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------------

def resolve_gpu(config: RayTrainSettings) -> bool:
    """Whether the workers use GPUs: ``use_gpu``, or with auto whether the cluster has a GPU per worker."""
    from pipelines.devices import ray_uses_gpu

    device = getattr(config, "device", "auto")
    if config.use_gpu == "auto":
        return ray_uses_gpu(device, config.gpus_per_worker)
    if config.use_gpu and device == "cpu":
        raise StageError("--use-gpu true with --device cpu: choose one")
    return bool(config.use_gpu)


def worker_config(config: RayTrainSettings, gpu: bool) -> RayTrainSettings:
    """What every worker runs: resuming whatever checkpoint an earlier attempt of this run left, without a
    progress bar (the driver logs the steps), on the CPU unless the workers have GPUs."""
    update: dict = {}
    if "resume" in type(config).model_fields:
        update["resume"] = True
    if "show_progress" in type(config).model_fields:
        update["show_progress"] = False
    if not gpu and getattr(config, "device", None) == "auto":
        update["device"] = "cpu"
    return config.model_copy(update=update)


def scaling(config: RayTrainSettings, gpu: bool):
    from ray.train import ScalingConfig

    resources = {"CPU": config.cpus_per_worker, **({"GPU": config.gpus_per_worker} if gpu else {})}
    return ScalingConfig(num_workers=config.num_workers, use_gpu=gpu, resources_per_worker=resources,
                         placement_strategy=config.placement_strategy)


def failure_line(stage_name: str, config: RayTrainSettings, error: BaseException) -> str:
    """One line naming why Ray Train gave up: the first failed rank's error, or why the workers could not start."""
    failures = getattr(error, "worker_failures", None) or {}
    workers = (f"{config.num_workers} worker(s) ({config.placement_strategy}, {config.cpus_per_worker:g} CPU "
               f"each)")
    if failures:
        rank, cause = sorted(failures.items())[0]
        return (f"{stage_name}: Ray Train gave up after {config.max_failures} restart(s) of {workers}: rank {rank}: "
                f"{type(cause).__name__}: {_first_line(cause)}; re-run with --resume to continue from the last "
                "checkpoint")
    cause = getattr(error, "controller_failure", None) or error
    return (f"{stage_name}: Ray Train gave up: could not start {workers} in {START_ATTEMPTS + 1} tries: "
            f"{type(cause).__name__}: {_first_line(cause)}; check the cluster's free resources or lower "
            "--num-workers")


def _user_error(relay) -> str | None:
    import ray

    try:
        return ray.get(relay.failure.remote(), timeout=30)
    except Exception:  # noqa: BLE001 - the relay is gone: Ray Train's own error says what happened
        return None


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def fit(stage_name: str, config: RayTrainSettings) -> BaseModel:
    """Run a training stage on Ray Train; rank 0's summary. A user error on the ranks, or a run that keeps
    failing, is one ``StageError`` line."""
    import ray
    from ray.train import FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from pipelines.checkpoints import checkpoint_to_resume
    from pipelines.parallel import ensure_ray
    from pipelines.registry import stage
    from storage.fs import to_url

    record = stage(stage_name)
    if getattr(config, "resume", True) is False:
        checkpoint_to_resume(to_url(config.output), False)  # a folder with checkpoints needs --resume, as ever
    ensure_ray()
    gpu = resolve_gpu(config)
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    relay = ray.remote(num_cpus=0, scheduling_strategy=here)(LogRelay).remote()
    storage = tempfile.mkdtemp(prefix="reals-ray-train-")
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"stage": stage_name, "config": worker_config(config, gpu).model_dump_json(),
                           "cwd": os.getcwd(), "relay": relay},
        scaling_config=scaling(config, gpu),
        run_config=RunConfig(name=f"{stage_name}-{uuid.uuid4().hex[:8]}", storage_path=storage,
                             failure_config=FailureConfig(max_failures=config.max_failures,
                                                          controller_failure_limit=START_ATTEMPTS)))
    stop = threading.Event()
    pump = threading.Thread(target=contextvars.copy_context().run, args=(_pump, relay, stop), daemon=True)
    pump.start()
    LOGGER.info("%s: %d Ray Train worker(s), %s, %s", stage_name, config.num_workers,
                "GPU (NCCL)" if gpu else "CPU (gloo)", config.placement_strategy)
    try:
        result = trainer.fit()
        workers = ray.get(relay.placement.remote())
    except ray.train.TrainingFailedError as e:
        raise StageError(_user_error(relay) or failure_line(stage_name, config, e)) from None
    finally:
        stop.set()
        pump.join(timeout=60)
        ray.kill(relay)
        shutil.rmtree(storage, ignore_errors=True)
    out = result.return_value or {}
    if "error" in out:
        raise StageError(out["error"])
    summary = record.summary.model_validate_json(out["summary"])
    print(f"{stage_name}: Ray Train workers: " + ", ".join(
        f"rank {r} on node {w['node']} (host {w['host']}, pid {w['pid']})" for r, w in enumerate(workers)))
    if "ran_on" in type(summary).model_fields:
        summary.ran_on = {**summary.ran_on, "workers": workers}
    return summary
