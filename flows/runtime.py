"""Where flows run: the Prefect API, the process's one Ray as task runner, retries, torchrun for training."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
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


@contextmanager
def local_server(host: str = "127.0.0.1", port: int = 4200, timeout: float = 120.0) -> Iterator[str]:
    """``prefect server start`` (SQLite in PREFECT_HOME) on ``host:port`` while inside, used as the API.

    A server already answering there is used as it is.
    """
    api = f"http://{host}:{port}/api"
    if _healthy(f"{api}/health"):
        with use_api(api):
            yield api
        return
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
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
