"""Secrets stay off disk and the cluster heals (issue 29), on the session cluster: a Prefect flow and a stage on Ray
with S3 credentials only in the driver, the worker node's raylet killed mid-encode, the watchdog bringing the node
back, then a search for the secret everywhere the cluster writes; `down` then `up` keeps the flow runs."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from topology import (CREDENTIALS, ROOT, SECRET, cluster_status, driver_env, freeze_mid_unit, process_title,
                      s3_probe, wait_for_worker_node)

SHARD_FLOW = """
import sys
from flows.stages import shard_flow
from pipelines.stages.shard import ShardConfig
shard_flow(ShardConfig(data_path=sys.argv[1], output=sys.argv[2], resolution=32, shard_size=4, workers=2,
                       show_progress=False))
"""

@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from helpers import make_vae_dir
    from pipelines.stages.synthetic import SyntheticConfig, run as synthetic

    root = tmp_path_factory.mktemp("secret-data")
    synthetic(SyntheticConfig(output=str(root / "images"), classes=2, per_class=16, size=32, seed=0))
    return root / "images", make_vae_dir(root / "vae")


def _raylet(cluster) -> int:
    node = cluster.state["processes"]["ray-worker"]
    [pid] = [p for p in _descendants(node) if process_title(p).endswith(b"/raylet")]
    return pid


def _descendants(info: dict) -> dict[int, str]:
    from pipelines.ray_reaper import descendants

    return descendants({info["pid"]: info["start"]})


def _files_with_secret(roots: list[Path], since: float) -> list[str]:
    found = []
    for root in roots:
        for p in root.rglob("*"):
            try:
                if p.is_file() and not p.is_symlink() and p.stat().st_mtime >= since - 1 and \
                        SECRET.encode() in p.read_bytes():
                    found.append(str(p))
            except OSError:
                continue
    return found


def _prefect_dump(cluster) -> bytes:
    pg = cluster.state.get("postgres")
    if not pg:
        return Path(cluster.root / "prefect.db").read_bytes()
    dump = subprocess.run([*pg["as_user"], str(Path(pg["bin"], "pg_dump")), "-h", str(Path(pg["root"], "sock")),
                           "-p", str(pg["port"]), "-U", "prefect", "postgres"], capture_output=True, check=True)
    return dump.stdout


def _bucket_objects(cluster) -> dict[str, bytes]:
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(key=CREDENTIALS["AWS_ACCESS_KEY_ID"], secret=SECRET,
                           client_kwargs={"endpoint_url": cluster.env["AWS_ENDPOINT_URL"]})
    return {p: fs.cat_file(p) for p in fs.find("reals")}


def _flow_runs(cluster) -> set[str]:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: cluster.env["PREFECT_API_URL"]}):
        with get_client(sync_client=True) as client:
            return {str(r.id) for r in client.read_flow_runs()}


@pytest.mark.timeout(2400)
def test_the_secret_stays_off_disk_and_a_lost_node_comes_back(cluster, inputs):
    images, vae_dir = inputs
    since = time.time()
    cluster.state = cluster._load()
    env = driver_env(cluster)
    outputs = []

    # A Prefect flow whose stage runs on Ray: records, logs, artifacts and events in the database; shards in S3.
    r = subprocess.run([sys.executable, "-c", SHARD_FLOW, str(images), "s3://reals/secret-it/shards"], env=env,
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    outputs.append(r.stdout + r.stderr)
    assert r.returncode == 0, r.stderr[-3000:]

    # A stage reading and writing S3 on both nodes; the worker node's raylet is killed while it holds a unit.
    raylet = _raylet(cluster)
    worker = cluster.state["processes"]["ray-worker"]
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "encode", "--data-path", "s3://reals/secret-it/shards",
                             "--vae-path", vae_dir, "--output", "s3://reals/secret-it/store", "--workers", "2"],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        actor = freeze_mid_unit({worker["pid"]: worker["start"]}, b"ray::EncodeWorker.encode_shard", proc)
        os.kill(raylet, signal.SIGKILL)
        os.kill(actor, signal.SIGKILL)
        out, err = proc.communicate(timeout=900)
    finally:
        proc.kill()
    outputs.append(out + err)
    assert proc.returncode == 0, err[-3000:]
    # the loss is one line naming the unit and the node; Ray's banners and state dumps stay in Ray's logs
    lost = [line for line in (out + err).splitlines() if "lost with" in line]
    assert lost and all(re.search(r"unit \S+ lost with node \S+ \([0-9a-f]{8}\)", line) for line in lost), lost
    assert "Raylet is terminated" not in out + err and "[state-dump]" not in out + err

    # The watchdog starts the worker node again; a later stage's units run on both nodes and use S3.
    wait_for_worker_node(cluster, worker["pid"])
    results, output = s3_probe(env, "s3://reals/secret-it/probe")
    outputs.append(output)
    assert len({node for node, _, _ in results}) == 2 and all(text == "ok" for _, text, _ in results)
    assert "watchdog: the Ray worker node is gone" in cluster.log("watchdog").read_text()

    # No file of the cluster (logs of every process it started, Ray's temp dir), the database folder, Ray's
    # default temp dir, the Prefect database, any object in the bucket, or any driver's output holds the secret.
    roots = [cluster.root, Path(cluster.state["ray_temp"]), Path(tempfile.gettempdir(), "ray")]
    if cluster.state.get("postgres"):
        roots.append(Path(cluster.state["postgres"]["root"]))
    assert _files_with_secret([r for r in roots if r.is_dir()], since) == []
    dump = _prefect_dump(cluster)
    assert b"shard" in dump and SECRET.encode() not in dump
    objects = _bucket_objects(cluster)
    assert any("/store/" in p for p in objects) and any("/shards/" in p for p in objects)
    assert [p for p, data in objects.items() if SECRET.encode() in data] == []
    assert not [o for o in outputs if SECRET in o]

    # down, then up: the flow runs are still there (the database's folder is kept).
    runs = _flow_runs(cluster)
    assert runs
    notes = cluster.down()
    assert any("kept the run history" in n for n in notes) or not cluster.state.get("postgres")
    cluster.up(serve=False)
    assert runs <= _flow_runs(cluster)
    status = cluster_status(cluster)
    assert status.pop("serve") == "DOWN" and set(status.values()) == {"alive"}, status  # serve was not asked for

