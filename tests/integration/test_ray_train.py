"""Training on the two-node Ray cluster with Ray Train: one worker per node, checkpoints on S3, the same weights as
torchrun on one node, and the worker node lost mid-run (then brought back, so later tests find two nodes)."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from topology import ROOT, driver_env, process_title, reals, wait_for_worker_node

SIT = ["--model", "SiT-T/4", "--global-batch-size", "8", "--log-every", "20", "--ckpt-every", "20",
       "--sample-every", "0", "--no-progress"]
SIT_STEPS = 160
VAE = ["--vae-config", "tiny", "--dino-model", "tiny-dinov2", "--perceptual", "none", "--align-hidden-dim", "32",
       "--disc-channels", "8", "--disc-layers", "2", "--lr", "2e-3", "--shuffle-buffer", "8", "--ema-decay", "0.9",
       "--batch-size", "4", "--max-steps", "4", "--log-every", "2", "--sample-every", "4", "--no-progress"]
ON_RAY = ["--num-workers", "2", "--placement-strategy", "STRICT_SPREAD"]


@pytest.fixture(scope="module")
def data(cluster, tmp_path_factory):
    """Synthetic images, their shards (8 of 4) and a latent store of the tiny VAE, all local (both nodes see them)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import make_vae_dir

    root = tmp_path_factory.mktemp("raytrain")
    env = driver_env(cluster)
    vae = make_vae_dir(root / "vae")
    for args in (["synthetic", "--output", str(root / "images"), "--classes", "2", "--per-class", "16", "--size", "32"],
                 ["shard", "--data-path", str(root / "images"), "--output", str(root / "shards"), "--resolution", "32",
                  "--shard-size", "4", "--no-progress"],
                 ["encode", "--data-path", str(root / "shards"), "--vae-path", vae, "--output", str(root / "store"),
                  "--workers", "0", "--no-progress"]):
        r = reals(args, env)
        assert r.returncode == 0, r.stderr[-3000:]
    return root


@pytest.fixture()
def s3(cluster, monkeypatch):
    """This process reads the cluster's S3 (with the drivers' credentials, which the cluster fixture set)."""
    import s3fs

    monkeypatch.setenv("AWS_ENDPOINT_URL", cluster.env["AWS_ENDPOINT_URL"])
    s3fs.S3FileSystem.clear_instance_cache()


def torchrun(stage: str, args: list[str], env: dict) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2`` on this one host (RAY_ADDRESS set, yet the ranks train here)."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "pipelines.cli", stage, *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=900)


def weights(run: str, key: str = "ema") -> dict:
    from pipelines.checkpoints import latest_checkpoint, load_checkpoint

    ckpt = load_checkpoint(latest_checkpoint(run))
    return ckpt[key]


def max_diff(a: dict, b: dict) -> float:
    if set(a) != set(b):
        return float("inf")
    if all(isinstance(v, dict) for v in a.values()):
        return max(max_diff(a[k], b[k]) for k in a)
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def one_worker_per_node(output: str) -> bool:
    """The driver's line of where the Ray Train workers ran names two ranks on two nodes."""
    nodes = dict(re.findall(r"rank (\d+) on node ([0-9a-f]+)", output))
    return sorted(nodes) == ["0", "1"] and nodes["0"] != nodes["1"]


@pytest.mark.timeout(1800)
def test_train_sit_on_two_nodes_equals_torchrun_and_survives_losing_the_worker_node(cluster, data, s3, tmp_path):
    env = driver_env(cluster)
    base = ["--data-path", str(data / "store"), "--max-steps", str(SIT_STEPS), *SIT]

    r = torchrun("train-sit", [*base, "--output", str(tmp_path / "torchrun")], env)
    assert r.returncode == 0, r.stderr[-3000:]

    whole = "s3://reals/it/ray-train/sit"
    r = reals(["train-sit", *base, "--output", whole, *ON_RAY], env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 rank(s) x 4 per step" in r.stdout and one_worker_per_node(r.stdout)
    assert max_diff(weights(whole), weights(str(tmp_path / "torchrun"))) <= 1e-6

    lost = "s3://reals/it/ray-train/sit-lost"
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "train-sit", *base, "--output", lost, *ON_RAY],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_checkpoint(lost, proc)
        _lose_and_restore_worker_node(cluster)
        out, err = proc.communicate(timeout=1200)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "resumed from" in out, out  # the worker group restarted from a checkpoint
    assert max_diff(weights(lost), weights(whole)) <= 1e-6
    assert max_diff(weights(lost, "model"), weights(whole, "model")) <= 1e-6


def test_train_vae_on_two_nodes_equals_torchrun(cluster, data, s3, tmp_path):
    env = driver_env(cluster)
    base = ["--data-path", str(data / "shards"), *VAE]
    r = torchrun("train-vae", [*base, "--output", str(tmp_path / "torchrun")], env)
    assert r.returncode == 0, r.stderr[-3000:]
    run = "s3://reals/it/ray-train/vae"
    r = reals(["train-vae", *base, "--output", run, *ON_RAY], env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert one_worker_per_node(r.stdout)
    assert max_diff(weights(run), weights(str(tmp_path / "torchrun"))) <= 1e-6


def test_a_run_that_cannot_be_placed_ends_in_one_line(cluster, data, tmp_path):
    """Three workers one per node on two nodes: Ray Train cannot start them; the stage says why in one line."""
    env = driver_env(cluster, RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="5")
    r = reals(["train-sit", "--data-path", str(data / "store"), "--max-steps", "2", *SIT, "--output",
               str(tmp_path / "sit"), "--num-workers", "3", "--placement-strategy", "STRICT_SPREAD",
               "--max-failures", "0"], env)
    assert r.returncode == 2
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: train-sit: Ray Train gave up") and "STRICT_SPREAD" in line, r.stderr[-3000:]


def test_a_ranks_error_is_the_stages_one_line_error(cluster, data, tmp_path):
    r = reals(["train-sit", "--data-path", str(data / "store"), "--max-steps", "2", *SIT, "--output",
               str(tmp_path / "sit"), "--num-workers", "2", "--global-batch-size", "7"], driver_env(cluster))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == "error: --global-batch-size 7 is not divisible by 2 ranks", \
        r.stderr[-3000:]


# ---------------------------------------------------------------------------------------------------

def _wait_for_checkpoint(run: str, proc, timeout: float = 900) -> None:
    """Until the run's first checkpoint exists (and the run is not finished)."""
    from storage.fs import filesystem, join
    from storage.markers import read_json

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        filesystem(run)[0].invalidate_cache()
        latest = read_json(join(run, "latest.json"))
        if latest and latest["step"] >= 20:
            assert latest["step"] < SIT_STEPS, "the run finished before the node could be lost"
            return
        time.sleep(0.2)
    raise AssertionError("no checkpoint within the timeout")


def _lose_and_restore_worker_node(cluster) -> None:
    """Kill the worker node's raylet by PID, then the rest of that node; the cluster's watchdog starts it again."""
    from pipelines.ray_reaper import descendants

    node = cluster.state["processes"]["ray-worker"]
    root = {node["pid"]: node["start"]}
    raylets = [pid for pid in descendants(root) if process_title(pid).endswith(b"/raylet")]
    assert len(raylets) == 1
    os.kill(raylets[0], signal.SIGKILL)
    time.sleep(3)
    for pid in descendants(root):  # the rest of the node goes with it
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    wait_for_worker_node(cluster, node["pid"])


@pytest.mark.timeout(2400)
def test_served_pipeline_trains_and_measures_on_ray_not_in_the_serve_process(cluster, micro_config, s3):
    """The reals-pipeline deployment run by `reals serve`: every training and measurement stage records a process
    that was never the serve process or one of its flow-run processes."""
    import threading

    from helpers import run_when_served
    from test_topology import _serving

    from pipelines.ray_reaper import _stat, descendants
    from storage.fs import join
    from storage.markers import read_json

    seen: set[int] = set()
    stop = threading.Event()

    def watch(serve) -> None:  # every process of the serve tree, while the pipeline runs
        root = {serve.pid: _stat(serve.pid)[1]}
        while not stop.is_set():
            seen.update(descendants(root))
            time.sleep(0.1)

    with _serving(cluster, micro_config) as (serve, run_deployment):
        watcher = threading.Thread(target=watch, args=(serve,), daemon=True)
        watcher.start()
        try:
            run = run_when_served(run_deployment, "reals-pipeline/reals-pipeline", serve)
        finally:
            stop.set()
            watcher.join()
        assert run.state.is_completed(), cluster.log("serve").read_text()[-4000:]
    assert serve.pid in seen and len(seen) > 1  # the flow run's own process was seen too
    root = join(cluster.env["REALS_RUNS_URL"], "micro")
    for step in ("train-vae", "train-sit", "make-reference", "evaluate", "downstream"):
        record = read_json(join(root, "pipeline", f"{step}.json"))
        assert record is not None, step
        where = record["summary"]["ran_on"]
        assert where["node"] and where["pid"] not in seen, (step, where)
    assert re.fullmatch(r"[0-9a-f]+", where["node"])
