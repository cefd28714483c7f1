"""Ray plumbing: settings forwarded to tasks, units lost with their worker re-submitted once, one-line failures."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines import StageError

ROOT = Path(__file__).resolve().parents[1]


def test_forwarded_env_carries_storage_and_project_settings_only(monkeypatch):
    from pipelines.parallel import forwarded_env

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cret")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("REALS_RUNS_URL", "s3://b/runs")
    monkeypatch.setenv("UNRELATED_TOKEN", "x")
    env = forwarded_env()
    assert env["AWS_SECRET_ACCESS_KEY"] == "s3cret" and env["REALS_RUNS_URL"] == "s3://b/runs"
    assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9"
    assert "UNRELATED_TOKEN" not in env and "PATH" not in env


def test_credentials_travel_in_the_setup_hook_never_in_env_vars(monkeypatch):
    """runtime_env["env_vars"] is logged by Ray's runtime-env agent: only plain settings go there."""
    import json

    from pipelines.parallel import job_runtime_env

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cret-value")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key-id-value")
    monkeypatch.setenv("REALS_RUNS_URL", "s3://b/runs")
    monkeypatch.setenv("REALS_API_TOKEN", "token-value")
    runtime_env = job_runtime_env()
    assert runtime_env["env_vars"]["REALS_RUNS_URL"] == "s3://b/runs"
    assert not {"s3cret-value", "key-id-value", "token-value"} & set(json.dumps(runtime_env["env_vars"]).split('"'))
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "REALS_API_TOKEN"):
        monkeypatch.delenv(name)
    runtime_env["worker_process_setup_hook"]()  # what each worker runs before its first task
    assert (os.environ["AWS_SECRET_ACCESS_KEY"], os.environ["REALS_API_TOKEN"]) == ("s3cret-value", "token-value")
    for name in [n for n in os.environ if n.startswith(("AWS_", "REALS_"))]:
        monkeypatch.delenv(name)
    assert "worker_process_setup_hook" not in job_runtime_env()  # no credentials, no hook


SECRET = "reals-test-secret-7f3b9c2e1d"
HOOK_PROBE = f"""
import os, ray
from pipelines.parallel import ensure_ray
ensure_ray(num_cpus=1)
print("seen" if ray.get(ray.remote(lambda: os.environ.get("AWS_SECRET_ACCESS_KEY")).remote()) == "{SECRET}" else "not seen")
"""


def test_a_local_rays_workers_get_the_secret_and_its_files_never_hold_it():
    """A driver with a secret in its environment: its tasks read it; no file of Ray's session holds it."""
    import shutil
    import tempfile

    temp = tempfile.mkdtemp(prefix="rs-")  # short: Ray's socket paths must fit in 107 bytes
    try:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": "", "RAY_TMPDIR": temp,
               "AWS_SECRET_ACCESS_KEY": SECRET}
        r = subprocess.run([sys.executable, "-c", HOOK_PROBE], env=env, cwd=ROOT, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        assert r.stdout.split()[-1] == "seen"
        assert SECRET not in r.stdout + r.stderr
        files = [p for p in Path(temp).rglob("*") if p.is_file() and not p.is_socket()]
        assert any(p.name.startswith("runtime_env_agent") for p in files)  # the agent that logs env_vars ran
        assert [str(p) for p in files if SECRET.encode() in p.read_bytes()] == []
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def test_rays_own_lines_stay_off_the_drivers_output():
    """Lines tailed from a raylet's log and Ray's C++ log lines in a worker's stderr are dropped; a worker's own stay."""
    from pipelines.parallel import ray_worker_lines

    assert ray_worker_lines({"pid": "raylet", "ip": "127.0.0.1", "lines": ["[state-dump] NodeManager:"]}) is None
    banner = "[2026-12-06 14:00:00,123 E 4242 4243] core_worker.cc:501: Raylet is terminated. Termination is unexpected."
    kept = ray_worker_lines({"pid": 4242, "ip": "127.0.0.1", "is_err": True, "lines": [banner, "my own line"]})
    assert kept["lines"] == ["my own line"] and kept["pid"] == 4242
    assert ray_worker_lines({"pid": 4242, "ip": "127.0.0.1", "lines": [banner]}) is None
    pushed = {"pid": "raylet", "lines": ["A worker died or was killed while executing a task."]}  # an error Ray pushes
    assert ray_worker_lines(pushed) == pushed
    dead = "Raylet is terminated. Termination is unexpected. Last 20 lines of the Raylet logs:\n    [state-dump] x"
    assert ray_worker_lines({"pid": "raylet", "lines": [dead]}) is None


def test_a_driver_prints_rays_pushed_errors_through_the_filter(ray_session, capsys):
    from ray._private import worker as ray_worker

    ray_worker.print_to_stdstream({"pid": "raylet", "is_err": False, "lines": ["Raylet is terminated. [state-dump]"]},
                                  ignore_prefix=False)
    ray_worker.print_to_stdstream({"pid": "raylet", "is_err": False, "lines": ["a worker's own error"]},
                                  ignore_prefix=False)
    out = capsys.readouterr().out
    assert "Raylet is terminated" not in out and "a worker's own error" in out


def _crash_once(marker_dir: str):
    """A task that kills its own worker process the first time it sees a unit (as a lost node would)."""
    def run(unit):
        marker = Path(marker_dir, f"{unit['name']}.seen")
        if unit.get("always") or not marker.exists():
            marker.touch()
            os._exit(1)
        return unit["name"]
    return run


def test_map_units_resubmits_a_unit_lost_with_its_worker(ray_session, tmp_path):
    from pipelines.parallel import map_units

    task = ray_session.remote(num_cpus=1, max_retries=0)(_crash_once(str(tmp_path)))
    units = [{"name": f"u{i}"} for i in range(3)]
    assert map_units(task, units, "test", show_progress=False) == ["u0", "u1", "u2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["u0.seen", "u1.seen", "u2.seen"]


def test_map_units_gives_up_in_one_line_naming_a_unit_lost_twice(ray_session, tmp_path):
    from pipelines.parallel import map_units

    task = ray_session.remote(num_cpus=1, max_retries=0)(_crash_once(str(tmp_path)))
    with pytest.raises(StageError, match=r"^test: unit doomed was lost 2 times") as e:
        map_units(task, [{"name": "ok"}, {"name": "doomed", "always": True}], "test", show_progress=False)
    assert "\n" not in str(e.value)


def _worker_class():
    """An actor class defined here, so Ray pickles it by value (workers cannot import this test module)."""
    class Worker:
        def __init__(self, fn):
            self.fn = fn

        def work(self, unit):
            return self.fn(unit), os.getpid()
    return Worker


def test_actor_pool_resubmits_the_units_of_lost_actors_and_replaces_them(ray_session, tmp_path, caplog):
    import re

    from pipelines.parallel import ActorPool

    units = [{"name": f"u{i}"} for i in range(4)]
    with ActorPool(_worker_class(), (_crash_once(str(tmp_path)),), 2) as pool:
        first = list(pool.actors)
        results = pool.map("work", units, "test", show_progress=False)
        assert [name for name, _ in results] == ["u0", "u1", "u2", "u3"]  # every unit, in unit order
        assert len(list(tmp_path.glob("*.seen"))) == 4  # every unit was first lost once
        # both first actors died; the pool ends on a replacement
        assert len(pool.actors) == 1 and pool.actors[0] not in first
    lost = [r.getMessage() for r in caplog.records if "re-submitting" in r.getMessage()]
    assert len(lost) == 4 and all(re.match(r"test: unit u\d lost with node \S+ \([0-9a-f]{8}\) \(", m) for m in lost)


def test_ray_that_cannot_start_is_one_line_with_a_hint(synthetic_root, tmp_path):
    """A cluster address nobody answers: one line with a hint, exit 2, no traceback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{port}", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "pipelines.cli", "shard", "--data-path", str(synthetic_root),
                        "--output", str(tmp_path / "shards"), "--resolution", "32"],
                       env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr
    assert lines[0].startswith(f"error: could not start the Ray cluster at RAY_ADDRESS=127.0.0.1:{port}: ")
    assert "check that the head node is up" in lines[0]


def test_a_killed_drivers_ray_helpers_stop_with_it(tmp_path):
    """kill -9 of a driver that started a local Ray: its raylet's agents and workers go too (they linger otherwise)."""
    import signal
    import time

    from pipelines.ray_reaper import _alive, _stat, descendants

    code = ("import ray, time; from pipelines.parallel import ensure_ray; ensure_ray(num_cpus=1); "
            "ray.get(ray.remote(lambda: 1).remote()); print('ready', flush=True); time.sleep(600)")
    driver = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": ""})
    try:
        assert driver.stdout.readline().strip() == "ready"
        procs = descendants({driver.pid: _stat(driver.pid)[1]})
        names = {open(f"/proc/{p}/cmdline").read().split("\0")[0] for p in procs if _stat(p)}
        assert {"ray::DashboardAgent", "ray::RuntimeEnvAgent"} <= names
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        deadline = time.monotonic() + 30
        while _alive(procs) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _alive(procs)
    finally:
        driver.kill()
