"""Helpers of the integration suite: the micro pipeline config, a driver's environment (the only place that holds
the S3 credentials), `reals` as a process, a Ray worker frozen mid-unit."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from test_flows import MICRO as _FLOWS_MICRO

ROOT = Path(__file__).resolve().parents[2]
# The micro pipeline of tests/test_flows.py, smaller still: the served deployments are pre-filled with it.
MICRO = {**_FLOWS_MICRO, "synthetic": {"classes": 2, "per_class": 8, "val_per_class": 4, "size": 32},
         "shard": {**_FLOWS_MICRO["shard"], "shard_size": 4},
         "train_vae": {**_FLOWS_MICRO["train_vae"], "max_steps": 2, "log_every": 1, "sample_every": 2},
         "generator": {**_FLOWS_MICRO["generator"], "max_steps": 2, "log_every": 1},
         "sample": {**_FLOWS_MICRO["sample"], "num_fid_samples": 8, "unit_size": 4, "workers": 2},
         "downstream": {"num_fit": 8, "num_eval": 4, "show_progress": False}}


# The drivers' S3 credentials (moto accepts any): the cluster's services never get them, and no file, log, record
# or object may ever hold the secret, a value distinctive enough to search for.
SECRET = "it-secret-9c41e7d2b8a35f06"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "it-driver-key", "AWS_SECRET_ACCESS_KEY": SECRET}


def driver_env(cluster, **extra) -> dict[str, str]:
    """A driver's environment: this process's, the cluster's, the drivers' credentials, the worktree importable."""
    return {**os.environ, **cluster.env, **CREDENTIALS, "PYTHONPATH": str(ROOT), **extra}


def reals(args: list[str], env: dict, timeout: float = 900, **kwargs) -> subprocess.CompletedProcess:
    """Run ``reals ARGS`` in its own process (a driver), output captured."""
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, **kwargs)


def process_title(pid: int) -> bytes:
    """A process's title (Ray retitles a worker ``ray::Class.method`` while it runs that method)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
    except OSError:
        return b""


def freeze_mid_unit(root: dict, title: bytes, proc, timeout: float = 600) -> int:
    """SIGSTOP the Ray worker below ``root`` while its title is ``title``; its pid.

    Checked again once stopped: a unit only returns after its worker drops the title, so the driver is
    then surely waiting on a unit held by this node.
    """
    import os
    import signal

    from pipelines.ray_reaper import descendants

    deadline, pid = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the encode ended before a unit ran on the worker node"
        if pid is None:
            pid = next((p for p in descendants(root) if process_title(p).startswith(title.split(b".")[0])), None)
        elif process_title(pid) == title:
            os.kill(pid, signal.SIGSTOP)
            if process_title(pid) == title:
                return pid
            os.kill(pid, signal.SIGCONT)
        time.sleep(0.001 if pid else 0.05)
    raise AssertionError(f"no worker on the worker node ran {title!r} within {timeout:.0f} s")


def cluster_status(cluster) -> dict[str, str]:
    """``reals cluster status`` as component -> alive/DOWN."""
    import os

    r = reals(["cluster", "status", "--dir", str(cluster.root)], dict(os.environ), timeout=120)
    return {line.split()[0]: line.split()[1] for line in r.stdout.splitlines() if line.strip()}


def wait_for_worker_node(cluster, lost_pid: int, timeout: float = 600) -> None:
    """Wait until the cluster's watchdog has started the worker node again (a new process, reported alive)."""
    deadline = time.monotonic() + timeout
    while cluster._load()["processes"]["ray-worker"]["pid"] == lost_pid or \
            cluster_status(cluster).get("ray-worker") != "alive":
        assert time.monotonic() < deadline, cluster_status(cluster)
        time.sleep(5)
    cluster.state = cluster._load()


S3_PROBE = """
import json, ray, sys
from pipelines.parallel import ensure_ray, map_units
from storage.fs import read_bytes, write_bytes_atomic

ensure_ray()

@ray.remote(num_cpus=1, scheduling_strategy="SPREAD")
def probe(unit):
    import os, time
    prefix, i = unit
    url = f"{prefix}/{i}.txt"
    write_bytes_atomic(url, b"ok")
    time.sleep(2)
    return ray.get_runtime_context().get_node_id(), read_bytes(url).decode(), "AWS_SECRET_ACCESS_KEY" in os.environ
prefix = sys.argv[1]  # read here: a worker's sys.argv is its own
results = map_units(probe, [(prefix, i) for i in range(4)], "probe", show_progress=False)
assert all(read_bytes(f"{prefix}/{i}.txt") == b"ok" for i in range(4)), "the workers' objects are not under " + prefix
print(json.dumps(results))
"""


def s3_probe(env: dict, prefix: str) -> tuple[list, str]:
    """Four Ray units spread over the nodes, each writing and reading ``prefix/<unit>.txt``: their
    ``(node, text read, whether the worker saw AWS_SECRET_ACCESS_KEY)``, and the driver's output."""
    r = subprocess.run([sys.executable, "-c", S3_PROBE, prefix], env=env, cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1]), r.stdout + r.stderr
