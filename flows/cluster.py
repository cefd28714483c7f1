"""``reals cluster up|status|down``: the production topology on one machine, without Docker.

PostgreSQL (the Debian package's binaries; SQLite when they are absent, said so), a Prefect server on it,
a Ray head (with its dashboard on 127.0.0.1) and one worker node (``ray start --block`` on free ports, a private
temp dir), an S3 endpoint (MinIO where its binary exists, else moto's server) with a bucket, ``reals serve``
pointed at all of them, and a watchdog that starts a lost Ray node again. Everything lives in one folder:
``cluster.json`` records what was started (PIDs with their start times, ports, the database's folder),
``cluster.env`` the variables a shell or a driver needs, never a credential. ``up`` starts what is not alive
and reuses what is; ``down`` stops exactly the recorded processes and their children (by PID, never by name,
never ``ray stop``) and keeps the run history unless ``purge``.

Credentials: the services get none. ``reals serve`` and any driver take ``AWS_ACCESS_KEY_ID`` and
``AWS_SECRET_ACCESS_KEY`` from their own environment and hand them to their Ray workers in memory
(``pipelines.parallel.job_runtime_env``).
"""
from __future__ import annotations

import fcntl
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from pipelines import StageError
from pipelines.ray_reaper import _alive, _stat, descendants

BUCKET = "reals"
# Placeholders for a local endpoint when the shell has no credentials: moto accepts any, MinIO takes them as its
# root user. Never real secrets; never written to the cluster's folder.
LOCAL_S3_KEYS = {"AWS_ACCESS_KEY_ID": "reals-local", "AWS_SECRET_ACCESS_KEY": "reals-local-secret"}
CREDENTIAL_NAMES = tuple(LOCAL_S3_KEYS)
QUIET = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
         "OMP_WAIT_POLICY": "PASSIVE"}
# The components in start order; each is alive or not (``Cluster.status``).
COMPONENTS = ("postgres", "prefect-server", "s3", "ray-head", "ray-worker", "watchdog", "serve")
RAY_NODES = ("ray-head", "ray-worker")
WATCH_EVERY_S = 5.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reachable(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _wait(what: str, ok, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        if proc is not None and proc.poll() is not None:
            raise StageError(f"{what} exited with {proc.returncode}; see {log}")
        if time.monotonic() > deadline:
            raise StageError(f"{what} did not come up within {timeout:.0f} s; see {log}")
        time.sleep(0.5)


def postgres_bin() -> Path | None:
    """The newest installed PostgreSQL's bin folder (Debian layout), or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(found[-1]).parent if found else None


def credentials() -> tuple[dict[str, str], bool]:
    """``(keys, from_shell)``: this shell's S3 credentials, or the local placeholders when it has none."""
    shell = {k: os.environ[k] for k in CREDENTIAL_NAMES if os.environ.get(k)}
    return (shell, True) if len(shell) == len(CREDENTIAL_NAMES) else (dict(LOCAL_S3_KEYS), False)


class Cluster:
    """One local cluster rooted at ``root`` (its state in ``cluster.json``, guarded by ``cluster.lock``)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()
        self.state_file = self.root / "cluster.json"
        self.state: dict = self._load()

    # -- bookkeeping -------------------------------------------------------------------------------

    def _load(self) -> dict:
        return json.loads(self.state_file.read_text()) if self.state_file.is_file() else {}

    def _save(self) -> None:
        self.state_file.write_text(json.dumps(self.state, indent=2))

    @contextmanager
    def _locked(self):
        """One of ``up``, ``down`` and the watchdog at a time; the state is read again inside."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / "cluster.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.state = self._load()
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _spawn(self, name: str, cmd: list[str], env: dict, cwd: Path | None = None) -> subprocess.Popen:
        """Start ``cmd`` in its own process group with its output in ``logs/<name>.log``; record it."""
        log = self.log(name)
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.state.setdefault("processes", {})[name] = {"pid": proc.pid, "start": _stat(proc.pid)[1]}
        self._save()
        return proc

    def alive(self, name: str) -> bool:
        """Whether the component ``name`` runs (PostgreSQL: answers on its port; the others: their process)."""
        if name == "postgres":
            pg = self.state.get("postgres")
            return bool(pg) and _reachable(pg["port"])
        info = self.state.get("processes", {}).get(name)
        return bool(info) and bool(_alive({info["pid"]: info["start"]}))

    def _port(self, name: str) -> int:
        """The port ``name`` had (kept across restarts, so ``cluster.env`` stays true), or a free one."""
        ports = self.state.setdefault("ports", {})
        if name not in ports or _reachable(ports[name]):
            ports[name] = free_port()
        return ports[name]

    @property
    def env(self) -> dict[str, str]:
        """What a driver or a shell needs to use this cluster (credentials come from its own environment)."""
        return dict(self.state.get("env", {}))

    def log(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"

    def _base_env(self) -> dict[str, str]:
        """The services' environment: no storage settings, no credentials."""
        return {k: v for k, v in os.environ.items()
                if not k.startswith(("AWS_", "REALS_", "PREFECT_API_URL", "RAY_ADDRESS"))} | QUIET

    # -- services ----------------------------------------------------------------------------------

    def _database(self) -> str:
        """Start PostgreSQL on its kept data folder (created once); its URL for Prefect, or SQLite's."""
        pg = postgres_bin()
        if pg is None:
            print("PostgreSQL not found (/usr/lib/postgresql/*/bin): the Prefect server uses SQLite")
            self.state["database"] = "sqlite"
            return f"sqlite+aiosqlite:///{self.root / 'prefect.db'}"
        if self.alive("postgres"):
            return self._database_url()
        info = self.state.get("postgres")
        if not info or not Path(info["data"], "PG_VERSION").is_file():
            # Its own folder under the system temp dir: as root, PostgreSQL runs as the package's postgres user
            # (initdb refuses root), who must reach it (a pytest or home folder is often 0700).
            pg_root = Path(tempfile.mkdtemp(prefix="reals-pg-"))
            (pg_root / "sock").mkdir()
            as_user: list[str] = []
            if os.geteuid() == 0:
                shutil.chown(pg_root, "postgres", "postgres")
                shutil.chown(pg_root / "sock", "postgres", "postgres")
                as_user = ["runuser", "-u", "postgres", "--"]
            info = {"bin": str(pg), "root": str(pg_root), "data": str(pg_root / "data"), "as_user": as_user,
                    "port": self._port("postgres"), "log": str(pg_root / "postgres.log")}
            self.state["postgres"] = info
            self._save()
            self._pg(info, [str(pg / "initdb"), "-D", info["data"], "-U", "prefect", "--auth=trust", "-E", "UTF8"])
        else:
            info["port"] = self._port("postgres")
            self._save()
        self._pg(info, [str(Path(info["bin"], "pg_ctl")), "-D", info["data"], "-l", info["log"], "-w", "-t", "120",
                        "-o", f"-p {info['port']} -k {Path(info['root'], 'sock')} -c listen_addresses=127.0.0.1",
                        "start"])
        print(f"PostgreSQL {pg.parts[-2]} on 127.0.0.1:{info['port']} (data {info['data']})")
        return self._database_url()

    def _database_url(self) -> str:
        return f"postgresql+asyncpg://prefect@127.0.0.1:{self.state['postgres']['port']}/postgres"

    @staticmethod
    def _pg(info: dict, cmd: list[str]) -> None:
        try:
            subprocess.run([*info["as_user"], *cmd], check=True, capture_output=True)
        except subprocess.CalledProcessError as e:
            reason = (e.stderr or e.stdout or b"").decode(errors="replace").strip().splitlines()
            raise StageError(f"PostgreSQL did not start: {reason[-1] if reason else e}; see {info['log']}") from None

    def _prefect(self, env: dict, database: str) -> str:
        from flows.runtime import wait_for_api

        port = self._port("prefect-server")
        api = f"http://127.0.0.1:{port}/api"
        server_env = {**env, "PREFECT_API_DATABASE_CONNECTION_URL": database, "PREFECT_UI_API_URL": api,
                      "PREFECT_HOME": str(self.root / "prefect-home")}  # the UI's default API is :4200
        proc = self._spawn("prefect-server", [sys.executable, "-m", "prefect", "server", "start", "--host",
                                              "127.0.0.1", "--port", str(port)], server_env)
        wait_for_api(api, 300, proc, self.log("prefect-server"))
        print(f"Prefect server at http://127.0.0.1:{port} (UI), database {database.split(':')[0]}")
        return api

    def _ray_head(self, env: dict) -> None:
        port, dashboard = self._port("ray-head"), self._port("ray-dashboard")
        self._ray_node("ray-head", ["start", "--head", "--port", str(port), "--temp-dir", str(self.ray_temp / "head"),
                                    "--ray-client-server-port", str(free_port()), "--include-dashboard", "true",
                                    "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard)], env)
        print(f"Ray head at 127.0.0.1:{port} (temp dir {self.ray_temp / 'head'}), dashboard at http://127.0.0.1:{dashboard}")

    def _ray_worker(self, env: dict) -> None:
        # A temp dir of its own: nodes sharing one session folder each forward every worker's log lines (twice).
        self._ray_node("ray-worker", ["start", "--address", f"127.0.0.1:{self.state['ports']['ray-head']}",
                                      "--temp-dir", str(self.ray_temp / "worker")], env)

    @property
    def ray_temp(self) -> Path:
        """The Ray nodes' temp dirs' parent: a short path under the system temp dir, since Ray's Unix sockets
        (``<temp>/session_<40 chars>/sockets/<name>``) must stay within 107 bytes whatever the cluster folder."""
        if "ray_temp" not in self.state:
            self.state["ray_temp"] = tempfile.mkdtemp(prefix="reals-ray-")
            self._save()
        return Path(self.state["ray_temp"])
        print("Ray worker node joined")

    def _ray_node(self, name: str, args: list[str], env: dict, attempts: int = 3) -> None:
        """``ray start --block`` until its node is up. Ray gives a node a fixed 30 s to register, which a busy
        machine can miss, and a helper's port can be taken meanwhile: a failed start is tried again (new ports
        for the agents), saying why."""
        for attempt in range(1, attempts + 1):
            cmd = [str(Path(sys.executable).with_name("ray")), *args, "--node-ip-address", "127.0.0.1",
                   "--dashboard-agent-listen-port", str(free_port()), "--block", "--num-cpus", "1",
                   "--disable-usage-stats"]
            offset = self.log(name).stat().st_size if self.log(name).is_file() else 0
            proc = self._spawn(name, cmd, env)
            try:
                _wait(f"the Ray node {name}", lambda: "Ray runtime started" in self._log_since(name, offset), 300,
                      proc, self.log(name))
                return
            except StageError as e:
                self._stop([name])
                if attempt == attempts:
                    raise
                lines = [line for line in self._log_since(name, offset).splitlines() if line.strip()]
                print(f"{name}: {lines[-1] if lines else e}; starting it again", flush=True)

    def _log_since(self, name: str, offset: int) -> str:
        with open(self.log(name), "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    def _s3(self, env: dict) -> str:
        port = self._port("s3")
        endpoint = f"http://127.0.0.1:{port}"
        minio = shutil.which("minio")
        keys, _ = credentials()
        if minio:
            s3_env = {**env, "MINIO_ROOT_USER": keys["AWS_ACCESS_KEY_ID"],
                      "MINIO_ROOT_PASSWORD": keys["AWS_SECRET_ACCESS_KEY"]}
            proc = self._spawn("s3", [minio, "server", str(self.root / "minio"), "--address", f"127.0.0.1:{port}"],
                               s3_env)
        else:
            moto = str(Path(sys.executable).with_name("moto_server"))
            proc = self._spawn("s3", [moto, "-H", "127.0.0.1", "-p", str(port)], env)
        self.state["s3"] = "minio" if minio else "moto"
        _wait("the S3 endpoint", lambda: _reachable(port), 120, proc, self.log("s3"))
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem(key=keys["AWS_ACCESS_KEY_ID"], secret=keys["AWS_SECRET_ACCESS_KEY"],
                               client_kwargs={"endpoint_url": endpoint})
        if not fs.exists(BUCKET):
            fs.mkdir(BUCKET)
        print(f"S3 endpoint {endpoint} ({'MinIO' if minio else 'moto server, in memory: no MinIO binary found'}), "
              f"bucket s3://{BUCKET}")
        return endpoint

    # -- up / status / heal / down -----------------------------------------------------------------

    def up(self, serve: bool = True, config: str | None = None) -> dict[str, str]:
        """Start every component that is not alive and reuse those that are; returns the driver's environment.

        A fresh cluster that fails to start is stopped again; a partial restart leaves what was alive running.
        """
        with self._locked():
            fresh = not any(self.alive(n) for n in COMPONENTS)
            (self.root / "logs").mkdir(parents=True, exist_ok=True)
            base = self._base_env()
            try:
                database = self._database()
                api = self.env.get("PREFECT_API_URL") if self.alive("prefect-server") else self._prefect(base, database)
                endpoint = self.env.get("AWS_ENDPOINT_URL") if self.alive("s3") else self._s3(base)
                if not self.alive("ray-head"):
                    self._stop(["ray-worker"])  # a worker node cannot outlive its head
                    self._ray_head(base)
                if not self.alive("ray-worker"):
                    self._ray_worker(base)
                env = {"PREFECT_API_URL": api, "AWS_ENDPOINT_URL": endpoint, "REALS_RUNS_URL": f"s3://{BUCKET}/runs",
                       "RAY_ADDRESS": f"127.0.0.1:{self.state['ports']['ray-head']}",
                       "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{self.state['ports']['ray-dashboard']}", **QUIET}
                self.state["env"] = env
                self._save()
                (self.root / "cluster.env").write_text("".join(f"export {k}={v}\n" for k, v in env.items()))
                if not self.alive("watchdog"):
                    self._spawn("watchdog", [sys.executable, "-m", "flows.cluster", "watch", str(self.root)], base,
                                cwd=Path(__file__).resolve().parents[1])
                if serve and not self.alive("serve"):
                    self._serve(config)
            except BaseException:
                if fresh:
                    self._stop_all()
                raise
        return self.env

    def serve(self, config: str | None = None) -> subprocess.Popen:
        """``reals serve`` on this cluster (runs under ``$REALS_RUNS_URL``, local files under ``local``), with this
        shell's S3 credentials (or the local placeholders) in its environment only."""
        with self._locked():
            return self._serve(config)

    def _serve(self, config: str | None = None) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "flows.cli", "serve", "--local-dir", str(self.root / "local")]
        if config:
            cmd += ["--config", config]
        root = Path(__file__).resolve().parents[1]  # `-m` imports this checkout from the cwd
        keys, from_shell = credentials()
        proc = self._spawn("serve", cmd, {**os.environ, **keys, **self.env}, cwd=root)
        where = "this shell's" if from_shell else "the local placeholder"
        print(f"serving the deployments with {where} S3 credentials (log {self.log('serve')}); "
              f"`source {self.root / 'cluster.env'}` to use them")
        return proc

    def status(self) -> list[tuple[str, bool, str]]:
        """``(component, alive, detail)`` for each component."""
        self.state = self._load()
        ports, env = self.state.get("ports", {}), self.env
        pg = self.state.get("postgres") or {}
        details = {"postgres": f"127.0.0.1:{pg.get('port')}, data {pg.get('data')}" if pg else "SQLite or not started",
                   "prefect-server": env.get("PREFECT_API_URL", ""),
                   "s3": f"{env.get('AWS_ENDPOINT_URL', '')} ({self.state.get('s3', '')})",
                   "ray-head": f"127.0.0.1:{ports.get('ray-head')}, dashboard http://127.0.0.1:{ports.get('ray-dashboard')}",
                   "ray-worker": "one CPU", "watchdog": f"starts a lost Ray node again (log {self.log('watchdog')})",
                   "serve": f"the deployments (log {self.log('serve')})"}
        sqlite = self.state.get("database") == "sqlite"  # no PostgreSQL to report: the database is a file
        return [(name, self.alive(name), details[name]) for name in COMPONENTS if not (sqlite and name == "postgres")]

    def heal(self) -> list[str]:
        """Start the Ray nodes that were lost (the watchdog's round); the names started."""
        started = []
        with self._locked():
            if not self.state.get("processes"):  # stopped by `down`
                return started
            base = self._base_env()
            if not self.alive("ray-head"):
                self._stop(["ray-worker"])
                print("watchdog: the Ray head is gone; starting it again", flush=True)
                self._ray_head(base)
                started.append("ray-head")
            if not self.alive("ray-worker"):
                print("watchdog: the Ray worker node is gone; starting it again", flush=True)
                self._ray_worker(base)
                started.append("ray-worker")
        return started

    def watch(self) -> None:
        """Heal every ``WATCH_EVERY_S`` until the cluster is stopped (``down`` ends this process)."""
        while True:
            time.sleep(WATCH_EVERY_S)
            try:
                self.heal()
            except StageError as e:
                print(f"watchdog: {e}", flush=True)

    def _stop(self, names: list[str]) -> None:
        """Stop the recorded processes ``names`` and their children: TERM, then KILL after a grace period."""
        procs: dict[int, str] = {}
        for name in names:
            if info := self.state.get("processes", {}).get(name):
                procs.update(descendants({info["pid"]: info["start"]}))
        for sig, grace in ((signal.SIGTERM, 20), (signal.SIGKILL, 0)):
            for pid in _alive(procs):
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
            deadline = time.monotonic() + grace
            while _alive(procs) and time.monotonic() < deadline:
                time.sleep(0.5)
        for name in names:
            self.state.get("processes", {}).pop(name, None)
        if self.root.is_dir():
            self._save()

    def _stop_all(self) -> None:
        # the watchdog first, so that it does not start a node being stopped; serve before the services it uses
        self._stop(["watchdog"])
        self._stop(["serve"])
        self._stop([n for n in self.state.get("processes", {})])
        pg = self.state.get("postgres")
        if pg and Path(pg["data"], "postmaster.pid").exists():
            subprocess.run([*pg["as_user"], str(Path(pg["bin"], "pg_ctl")), "-D", pg["data"], "-m", "fast", "-w",
                            "stop"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def down(self, purge: bool = False) -> list[str]:
        """Stop what ``up`` started; keep the run history (PostgreSQL's data, MinIO's folder) unless ``purge``.

        Returns what the user should know about the data (kept, deleted, or lost with moto's memory).
        """
        notes = []
        with self._locked():
            self._stop_all()
            pg = self.state.get("postgres")
            if pg and purge:
                shutil.rmtree(pg["root"], ignore_errors=True)
                self.state.pop("postgres")
                notes.append(f"deleted the run history (PostgreSQL data {pg['data']})")
            elif pg:
                notes.append(f"kept the run history (PostgreSQL data {pg['data']}); `down --purge` deletes it")
            if purge and self.state.get("ray_temp"):
                shutil.rmtree(self.state.pop("ray_temp"), ignore_errors=True)
            if self.state.get("s3") == "moto":
                notes.append("moto's S3 server kept its bucket in memory: its objects are gone")
            elif self.state.get("s3") == "minio":
                if purge:
                    shutil.rmtree(self.root / "minio", ignore_errors=True)
                notes.append(f"{'deleted' if purge else 'kept'} the S3 data ({self.root / 'minio'})")
            if self.root.is_dir():
                self._save()
        return notes


if __name__ == "__main__":
    if sys.argv[1:2] == ["watch"]:
        Cluster(sys.argv[2]).watch()
