"""Where flows run: the Prefect API, the process's one Ray as task runner, retries, torchrun for training."""
from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from prefect_ray import RayTaskRunner

from pipelines import StageError
from pipelines.parallel import ensure_ray

# OSErrors that name a missing or forbidden path: the user must act, a retry cannot help.
PERMANENT_OS_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)
# S3 error codes that clear up by themselves.
# The local Prefect API's start-up budget (Prefect's own setting; our default when unset).
EPHEMERAL_TIMEOUT_VAR = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
EPHEMERAL_STARTUP_TIMEOUT = 180.0
# How long ``reals serve`` waits for the Prefect API at PREFECT_API_URL to answer.
API_WAIT_VAR = "REALS_API_WAIT_SECONDS"
API_WAIT = 120.0
TRANSIENT_S3_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
                      "InternalError", "ServiceUnavailable", "500", "502", "503", "504"}


# ---------------------------------------------------------------------------------------------------
# Retries on transient storage errors
# ---------------------------------------------------------------------------------------------------

def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` (or an error it was raised from) is a storage hiccup worth retrying."""
    from botocore.exceptions import ClientError
    from botocore.exceptions import ConnectionError as BotoConnectionError

    for e in _chain(exc):
        if isinstance(e, OSError) and not isinstance(e, PERMANENT_OS_ERRORS):
            return True
        if isinstance(e, BotoConnectionError):
            return True
        if isinstance(e, ClientError) and str(e.response.get("Error", {}).get("Code")) in TRANSIENT_S3_CODES:
            return True
    return False


def retry_on_transient(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry a failed task only when its error is transient."""
    try:
        state.result()
    except Exception as e:  # noqa: BLE001 - the failed task's own exception, classified here
        return is_transient(e)
    return False


# ---------------------------------------------------------------------------------------------------
# Ray: one start per process, as a Prefect task runner
# ---------------------------------------------------------------------------------------------------

class SharedRayTaskRunner(RayTaskRunner):
    """RayTaskRunner on the process's one Ray (``RAY_ADDRESS`` or local, started once, never shut down here)."""

    def duplicate(self) -> SharedRayTaskRunner:
        return type(self)(address=self.address, init_kwargs=self.init_kwargs)

    def __enter__(self) -> SharedRayTaskRunner:
        ensure_ray()
        return super().__enter__()


# ---------------------------------------------------------------------------------------------------
# The Prefect API: PREFECT_API_URL, or one local server shared with this process's Ray workers
# ---------------------------------------------------------------------------------------------------

@contextmanager
def use_api(url: str) -> Iterator[str]:
    """Point this process (settings) and the processes it starts (environment) at the Prefect API ``url``."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    old = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = url
    try:
        with temporary_settings({PREFECT_API_URL: url}):
            yield url
    finally:
        if old is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = old


@contextmanager
def prefect_api() -> Iterator[str | None]:
    """Yield ``PREFECT_API_URL`` if set, else None while a local API (SQLite in PREFECT_HOME) serves this process.

    Prefect's own ephemeral mode would start one server per process, Ray workers included; this starts
    it once and exports its URL so that Ray workers report to it too.
    """
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if url:
        yield url
        return
    from prefect.server.api.server import SubprocessASGIServer

    timeout = ephemeral_startup_timeout()
    server = SubprocessASGIServer()
    try:
        server.start(timeout=timeout)
    except RuntimeError as e:
        if "Timed out" not in str(e) and "exited" not in str(e):
            raise
        server.stop()
        raise StageError(f"the local Prefect API did not start within {timeout:.0f} s (busy machine?): raise "
                         f"{EPHEMERAL_TIMEOUT_VAR}, or point PREFECT_API_URL at a running server "
                         "(`make server`)") from None
    with use_api(server.api_url):
        yield None


def ephemeral_startup_timeout() -> float:
    """Seconds the local API may take to start: ``$PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS``, else
    180 (Prefect's own default, 20 s, is too short on a busy 2-core machine)."""
    return float(os.environ.get(EPHEMERAL_TIMEOUT_VAR) or EPHEMERAL_STARTUP_TIMEOUT)


def _healthy(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def wait_for_api(api: str, timeout: float | None = None, proc: subprocess.Popen | None = None,
                 log: Path | None = None) -> None:
    """Poll ``{api}/health`` until it answers, for at most ``timeout`` s (default ``$REALS_API_WAIT_SECONDS``
    or 120); a server that does not come up (or whose process ``proc`` exits) is one ``StageError`` line."""
    timeout = float(os.environ.get(API_WAIT_VAR) or API_WAIT) if timeout is None else timeout
    see = f"; see {log}" if log else ""
    deadline = time.monotonic() + timeout
    while not _healthy(f"{api}/health"):
        if proc is not None and proc.poll() is not None:
            raise StageError(f"prefect server exited with {proc.returncode}{see}")
        if time.monotonic() > deadline:
            raise StageError(f"the Prefect API at {api} did not answer within {timeout:.0f} s{see}: start the "
                             f"server (or check PREFECT_API_URL), or wait longer with {API_WAIT_VAR}")
        time.sleep(1.0)


DEFAULT_SERVER_PORT = 4200


def _port_taken(host: str, port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((host, port)) == 0


def server_port(host: str = "127.0.0.1", port: int | None = None) -> tuple[int, bool]:
    """``(port, already_running)`` for the local Prefect server: a server answering on ``port`` (default 4200)
    is used as it is; with no ``port`` given, a free one is picked when 4200 is taken by something else."""
    wanted = port or DEFAULT_SERVER_PORT
    if _healthy(f"http://{host}:{wanted}/api/health"):
        return wanted, True
    if not _port_taken(host, wanted):
        return wanted, False
    if port is not None:
        raise StageError(f"port {port} on {host} is taken by something that is not a Prefect server: pass another "
                         "--port, or none to get a free one")
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1], False


@contextmanager
def local_server(host: str = "127.0.0.1", port: int | None = None, timeout: float = 120.0) -> Iterator[str]:
    """``prefect server start`` (SQLite in PREFECT_HOME) on ``host:port`` while inside, used as the API.

    A Prefect server already answering there is used as it is (and said so); see ``server_port``.
    """
    port, running = server_port(host, port)
    api = f"http://{host}:{port}/api"
    if running:
        print(f"a Prefect server already answers at {api}: using it (UI: http://{host}:{port})")
        with use_api(api):
            yield api
        return
    print(f"starting a Prefect server (UI: http://{host}:{port}) ...")
    # The UI's own API address: without it the UI on another port than 4200 would call 4200.
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_UI_API_URL": api}
    env.pop("PREFECT_API_URL", None)
    log = Path(tempfile.gettempdir(), f"prefect-server-{port}.log")
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)]
    with open(log, "wb") as out:  # its own session: Ctrl-C stops `serve` first, which still needs the API
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_api(api, timeout, proc, log)
        with use_api(api):
            yield api
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# ---------------------------------------------------------------------------------------------------
# Training under torchrun (several processes per node)
# ---------------------------------------------------------------------------------------------------

def torchrun_command(stage: str, config_file: str, summary_file: str, nproc_per_node: int) -> list[str]:
    """The torchrun command line that runs one training stage from a JSON config on this node."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc_per_node}",
            "-m", "flows", "run-stage", stage, config_file, "--summary", summary_file]


def run_torchrun(stage: str, config, nproc_per_node: int) -> dict:
    """Run a training stage in ``nproc_per_node`` processes; returns rank 0's summary as a dict."""
    with tempfile.TemporaryDirectory(prefix=f"reals-{stage}-") as tmp:
        config_file, summary_file = Path(tmp, "config.json"), Path(tmp, "summary.json")
        config_file.write_text(config.model_dump_json())
        cmd = torchrun_command(stage, str(config_file), str(summary_file), nproc_per_node)
        rc = subprocess.run(cmd).returncode
        if rc != 0 or not summary_file.is_file():
            raise StageError(f"{stage}: torchrun with {nproc_per_node} processes exited with {rc}; "
                             "re-run to resume from the last checkpoint")
        return json.loads(summary_file.read_text())


# ---------------------------------------------------------------------------------------------------
# Logs: the stages' standard loggers and Ray workers' warnings into the run's log in the UI
# ---------------------------------------------------------------------------------------------------

# Lines of a Ray worker's stderr that say something went wrong.
WORKER_TROUBLE = re.compile(r"\b(WARNING|WARN|ERROR|CRITICAL|FATAL|Traceback|\w*Error|\w*Exception)\b")
# A worker's console echo of a ``pipelines`` record: the worker sent the record to the run's log itself.
RUN_LOGGED = re.compile(r"\| (?:WARNING|ERROR|CRITICAL) +\| pipelines[.\s]")


def attach_stage_logs(name: str = "pipelines") -> None:
    """Send INFO and above of the logger ``name`` to the log of the flow or task run it is emitted in.

    ``pipelines`` logs with the standard library only (training steps and losses, units done); outside a
    run (the plain ``reals`` commands) its records go wherever logging is configured, not to Prefect.
    In a Ray worker, run logs are sent as they are emitted (``deliver_now``).
    """
    from prefect.context import FlowRunContext, TaskRunContext
    from prefect.logging.handlers import APILogHandler

    class RunLogHandler(APILogHandler):
        def emit(self, record: logging.LogRecord) -> None:
            if FlowRunContext.get() or TaskRunContext.get():
                super().emit(record)

    logger = logging.getLogger(name)
    if not any(type(h).__name__ == "RunLogHandler" for h in logger.handlers):
        logger.addHandler(RunLogHandler())
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    if in_ray_worker():
        deliver_now()


def in_ray_worker() -> bool:
    """Whether this process is a Ray worker (not a driver)."""
    if "ray" not in sys.modules:
        return False
    import ray

    return ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE


def send_log(log: dict) -> None:
    """POST one run log (a ``LogCreate`` dict) to the Prefect API now; a failure is one line on stderr."""
    from prefect import get_client

    try:
        with get_client(sync_client=True) as client:
            client.create_logs([{k: v for k, v in log.items() if k != "__payload_size__"}])
    except Exception as e:  # noqa: BLE001 - a log that cannot be sent must not fail the stage
        sys.stderr.write(f"--- Error logging to API --- {type(e).__name__}: {e}\n")


def deliver_now() -> None:
    """Send this process's run logs (the stage's and Prefect's own) to the API as they are emitted.

    Prefect batches run logs in a background thread every couple of seconds. A Ray worker is stopped as soon as
    its job ends, which is when the flow run that started it ends: the lines of a stage that ends its flow run
    (its last "units done" line above all) were still queued then, and lost.
    """
    from prefect.logging.handlers import set_api_log_sink

    set_api_log_sink(send_log)


@contextmanager
def ray_worker_logs(logger) -> Iterator[None]:
    """While inside, the Ray workers' stderr lines that report a warning or an error go to ``logger`` (a run logger),
    but for the echo of a ``pipelines`` record (in the run's log already, ``attach_stage_logs``).

    Ray (started with ``log_to_driver``) hands the workers' output to the driver's stream dispatcher, which
    prints it on the terminal; this adds a second receiver for the lines worth a person's attention.
    """
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    from pipelines.parallel import ray_worker_lines

    def forward(batch: dict) -> None:
        batch = ray_worker_lines(batch)  # Ray's own node banners and state dumps stay in Ray's logs
        if batch is None or not batch.get("is_err"):
            return
        who = batch.get("task_name") or batch.get("actor_name") or f"pid {batch.get('pid')}"
        for line in batch.get("lines", []):
            if WORKER_TROUBLE.search(line) and not RUN_LOGGED.search(line):
                logger.warning("ray worker (%s): %s", who, line)

    name = f"reals-run-log-{id(logger)}"
    dispatcher.add_handler(name, forward)
    try:
        yield
    finally:
        dispatcher.remove_handler(name)


# ---------------------------------------------------------------------------------------------------
# Names and tags of flow runs
# ---------------------------------------------------------------------------------------------------

def started() -> str:
    """When the current flow run was due to start (UTC, to the minute): ``2026-12-01 03:00``."""
    from prefect.runtime import flow_run

    return flow_run.scheduled_start_time.in_timezone("UTC").strftime("%Y-%m-%d %H:%M")


def run_name(describe: Callable[[dict], str]) -> Callable[[], str]:
    """A flow-run namer: ``<describe(config fields)> <start>``, e.g. ``pipeline runs/demo 2026-12-01 03:00``."""
    def name() -> str:
        from prefect.runtime import flow_run

        config = flow_run.parameters.get("config")
        fields = config.model_dump() if hasattr(config, "model_dump") else dict(config or {})
        return f"{describe(fields)} {started()}"

    return name


def add_tags(*tags: str) -> None:
    """Add ``tags`` to the current flow run (its tags are fixed when it is created; this amends them)."""
    from prefect import get_client
    from prefect.context import FlowRunContext

    run = FlowRunContext.get().flow_run
    run.tags = sorted({*run.tags, *tags})
    with get_client(sync_client=True) as client:
        client.update_flow_run(run.id, tags=run.tags)
