"""``reals cluster up|down``: the production topology on one machine, without Docker.

PostgreSQL (the Debian package's binaries; SQLite when they are absent, said so), a Prefect server on it,
a Ray head and one worker node (``ray start --block`` on free ports, a private temp dir), an S3 endpoint
(MinIO where its binary exists, else moto's server) with a bucket, and ``reals serve`` pointed at all of
them. Everything lives in one folder: ``cluster.json`` records what was started (PIDs with their start
times), ``cluster.env`` the variables a shell or a driver needs. ``down`` stops exactly those processes
and their children (by PID, never by name, never ``ray stop``).
"""
from __future__ import annotations

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
from pathlib import Path

from pipelines import StageError
from pipelines.ray_reaper import _alive, _stat, descendants

BUCKET = "reals"
# moto accepts any credentials; MinIO gets these as its root user. Local-only, never real secrets.
LOCAL_S3_KEYS = {"AWS_ACCESS_KEY_ID": "reals-local", "AWS_SECRET_ACCESS_KEY": "reals-local-secret"}
QUIET = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
         "OMP_WAIT_POLICY": "PASSIVE"}


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


class Cluster:
    """One local cluster rooted at ``root`` (its state in ``cluster.json``)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()
        self.state_file = self.root / "cluster.json"
        self.state: dict = json.loads(self.state_file.read_text()) if self.state_file.is_file() else {}

    # -- bookkeeping -------------------------------------------------------------------------------

    def _save(self) -> None:
        self.state_file.write_text(json.dumps(self.state, indent=2))

    def _spawn(self, name: str, cmd: list[str], env: dict, cwd: Path | None = None) -> subprocess.Popen:
        """Start ``cmd`` in its own process group with its output in ``logs/<name>.log``; record it."""
        log = self.root / "logs" / f"{name}.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.state.setdefault("processes", {})[name] = {"pid": proc.pid, "start": _stat(proc.pid)[1]}
        self._save()
        return proc

    @property
    def env(self) -> dict[str, str]:
        """What a driver or a shell needs to use this cluster."""
        return dict(self.state.get("env", {}))

    def log(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"

    # -- services ----------------------------------------------------------------------------------

    def _database(self) -> str:
        """PostgreSQL's connection URL for Prefect, or SQLite's (then it says so)."""
        pg = postgres_bin()
        if pg is None:
            print("PostgreSQL not found (/usr/lib/postgresql/*/bin): the Prefect server uses SQLite")
            return f"sqlite+aiosqlite:///{self.root / 'prefect.db'}"
        # Its own folder under the system temp dir: as root, PostgreSQL runs as the package's postgres user
        # (initdb refuses root), who must reach it (a pytest or home folder is often 0700).
        pg_root = Path(tempfile.mkdtemp(prefix="reals-pg-"))
        data, sock, log, port = pg_root / "data", pg_root / "sock", pg_root / "postgres.log", free_port()
        sock.mkdir()
        as_user: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(pg_root, "postgres", "postgres")
            shutil.chown(sock, "postgres", "postgres")
            as_user = ["runuser", "-u", "postgres", "--"]
        self.state["postgres"] = {"bin": str(pg), "root": str(pg_root), "data": str(data), "as_user": as_user,
                                  "port": port, "log": str(log)}
        self._save()
        try:
            subprocess.run([*as_user, str(pg / "initdb"), "-D", str(data), "-U", "prefect", "--auth=trust",
                            "-E", "UTF8"], check=True, capture_output=True)
            subprocess.run([*as_user, str(pg / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "120", "-o",
                            f"-p {port} -k {sock} -c listen_addresses=127.0.0.1", "start"],
                           check=True, capture_output=True)
        except subprocess.CalledProcessError as e:
            reason = (e.stderr or e.stdout or b"").decode(errors="replace").strip().splitlines()
            raise StageError(f"PostgreSQL did not start: {reason[-1] if reason else e}; see {log}") from None
        print(f"PostgreSQL {pg.parts[-2]} on 127.0.0.1:{port}")
        return f"postgresql+asyncpg://prefect@127.0.0.1:{port}/postgres"

    def _prefect(self, env: dict, database: str) -> str:
        from flows.runtime import wait_for_api

        port = free_port()
        api = f"http://127.0.0.1:{port}/api"
        server_env = {**env, "PREFECT_API_DATABASE_CONNECTION_URL": database, "PREFECT_UI_API_URL": api,
                      "PREFECT_HOME": str(self.root / "prefect-home")}  # the UI's default API is :4200
        server_env.pop("PREFECT_API_URL", None)
        proc = self._spawn("prefect-server", [sys.executable, "-m", "prefect", "server", "start", "--host",
                                              "127.0.0.1", "--port", str(port)], server_env)
        wait_for_api(api, 300, proc, self.log("prefect-server"))
        print(f"Prefect server at http://127.0.0.1:{port} (UI), database {database.split(':')[0]}")
        return api

    def _ray(self, env: dict) -> str:
        ray_bin = str(Path(sys.executable).with_name("ray"))
        port = free_port()
        address = f"127.0.0.1:{port}"
        common = ["--block", "--num-cpus", "1", "--disable-usage-stats"]
        self._ray_node("ray-head", [ray_bin, "start", "--head", "--port", str(port), "--node-ip-address", "127.0.0.1",
                                    "--temp-dir", str(self.root / "ray"), "--ray-client-server-port", str(free_port()),
                                    "--dashboard-agent-listen-port", str(free_port()), "--include-dashboard", "false",
                                    *common], env)
        self._ray_node("ray-worker", [ray_bin, "start", "--address", address, "--node-ip-address", "127.0.0.1",
                                      "--dashboard-agent-listen-port", str(free_port()), *common], env)
        print(f"Ray head at {address}, one worker node (temp dir {self.root / 'ray'})")
        return address

    def _ray_node(self, name: str, cmd: list[str], env: dict, attempts: int = 3) -> None:
        """``ray start --block`` until its node is up; Ray gives a node a fixed 30 s to register, which a busy
        machine can miss, so a start that timed out is tried again."""
        for attempt in range(1, attempts + 1):
            proc = self._spawn(name, cmd, env)
            try:
                _wait(f"the Ray node {name}", lambda: self._started(name), 300, proc, self.log(name))
                return
            except StageError:
                if attempt == attempts or "timed out during startup" not in self.log(name).read_text(errors="replace"):
                    raise
                print(f"{name}: Ray timed out during startup (busy machine); starting it again")

    def _started(self, name: str) -> bool:
        """Whether ``ray start`` logged that its node is up."""
        return "Ray runtime started" in self.log(name).read_text(errors="replace")

    def _s3(self, env: dict) -> str:
        port = free_port()
        endpoint = f"http://127.0.0.1:{port}"
        minio = shutil.which("minio")
        if minio:
            s3_env = {**env, "MINIO_ROOT_USER": LOCAL_S3_KEYS["AWS_ACCESS_KEY_ID"],
                      "MINIO_ROOT_PASSWORD": LOCAL_S3_KEYS["AWS_SECRET_ACCESS_KEY"]}
            proc = self._spawn("s3", [minio, "server", str(self.root / "minio"), "--address", f"127.0.0.1:{port}"],
                               s3_env)
        else:
            moto = str(Path(sys.executable).with_name("moto_server"))
            proc = self._spawn("s3", [moto, "-H", "127.0.0.1", "-p", str(port)], env)
        _wait("the S3 endpoint", lambda: _reachable(port), 120, proc, self.log("s3"))
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem(key=LOCAL_S3_KEYS["AWS_ACCESS_KEY_ID"], secret=LOCAL_S3_KEYS["AWS_SECRET_ACCESS_KEY"],
                               client_kwargs={"endpoint_url": endpoint})
        if not fs.exists(BUCKET):
            fs.mkdir(BUCKET)
        print(f"S3 endpoint {endpoint} ({'MinIO' if minio else 'moto server: no MinIO binary found'}), "
              f"bucket s3://{BUCKET}")
        return endpoint

    # -- up / down ---------------------------------------------------------------------------------

    def up(self, serve: bool = True, config: str | None = None) -> dict[str, str]:
        """Start every service (a cluster already recorded here is refused); returns the driver's environment."""
        if self.state.get("processes") and any(_alive({p["pid"]: p["start"]}) for p in self.state["processes"].values()):
            raise StageError(f"a cluster is already running from {self.root}: `reals cluster down --dir {self.root}`")
        (self.root / "logs").mkdir(parents=True, exist_ok=True)
        self.state = {}
        # The services get no storage settings or credentials: drivers pass theirs to Ray tasks (runtime_env).
        base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "REALS_", "PREFECT_API_URL",
                                                                          "RAY_ADDRESS"))} | QUIET
        try:
            database = self._database()
            api = self._prefect(base, database)
            endpoint = self._s3(base)
            env = {"PREFECT_API_URL": api, "AWS_ENDPOINT_URL": endpoint, **LOCAL_S3_KEYS,
                   "REALS_RUNS_URL": f"s3://{BUCKET}/runs", **QUIET}
            env["RAY_ADDRESS"] = self._ray(base)
            self.state["env"] = env
            self._save()
            (self.root / "cluster.env").write_text("".join(f"export {k}={v}\n" for k, v in env.items()))
            if serve:
                self.serve(config)
        except BaseException:
            self.down()
            raise
        return self.env

    def serve(self, config: str | None = None) -> subprocess.Popen:
        """``reals serve`` on this cluster (runs under ``$REALS_RUNS_URL``, local files under ``local``)."""
        cmd = [sys.executable, "-m", "flows.cli", "serve", "--local-dir", str(self.root / "local")]
        if config:
            cmd += ["--config", config]
        root = Path(__file__).resolve().parents[1]  # `-m` imports this checkout from the cwd
        proc = self._spawn("serve", cmd, {**os.environ, **self.env}, cwd=root)
        print(f"serving the deployments (log {self.log('serve')}); `source {self.root / 'cluster.env'}` to use them")
        return proc

    def down(self) -> None:
        """Stop what ``up`` started, and their children: TERM, then KILL after a grace period."""
        procs: dict[int, str] = {}
        for info in self.state.get("processes", {}).values():
            procs.update(descendants({info["pid"]: info["start"]}))
        for pid in _alive(procs):
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                pass
        deadline = time.monotonic() + 20
        while _alive(procs) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in _alive(procs):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        pg = self.state.get("postgres")
        if pg and Path(pg["data"], "postmaster.pid").exists():
            subprocess.run([*pg["as_user"], str(Path(pg["bin"], "pg_ctl")), "-D", pg["data"], "-m", "fast", "-w",
                            "stop"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if pg:
            shutil.rmtree(pg["root"], ignore_errors=True)
        self.state["processes"] = {}
        if self.root.is_dir():
            self._save()
