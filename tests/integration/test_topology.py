"""The production topology, end to end: stages as drivers on a two-node Ray cluster with S3 credentials only
in the driver, served deployments run through the Prefect API, an S3 outage and the loss of a node mid-encode,
and the demo entry with a slow Prefect API start-up. Tests run in file order; the node loss comes last."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from helpers import TCPProxy, run_when_served
from test_experiment import MICRO as EXPERIMENT_MICRO
from topology import CREDENTIALS, MICRO, ROOT, driver_env, freeze_mid_unit, process_title, reals, s3_probe

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A synthetic folder of 2 classes and its shards on local disk (8 shards of 4)."""
    from pipelines.stages.shard import ShardConfig, run as shard
    from pipelines.stages.synthetic import SyntheticConfig, run as synthetic

    root = tmp_path_factory.mktemp("data")
    synthetic(SyntheticConfig(output=str(root / "images"), classes=2, per_class=16, size=32, seed=0))
    shard(ShardConfig(data_path=str(root / "images"), output=str(root / "shards"), resolution=32, shard_size=4,
                      workers=2, show_progress=False))
    return root


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    from helpers import make_vae_dir

    return make_vae_dir(tmp_path_factory.mktemp("vae") / "tiny")


@pytest.fixture(scope="module")
def reference_store(data, vae_dir, tmp_path_factory):
    """The undisturbed encode (in this process, no Ray) every disturbed run must equal value for value."""
    from pipelines.stages.encode import EncodeConfig, run

    out = tmp_path_factory.mktemp("ref") / "store"
    run(EncodeConfig(data_path=str(data / "shards"), vae_path=vae_dir, output=str(out), workers=0,
                     show_progress=False))
    return str(out)


# ---------------------------------------------------------------------------------------------------

def test_a_driver_with_ray_address_uses_both_nodes_and_s3_with_its_own_credentials(cluster, data):
    env = driver_env(cluster)
    results, _ = s3_probe(env, "s3://reals/probe")
    assert len({node for node, _, _ in results}) == 2  # both nodes ran units
    assert all(text == "ok" and has_key for _, text, has_key in results)
    # the nodes themselves were started without any credentials
    for name in ("ray-head", "ray-worker"):
        pid = cluster.state["processes"][name]["pid"]
        assert b"AWS_SECRET_ACCESS_KEY" not in Path(f"/proc/{pid}/environ").read_bytes()
    # a real stage: shards straight to S3 from a driver on the cluster
    r = reals(["shard", "--data-path", str(data / "images"), "--output", "s3://reals/it/shards", "--resolution",
               "32", "--shard-size", "4"], env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "AWS_SECRET_ACCESS_KEY" not in r.stdout + r.stderr and CREDENTIALS["AWS_SECRET_ACCESS_KEY"] not in \
        r.stdout + r.stderr


@pytest.mark.timeout(5400)  # the whole micro chain, then every stage again (skipping done units), on 2 cores
def test_every_deployment_completes_when_a_served_worker_runs_it(cluster, micro_config):
    """What the UI's Run button does: create a flow run of each deployment; a `reals serve` process runs it."""
    with _serving(cluster, micro_config) as (serve, run_deployment):
        names = ["reals-pipeline", "synthetic", "shard", "train-vae", "convert", "encode", "train-sit", "sample",
                 "make-reference", "evaluate", "downstream", "reencode", "experiment"]
        # The experiment's form is pre-filled with its ~10-minute preset; a user edits it, here to micro sizes.
        micro_experiment = {"config": {**EXPERIMENT_MICRO, "output": str(cluster.root / "local" / "experiment")}}
        states, why = {}, {}
        for name in names:
            run = run_when_served(run_deployment, f"{name}/{name}", serve,
                                   parameters=micro_experiment if name == "experiment" else None)
            states[name] = run.state.type.value
            if states[name] != "COMPLETED":
                why[name] = run.state.message
        assert states == dict.fromkeys(names, "COMPLETED"), (why, cluster.log("serve").read_text()[-4000:])


@contextmanager
def _serving(cluster, config):
    """``(reals serve process, run_deployment)`` on the cluster, with this process's Prefect client pointed at it."""
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.runtime import wait_for_api

    serve = cluster.serve(str(config))
    try:
        with temporary_settings({PREFECT_API_URL: cluster.env["PREFECT_API_URL"]}):
            wait_for_api(cluster.env["PREFECT_API_URL"], 60)
            yield serve, run_deployment
    finally:
        serve.terminate()
        try:
            serve.wait(60)
        except subprocess.TimeoutExpired:
            serve.kill()


def _s3_env(cluster, monkeypatch) -> None:
    """This process's own S3 reads go to the cluster's endpoint with the drivers' credentials."""
    import s3fs

    monkeypatch.setenv("AWS_ENDPOINT_URL", cluster.env["AWS_ENDPOINT_URL"])
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    s3fs.S3FileSystem.clear_instance_cache()


def test_reencode_run_by_a_served_worker_after_an_arrival_writes_one_new_shard_and_its_row(
        cluster, micro_config, vae_dir, tmp_path, monkeypatch):
    """The nightly deployment through the API, twice: after one image arrives in the first class, written shard
    tars, store chunks and commits are byte-identical, and one new shard with one row is added."""
    from pipelines.stages.synthetic import SyntheticConfig, run as synthetic
    from storage.fs import filesystem

    _s3_env(cluster, monkeypatch)
    images = tmp_path / "images"
    synthetic(SyntheticConfig(output=str(images), classes=2, per_class=8, val_per_class=1, size=32, seed=0))
    root = "s3://reals/it/reencode"
    config = {"output": root, "local_dir": str(tmp_path / "local"), "images": str(images), "shard": MICRO["shard"],
              "encode": {**MICRO["encode"], "vae_path": vae_dir}}
    fs, _ = filesystem(root)

    def written() -> dict[str, bytes]:  # shard tars, store chunks and commits
        fs.invalidate_cache()
        return {p: fs.cat_file(p) for p in fs.find(root)
                if p.endswith(".tar") or ("/latents/" in p and ("/c/" in p or re.search(r"/commits/\d{12}\.json$", p)))}

    with _serving(cluster, micro_config) as (serve, run_deployment):
        first = run_when_served(run_deployment, "reencode/reencode", serve, parameters={"config": config})
        assert first.state.is_completed(), cluster.log("serve").read_text()[-4000:]
        before = written()
        first_class = sorted((images / "train").iterdir())[0]
        shutil.copy(sorted(first_class.iterdir())[-1], first_class / "aaa_arrival.JPEG")
        second = run_when_served(run_deployment, "reencode/reencode", serve, parameters={"config": config})
        assert second.state.is_completed(), cluster.log("serve").read_text()[-4000:]
    after = written()
    assert {p: after[p] for p in before} == before
    added = sorted(set(after) - set(before))
    assert [p.rsplit("/", 1)[-1] for p in added if p.endswith(".tar")] == ["train-000004.tar"]
    [marker] = [m for m in (json.loads(after[p]) for p in added if "/commits/" in p) if "shard" in m]
    assert (marker["shard"], marker["count"]) == ("train-000004.tar", 1)


def committed_shards_in(store: str) -> list[dict]:
    """The shard commits (done-markers) of every version of ``store``, read from its commit logs."""
    from storage.fs import filesystem

    fs, path = filesystem(store)
    fs.invalidate_cache()
    slots = [p for p in fs.find(path) if re.search(r"/commits/\d{12}\.json$", p)]
    return [doc for doc in (json.loads(fs.cat_file(p)) for p in slots) if "shard" in doc]


def _wait_for_commits(store: str, n: int, proc, timeout: float = 900) -> None:
    """Until at least ``n`` shards are committed in the store (the encode is under way)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the encode ended before the fault could be injected"
        if len(committed_shards_in(store)) >= n:
            return
        time.sleep(0.2)
    raise AssertionError(f"fewer than {n} shards committed within {timeout:.0f} s")


def test_a_10s_s3_outage_during_encode_is_retried(cluster, data, vae_dir, reference_store, monkeypatch):
    _s3_env(cluster, monkeypatch)

    moto = cluster.env["AWS_ENDPOINT_URL"]
    proxy = TCPProxy(int(moto.rsplit(":", 1)[1]))
    store = "s3://reals/it/outage-store"
    env = driver_env(cluster, AWS_ENDPOINT_URL=proxy.url)
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "encode", "--data-path", str(data / "shards"),
                             "--vae-path", vae_dir, "--output", store, "--workers", "2"], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_commits(store, 1, proc)
        proxy.cut()
        time.sleep(10)
        proxy.restore()
        out, err = proc.communicate(timeout=900)
    finally:
        proc.kill()
        proxy.cut()
    assert proc.returncode == 0, err[-3000:]
    _assert_same_store(store, reference_store)


def _assert_same_store(store: str, reference: str) -> None:
    from storage.latent_store import LatentStore

    got, want = LatentStore.open(store), LatentStore.open(reference)
    markers = got.markers()  # every marker agrees with its rows, and every row is done
    assert all(got.marker_agrees(markers.get(e["name"]), e) for e in got.shard_map)
    assert bool(got.done_rows().all()) and got.num_samples == want.num_samples
    for name in ("mean", "std", "labels"):
        np.testing.assert_array_equal(got.read(name, slice(0, got.num_rows)), want.read(name, slice(0, want.num_rows)),
                                      err_msg=name)


def test_losing_the_worker_node_mid_encode_still_completes_the_store(cluster, data, vae_dir, reference_store,
                                                                     tmp_path):
    """The worker node's actor is frozen mid-unit, then the node (raylet and actor) is killed."""
    import os
    import signal

    from pipelines.ray_reaper import descendants

    node = cluster.state["processes"]["ray-worker"]
    root = {node["pid"]: node["start"]}
    raylets = [pid for pid in descendants(root) if process_title(pid).endswith(b"/raylet")]
    assert len(raylets) == 1
    store = str(tmp_path / "store")
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "encode", "--data-path", str(data / "shards"),
                             "--vae-path", vae_dir, "--output", store, "--workers", "2"], env=driver_env(cluster),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        actor = freeze_mid_unit(root, b"ray::EncodeWorker.encode_shard", proc)
        os.kill(raylets[0], signal.SIGKILL)
        os.kill(actor, signal.SIGKILL)
        out, err = proc.communicate(timeout=900)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "re-submitting it" in out + err
    _assert_same_store(store, reference_store)


def test_the_demo_entry_survives_a_30s_api_start_up_delay(micro_config, tmp_path):
    """The local API's start is delayed 30 s (a sitecustomize that sleeps in its uvicorn process only)."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_URL", "RAY_ADDRESS"))}
    env.update(PYTHONPATH=os.pathsep.join([str(HERE / "slow_api"), str(ROOT)]), REALS_TEST_API_DELAY="30",
               PREFECT_HOME=str(tmp_path / "prefect-home"))
    t0 = time.monotonic()
    r = reals(["pipeline", "--config", str(micro_config), "--output", str(tmp_path / "run")], env, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "run" / "report" / "report.md").is_file()
    assert time.monotonic() - t0 > 30  # the delay was there
