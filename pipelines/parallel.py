"""Ray plumbing shared by the batch stages: start or join Ray, run units with a progress bar, survive lost nodes."""
from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from pipelines import StageError

# Variables the driver passes to every Ray task and actor (a cluster's raylets have their own environment).
FORWARDED_PREFIXES = ("AWS_", "REALS_")
FORWARDED_NAMES = ("HF_HUB_OFFLINE", "OMP_WAIT_POLICY", "PREFECT_API_URL")
# Of those, the ones that never travel in ``runtime_env["env_vars"]`` (Ray's runtime-env agent logs that dict,
# values included, on every node): every ``AWS_*`` and any name that says it holds a secret.
SECRET_PREFIXES = ("AWS_",)
SECRET_WORDS = ("SECRET", "TOKEN", "PASSWORD", "CREDENTIAL", "KEY")
# Starts of a local Ray before giving up (a busy machine can miss Ray's fixed 30 s registration window).
LOCAL_START_ATTEMPTS = 3
# How often one unit may be lost with its worker or node before the stage gives up.
UNIT_ATTEMPTS = 2


def forwarded_env() -> dict[str, str]:
    """The driver's storage and project settings (``AWS_*``, ``REALS_*``, a few others) its Ray workers need."""
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_PREFIXES) or k in FORWARDED_NAMES}


def is_secret(name: str) -> bool:
    return name.startswith(SECRET_PREFIXES) or any(w in name for w in SECRET_WORDS)


def worker_environment(env: dict[str, str]) -> Callable[[], None]:
    """A Ray ``worker_process_setup_hook`` that sets ``env`` in each worker process.

    Ray pickles the hook into the GCS's in-memory key-value store (its ``runtime_env`` then holds only the
    key), and every worker of the job runs it before its first task: the values reach the workers in memory,
    never in a log or a file. Train workers and actors of the job get them alike.
    """
    def set_worker_environment() -> None:
        os.environ.update(env)
    return set_worker_environment


def job_runtime_env() -> dict:
    """The job's ``runtime_env``: plain settings as ``env_vars``; credentials only through the setup hook."""
    env = forwarded_env()
    secrets = {k: v for k, v in env.items() if is_secret(k)}
    runtime_env: dict = {"env_vars": {k: v for k, v in env.items() if k not in secrets}}
    if secrets:
        runtime_env["worker_process_setup_hook"] = worker_environment(secrets)
    return runtime_env


def ensure_ray(num_cpus: int | None = None) -> None:
    """Join the cluster at ``RAY_ADDRESS`` or start a local Ray once; reuse one that is running.

    Tasks and actors get the driver's settings and credentials (``job_runtime_env``). Ray's own node
    banners and state dumps stay in Ray's logs (``quiet_ray_logs``). A Ray that fails to start or to
    answer is one line (a ``StageError``) with a hint.
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = os.environ.get("RAY_ADDRESS")
    try:
        if address:
            _check_reachable(address)
            ray.init(address=address, runtime_env=job_runtime_env(), log_to_driver=True)
        else:
            for attempt in range(1, LOCAL_START_ATTEMPTS + 1):
                try:
                    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True,
                             configure_logging=False, runtime_env=job_runtime_env())
                    break
                except Exception as e:  # noqa: BLE001 - Ray gives its node a fixed 30 s to register
                    if attempt == LOCAL_START_ATTEMPTS or "timed out during startup" not in str(e):
                        raise
                    ray.shutdown()
    except Exception as e:  # noqa: BLE001 - Ray raises plain Exceptions, ConnectionError, TimeoutError...
        where = f"the Ray cluster at RAY_ADDRESS={address}" if address else "a local Ray"
        hint = ("check that the head node is up and reachable from this host (and that this host runs "
                "`ray start --address` first)" if address else
                "the machine may be too busy or short of memory or /tmp space: retry when it is quieter, or "
                "set RAY_ADDRESS to a running cluster")
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        ray.shutdown()
        raise StageError(f"could not start {where}: {reason}; {hint}") from None
    quiet_ray_logs()
    if not address:
        from pipelines.ray_reaper import watch_driver

        watch_driver()


# A line of Ray's own C++ logs ("[2026-12-06 14:00:00,123 E 123 456] core_worker.cc:..."), a raylet's state dump, or
# the banner Ray pushes to every driver when a node's raylet dies (it quotes the raylet's last log lines).
RAY_INTERNAL_LINE = re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [DIWEF] \d+ \d+\]|\[state-dump\]|"
                               r"Raylet is terminated")


def ray_worker_lines(data: dict) -> dict | None:
    """What of one batch of Ray output for the driver it prints: the workers' own lines, not Ray's.

    Lines tailed from a raylet's or the GCS's log, Ray's internal log lines in a worker's stderr and the
    "Raylet is terminated" banner (with its ``[state-dump]`` lines) are in Ray's log folder already; a lost node
    is said once, by the stage, naming the unit and the node.
    """
    if data.get("pid") in ("raylet", "gcs_server") and data.get("ip") is not None:
        return None
    lines = [line for line in data.get("lines", []) if not RAY_INTERNAL_LINE.search(line)]
    return {**data, "lines": lines} if lines else None


def quiet_ray_logs() -> None:
    """Everything Ray prints for the driver (the workers' output and the errors Ray pushes) goes through
    ``ray_worker_lines``."""
    from ray._private import worker as ray_worker
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    original = ray_worker.print_to_stdstream
    if getattr(original, "quiet", False):
        return

    def print_to_stdstream(data: dict, ignore_prefix: bool) -> None:
        if (kept := ray_worker_lines(data)) is not None:
            original(kept, ignore_prefix=ignore_prefix)
    print_to_stdstream.quiet = True
    ray_worker.print_to_stdstream = print_to_stdstream  # pushed errors look it up here at each call
    if any(name == "ray_print_logs" for name, _ in dispatcher.handlers):  # the workers' output (log_to_driver)
        ignore_prefix = ray_worker._should_ignore_worker_log_prefix(ray_worker.global_worker)
        dispatcher.remove_handler("ray_print_logs")
        dispatcher.add_handler("ray_print_logs", lambda data: print_to_stdstream(data, ignore_prefix))


def _check_reachable(address: str, timeout: float = 10.0) -> None:
    """Fail fast on a ``host:port`` that is not a Ray head: nobody answers, or something that does not speak Ray's
    GCS protocol (a silent listener, an HTTP port), on which Ray itself waits for minutes.

    The check asks the GCS for its cluster id over gRPC and waits at most ``timeout`` seconds for the reply."""
    import socket

    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or "://" in address:
        return
    with socket.create_connection((host, int(port)), timeout=timeout):
        pass
    with grpc.insecure_channel(address) as channel:
        try:
            gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetClusterId(
                gcs_service_pb2.GetClusterIdRequest(), timeout=timeout)
        except grpc.RpcError as e:
            if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                            grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.INTERNAL):
                raise ConnectionError(f"{address} accepts connections but no Ray GCS answered on it within "
                                      f"{timeout:g} s ({e.code().name})") from None


LOGGER = logging.getLogger(__name__)  # a Prefect flow attaches its run log to ``pipelines``
LOG_EVERY_S = 30.0  # at most one "units done" line per this many seconds (and one at the end)


class UnitLog:
    """Log lines ``<description>: done/total units (pct), rate, ETA``, at most every ``LOG_EVERY_S`` and at the end."""

    def __init__(self, description: str, total: int):
        self.description, self.total, self.done = description, total, 0
        self.start = self.last = time.monotonic()

    def advance(self) -> None:
        self.done += 1
        now = time.monotonic()
        if self.done < self.total and now - self.last < LOG_EVERY_S:
            return
        self.last = now
        rate = self.done / max(now - self.start, 1e-9)
        eta = f", ETA {(self.total - self.done) / rate:.0f} s" if self.done < self.total else ""
        LOGGER.info("%s: %d/%d units (%.0f%%), %.3g units/s%s", self.description, self.done, self.total,
                    100 * self.done / max(self.total, 1), rate, eta)


def progress_bar(disable: bool = False) -> Progress:
    """The rich progress bar every long stage shows on the driver."""
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), disable=disable, transient=False,
    )


def unit_name(unit) -> str:
    """How a unit is named in messages: its ``name``, its ``start``-``end`` range, or its text."""
    if isinstance(unit, dict):
        if "name" in unit:
            return str(unit["name"])
        if "start" in unit and "end" in unit:
            return f"{unit['start']}-{unit['end']}"
    return str(getattr(unit, "name", unit))


def lost_worker_errors() -> tuple[type[BaseException], ...]:
    """Ray errors that mean a unit's worker, actor or node went away (the unit itself did not fail)."""
    from ray import exceptions as rx

    return (rx.RayActorError, rx.WorkerCrashedError, rx.NodeDiedError, rx.ObjectLostError,
            rx.LocalRayletDiedError)


NODE_ID = re.compile(r"\b[0-9a-f]{56}\b")  # a Ray node id, as Ray's errors print it


def _nodes() -> dict[str, dict]:
    import ray

    return {n["NodeID"]: n for n in ray.nodes()}


def _actor_node(error: BaseException) -> list[str]:
    """The node id of the actor an actor error names (from the GCS's actor table), if any."""
    actor_id = getattr(error, "actor_id", None)
    if not actor_id:
        return []
    from ray._private.state import actors

    return [actors(actor_id=actor_id)["Address"]["NodeID"]]


def lost_with(error: BaseException, dead_before: set[str]) -> str:
    """What a unit was lost with: ``node <ip> (<id>)`` (the actor's node, a node Ray's error names, or the one node
    that died since ``dead_before``), else ``its worker``."""
    try:
        nodes = _nodes()
        named = _actor_node(error) + NODE_ID.findall(str(error))
    except Exception:  # noqa: BLE001 - the GCS itself may be gone; the message then names no node
        return "its worker"
    new = [i for i, n in nodes.items() if not n.get("Alive") and i not in dead_before]
    ids = [i for i in named if i in nodes] or (new if len(new) == 1 else [])
    return f"node {nodes[ids[0]]['NodeManagerAddress']} ({ids[0][:8]})" if ids else "its worker"


class _Attempts:
    """Counts the losses of each unit; a loss is one line naming the unit and its node, the second loss of one
    unit ends the stage in one line."""

    def __init__(self, description: str):
        self.description, self.lost = description, {}
        try:
            self.dead_before = {i for i, n in _nodes().items() if not n.get("Alive")}
        except Exception:  # noqa: BLE001
            self.dead_before = set()

    def lost_again(self, i: int, unit, error: BaseException) -> None:
        self.lost[i] = self.lost.get(i, 0) + 1
        what = lost_with(error, self.dead_before)
        if self.lost[i] >= UNIT_ATTEMPTS:
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise StageError(f"{self.description}: unit {unit_name(unit)} was lost {self.lost[i]} times with {what} "
                             f"({type(error).__name__}: {reason}); re-run to resume")
        LOGGER.warning("%s: unit %s lost with %s (%s); re-submitting it",
                       self.description, unit_name(unit), what, type(error).__name__)


def map_units(remote_fn, units: Sequence, description: str, on_result: Callable | None = None,
              max_in_flight: int | None = None, show_progress: bool = True) -> list:
    """Run ``remote_fn.remote(unit)`` for every unit on Ray; results come back in unit order.

    ``max_in_flight`` bounds the queue so the driver never floods the cluster's object store. A unit
    lost with its worker or node is submitted again (Ray places it on a live node).
    """
    import ray

    lost = lost_worker_errors()
    attempts = _Attempts(description)
    results: list = [None] * len(units)
    pending: dict = {}
    todo = list(enumerate(units))
    limit = max_in_flight or max(1, 2 * int(ray.cluster_resources().get("CPU", 1)))
    with progress_bar(disable=not show_progress) as bar:
        task = bar.add_task(description, total=len(units))
        log = UnitLog(description, len(units))
        while todo or pending:
            while todo and len(pending) < limit:
                i, unit = todo.pop(0)
                pending[remote_fn.remote(unit)] = i
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                i = pending.pop(ref)
                try:
                    results[i] = ray.get(ref)
                except lost as e:
                    attempts.lost_again(i, units[i], e)
                    todo.insert(0, (i, units[i]))
                    continue
                if on_result:
                    on_result(results[i])
                bar.advance(task)
                log.advance()
    return results


def pool_size(requested: int | None, units: int, one_per_gpu: bool = False) -> int:
    """Actors for ``units`` units: ``requested``, by default one per CPU of the cluster (``one_per_gpu``: one per
    GPU when it has any); never more than the units. Starts or joins Ray."""
    import ray

    ensure_ray()
    resources = ray.cluster_resources()
    default = (int(resources.get("GPU", 0)) if one_per_gpu else 0) or max(1, int(resources.get("CPU", 1)))
    return min(requested or default, units)


class ActorPool:
    """The stages' pool of Ray actors: ``count`` actors of class ``worker``, each built with ``args`` (it loads
    its models once), one CPU each and, with ``gpu``, an equal share of the cluster's GPUs (at most one). Ray
    restarts no lost actor: ``map`` re-submits its unit and replaces it. Closing kills the actors."""

    def __init__(self, worker: type, args: tuple, count: int, gpu: bool = False):
        import ray

        from pipelines.devices import ray_gpus

        ensure_ray()
        options = {"num_cpus": 1, "num_gpus": min(1.0, ray_gpus() / count) if gpu else 0, "max_restarts": 0,
                   "max_task_retries": 0}
        self._cls, self._args = ray.remote(worker).options(**options), args
        self.actors = [self._spawn() for _ in range(count)]

    def _spawn(self):
        """A new actor (Ray places it where resources are free)."""
        return self._cls.remote(*self._args)

    def call(self, method: str, *args):
        """``method(*args)`` on one actor (what every actor would answer alike)."""
        import ray

        return ray.get(getattr(self.actors[0], method).remote(*args))

    def map(self, method: str, units: Iterable, description: str, show_progress: bool = True) -> list:
        """Feed units to the actors' ``method``; results in unit order.

        An actor lost with its node leaves the pool and its unit goes to a live actor; when none is left, a
        replacement is started.
        """
        import ray

        lost = lost_worker_errors()
        attempts = _Attempts(description)
        units = list(units)
        results: list = [None] * len(units)
        todo = list(range(len(units)))
        idle = list(self.actors)
        pending: dict = {}  # ref -> (unit index, actor)
        with progress_bar(disable=not show_progress) as bar:
            task = bar.add_task(description, total=len(units))
            log = UnitLog(description, len(units))
            while todo or pending:
                if todo and not idle and not pending:
                    self.actors.append(self._spawn())
                    idle.append(self.actors[-1])
                while todo and idle:
                    i, actor = todo.pop(0), idle.pop(0)
                    pending[getattr(actor, method).remote(units[i])] = (i, actor)
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    i, actor = pending.pop(ref)
                    try:
                        results[i] = ray.get(ref)
                    except lost as e:
                        attempts.lost_again(i, units[i], e)
                        self.actors.remove(actor)
                        ray.kill(actor, no_restart=True)
                        todo.insert(0, i)
                        continue
                    idle.append(actor)
                    bar.advance(task)
                    log.advance()
        return results

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)

    def __enter__(self) -> ActorPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
