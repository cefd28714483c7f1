"""Injected faults (issue 19): crafted URLs and names, broken chunks and weights, mismatched shapes, empty input.

Each test injects one fault into a copy of the session's artifacts and checks the stage's answer: one
clear line (exit 2 from the CLI), nothing written where it does not belong, and a repair where one exists.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from pipelines.cli import main as cli_main
from pipelines.stages.encode import EncodeConfig, run as encode_run
from storage import StorageError
from storage.fs import check_name, join, within
from storage.latent_store import LatentStore
from storage.lease import Lease, LeaseLost, fence

from helpers import TCPProxy, make_vae_dir


def encode(data_path, vae_path, output, **kw):
    return encode_run(EncodeConfig(data_path=data_path, vae_path=vae_path, output=output, chunk_rows=16,
                                   workers=0, show_progress=False, **kw))


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# ---------------------------------------------------------------------------------------------------
# Store URLs and names
# ---------------------------------------------------------------------------------------------------

def test_encode_refuses_a_version_url_and_a_folder_inside_a_store(tiny_store, tiny_shards, tiny_vae_dir, capsys):
    root, summary = tiny_store
    version = join(root, summary.version)
    before = sorted(p.name for p in Path(version).iterdir())
    with pytest.raises(StorageError, match=f"is a Zarr group .*pass --output {root}$"):
        encode(tiny_shards, tiny_vae_dir, version)
    with pytest.raises(StorageError, match=f"lies inside the latent store {root}:"):
        encode(tiny_shards, tiny_vae_dir, join(root, "nested", "store"))
    assert cli_main(["encode", "--data-path", tiny_shards, "--vae-path", tiny_vae_dir, "--output", version,
                     "--workers", "0"]) == 2
    assert "is a Zarr group" in one_error_line(capsys)
    assert sorted(p.name for p in Path(version).iterdir()) == before
    assert not os.path.exists(join(root, "nested"))


def test_a_crafted_manifest_name_is_refused(tiny_shards, tiny_vae_dir, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_shards, data)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][1] = "../../../../x/escape.tar"
    (data / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "deep" / "er" / "store"
    assert cli_main(["encode", "--data-path", str(data), "--vae-path", tiny_vae_dir, "--output", str(out),
                     "--workers", "0"]) == 2
    assert "refusing manifest.json shard name '../../../../x/escape.tar'" in one_error_line(capsys)
    assert not out.exists() and not (tmp_path / "x").exists()


@pytest.mark.parametrize("name", ["../x.tar", "a/b.tar", "/abs.tar", "..", "", "c:\\x.tar", "s3://b/k"])
def test_names_must_be_plain_file_names(name):
    with pytest.raises(StorageError, match="refusing"):
        check_name(name)


def test_writes_stay_under_their_root(storage_root):
    from test_latent_store import make_store

    store, _ = make_store(join(storage_root, "store"))
    with pytest.raises(StorageError, match="refusing shard name"):
        store.write_marker({"shard": "../../../escape.tar", "row_start": 0, "count": 1})
    with pytest.raises(StorageError, match="lies outside"):
        within(store.url, join(store.url, "markers", "..", "..", "..", "escape.json"))
    assert within(store.url, join(store.url, "markers", "x.json")).endswith("markers/x.json")
    assert store.markers() == {}


# ---------------------------------------------------------------------------------------------------
# Damaged or mismatched artifacts, empty input
# ---------------------------------------------------------------------------------------------------

def test_a_truncated_vae_weight_file_is_one_line(tiny_shards, tmp_path, capsys):
    vae_dir = make_vae_dir(tmp_path / "vae")
    weights = Path(vae_dir) / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    args = ["encode", "--data-path", tiny_shards, "--vae-path", vae_dir, "--output", str(tmp_path / "s"),
            "--workers", "0"]
    assert cli_main(args) == 2
    assert "diffusion_pytorch_model.safetensors is 1000 bytes" in one_error_line(capsys)
    prov = json.loads((Path(vae_dir) / "provenance.json").read_text())
    del prov["files"]  # a directory converted before sizes were recorded: the loader's own error
    (Path(vae_dir) / "provenance.json").write_text(json.dumps(prov))
    assert cli_main(args) == 2
    assert "cannot load the ReaLS VAE dir" in one_error_line(capsys)
    assert not (tmp_path / "s").exists()


def test_encode_refuses_a_vae_trained_at_another_resolution(tiny_shards, tmp_path, capsys):
    vae16 = make_vae_dir(tmp_path / "vae16", resolution=16)
    out = tmp_path / "s"
    args = ["encode", "--data-path", tiny_shards, "--vae-path", vae16, "--output", str(out), "--workers", "0"]
    assert cli_main(args) == 2
    assert "was trained at 16 px, the shards of" in one_error_line(capsys)
    assert not out.exists()
    summary = encode(tiny_shards, vae16, str(out), allow_resolution_mismatch=True)
    assert summary.rows_done == 48


def test_evaluate_refuses_different_resolutions_unless_allowed(tmp_path, capsys):
    rng = np.random.default_rng(0)
    ref, samples = tmp_path / "ref32.npz", tmp_path / "samples16.npz"
    np.savez(ref, rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8))
    np.savez(samples, rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8))
    args = ["evaluate", str(ref), str(samples), "--features", "effnet", "--output", str(tmp_path / "m.json")]
    assert cli_main(args) == 2
    assert "reference images are 32x32x3, samples 16x16x3" in one_error_line(capsys)
    assert not (tmp_path / "m.json").exists()
    assert cli_main(args + ["--allow-resolution-mismatch"]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["metrics"]["FD_effnet"]["value"] > 0


def test_an_empty_split_is_an_error_at_shard_time(tmp_path, capsys):
    (tmp_path / "data" / "train" / "only_class").mkdir(parents=True)
    out = tmp_path / "shards"
    assert cli_main(["shard", "--data-path", str(tmp_path / "data"), "--output", str(out),
                     "--resolution", "32"]) == 2
    line = one_error_line(capsys)
    assert "split 'train' of" in line and line.endswith("holds no files (empty class folders: only_class)")
    assert not (out / "manifest.json").exists()


# ---------------------------------------------------------------------------------------------------
# The lease through storage outages
# ---------------------------------------------------------------------------------------------------

class FlakyBackend:
    """Wraps a lease backend; while ``down`` every call raises what botocore raises when S3 is unreachable."""

    def __init__(self, inner):
        self.inner, self.down = inner, False

    def __getattr__(self, name):
        method = getattr(self.inner, name)

        def call(*args):
            if self.down:
                from botocore.exceptions import EndpointConnectionError

                raise EndpointConnectionError(endpoint_url="http://127.0.0.1:1")
            return method(*args)
        return call


def test_renewal_rides_out_an_outage_shorter_than_the_ttl(tmp_path):
    lease = Lease(str(tmp_path / "lease.json"), owner="run-a", ttl=3.0)
    lease._backend = flaky = FlakyBackend(lease._backend)
    lost = threading.Event()
    with lease.hold(on_lost=lost.set):
        flaky.down = True
        time.sleep(1.0)  # renewals fail with a non-OSError, retried with backoff
        flaky.down = False
        time.sleep(3.5)  # renewals succeed again: more than a TTL later the lease is still ours
        lease.check()
        assert lease.holder()["owner"] == "run-a" and not lost.is_set()
    assert lease.holder() is None


def test_an_outage_longer_than_the_ttl_stops_the_holder(tmp_path):
    lease = Lease(str(tmp_path / "lease.json"), owner="run-a", ttl=1.0)
    lease._backend = flaky = FlakyBackend(lease._backend)
    lost = threading.Event()
    with pytest.raises(LeaseLost, match="could not be renewed before it expired .EndpointConnectionError"):
        with lease.hold(on_lost=lost.set):
            flaky.down = True
            assert lost.wait(5), "the watchdog never declared the lease lost"
            assert lease.remaining() > 0  # declared lost before it expired, so nobody else holds it yet
            lease.check()
    flaky.down = False
    assert Lease(lease.url, owner="run-b", ttl=5).acquire(wait=2, poll=0.05).holder()["owner"] == "run-b"


def test_a_dead_local_holder_is_taken_over_at_once(tmp_path):
    url = str(tmp_path / "lease.json")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    Lease(url, owner=f"{host}:{int(dead.stdout)}:crashed", ttl=600).acquire()
    taker = Lease(url, owner="next", ttl=5).acquire(wait=0)
    assert taker.holder()["owner"] == "next"
    taker.release()
    Lease(url, owner=f"{host}:{os.getppid()}:alive", ttl=600).acquire()  # a live process of this host
    with pytest.raises(StorageError, match=f"leased by {host}:{os.getppid()}:alive"):
        Lease(url, owner="third", ttl=5).acquire(wait=0)


def test_fence_refuses_once_another_run_holds_the_lease(tmp_path):
    url = str(tmp_path / "lease.json")
    first = Lease(url, owner="run-a", ttl=0.3).acquire()
    fence(url, "run-a")
    time.sleep(0.4)
    Lease(url, owner="run-b", ttl=30).acquire()
    with pytest.raises(LeaseLost, match="held by run-b"):
        fence(url, "run-a")
    with pytest.raises(LeaseLost, match="was lost .now held by run-b"):
        first.renew()


def test_an_s3_outage_longer_than_the_lease_ttl_hands_the_store_to_the_waiting_run(
        tiny_shards, tiny_vae_dir, s3_server, s3_bucket):
    """Run A reaches S3 through a proxy that is cut at A's first shard commit, for longer than the lease TTL;
    run B waits for the lease. B takes the store over and finishes it; A exits with one line and never
    writes again, not even once S3 answers again."""
    from pipelines.stages.verify_store import check_markers

    proxy = TCPProxy(int(s3_server.rsplit(":", 1)[1]), cut_on=b"/commits/000000000001.json")
    store = f"{s3_bucket}/store"
    lease_url = join(store, "encode.lease.json")
    # A 10 s TTL: short, yet beyond the stalls a loaded 2-core machine gives a renewal thread. A retries its
    # shard for 1 + 2 + ... + 7 s, so the lease runs out while A is still running.
    cmd = [sys.executable, "-m", "pipelines.cli", "encode", "--data-path", tiny_shards, "--vae-path", tiny_vae_dir,
           "--output", store, "--workers", "0", "--chunk-rows", "16", "--lease-ttl", "10"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "AWS_MAX_ATTEMPTS": "1"}
    a = subprocess.Popen(cmd + ["--retries", "8"], env={**env, "AWS_ENDPOINT_URL": proxy.url},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    b = None
    try:
        a_owner = poll(lambda: (Lease(lease_url).holder() or {}).get("owner"), "run A to take the lease")
        b = subprocess.Popen(cmd + ["--lease-wait", "300"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
        poll(lambda: proxy.cut_at or a.poll() is not None, "run A to commit its first shard")
        assert a.poll() is None, f"run A ended before the outage: {a.communicate()[1][-3000:]}"
        poll(lambda: (Lease(lease_url).holder() or {}).get("owner") not in (None, a_owner), "run B to take over")
        proxy.restore()  # S3 answers run A again, now that B holds the lease
        _, a_err = a.communicate(timeout=300)
        _, b_err = b.communicate(timeout=300)
    finally:
        for p in (a, b):
            if p is not None and p.poll() is None:
                p.kill()
    assert (a.returncode, b.returncode) == (2, 0), (a_err[-2000:], b_err[-2000:])
    errors = [line for line in a_err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "lease on" in errors[0] and "stopped writing" in errors[0], a_err[-2000:]
    assert "Traceback" not in a_err
    late = [r for t, r in proxy.requests if t >= proxy.cut_at and not r.startswith(("GET", "HEAD"))]
    assert late == [], "run A wrote after its lease ran out"
    done = LatentStore.open(store)
    assert done.done_rows().sum() == 48 and check_markers(done) == (2, [])


def poll(value, what: str, timeout: float = 240.0, every: float = 0.05):
    """``value()`` once it is truthy; fails the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if v := value():
            return v
        time.sleep(every)
    pytest.fail(f"timed out waiting for {what}")


# ---------------------------------------------------------------------------------------------------
# An undecodable chunk
# ---------------------------------------------------------------------------------------------------

def test_a_truncated_chunk_is_reported_redone_and_refused_by_name(tiny_store, tiny_shards, tiny_vae_dir, tmp_path,
                                                                   capsys):
    from pipelines.stages.verify_store import VerifyStoreConfig, run as verify
    from storage.latent_loader import LatentLoader
    from storage.latent_store import CorruptChunk

    root, summary = tiny_store
    copy = tmp_path / "store"
    shutil.copytree(root, copy)
    segment = LatentStore.open(str(copy)).markers()["train-000001.tar"]["segment"]
    chunk = copy / summary.version / "segments" / segment / "mean" / "c" / "0" / "0" / "0" / "0"  # rows 32..47
    chunk.write_bytes(chunk.read_bytes()[:10])
    line = "shard train-000001.tar, rows 32..47 of array mean: a chunk that cannot be decoded"

    assert cli_main(["verify-store", str(copy), "--data-path", tiny_shards, "--vae-path", tiny_vae_dir,
                     "--num-samples", "48"]) == 1
    out = capsys.readouterr()
    assert out.out.count(line) == 1 and "Traceback" not in out.err

    for in_memory in (True, False):
        with pytest.raises(CorruptChunk, match="shard train-000001.tar, rows 32..47 of array mean cannot be decoded"):
            list(LatentLoader(str(copy), batch_size=8, in_memory=in_memory))
    assert cli_main(["train-sit", "--data-path", str(copy), "--output", str(tmp_path / "sit"), "--model", "SiT-T/4",
                     "--global-batch-size", "8", "--max-steps", "2", "--sample-every", "0", "--no-progress"]) == 2
    assert "shard train-000001.tar, rows 32..47 of array mean cannot be decoded" in one_error_line(capsys)

    redone = encode(tiny_shards, tiny_vae_dir, str(copy), verify=True)
    assert (redone.shards_redone, redone.shards_skipped) == (1, 1)
    fixed = verify(VerifyStoreConfig(store=str(copy), data_path=tiny_shards, vae_path=tiny_vae_dir, num_samples=8))
    assert fixed.ok, fixed.problems


# ---------------------------------------------------------------------------------------------------
# Faults of the machine and of the input (issue 32): one line and exit 2, or a line naming the signal; no temp
# file left behind; the same command resumes
# ---------------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


def reals(*args, env: dict | None = None, file_limit: int | None = None, timeout: float = 600):
    """``python -m pipelines.cli ARGS`` in a subprocess (``file_limit``: the largest file it may write, as
    ``ulimit -f`` sets it)."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))

    return subprocess.run([sys.executable, "-m", "pipelines.cli", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
                          preexec_fn=limit if file_limit else None)


def the_line(r: subprocess.CompletedProcess) -> str:
    """The one ``error:`` line of a command that exited 2, and nothing else on stderr."""
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (r.returncode, r.stderr[-3000:])
    return lines[0]


def temp_files(root) -> list[Path]:
    """Temporary files of interrupted writes under ``root`` (ours: ``.tmp-<hex>``; zarr's: ``.partial``)."""
    return [p for p in Path(root).rglob("*") if ".tmp-" in p.name or p.name.endswith(".partial")]


def sit_args(store: str, output, *more) -> list[str]:
    return [str(a) for a in ["train-sit", "--data-path", store, "--output", output, "--model", "SiT-T/4", "--global-batch-size", "8",
            "--sample-every", "0", "--no-progress", *more]]


@pytest.mark.parametrize("listener", ["silent", "http"])
def test_a_ray_address_that_is_not_ray_is_one_line(listener, synthetic_root, tmp_path):
    """A port that accepts TCP but never speaks Ray's protocol: the check gives up after its bounded wait."""
    import http.server

    server = None
    if listener == "silent":
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)  # connections complete in the backlog; nobody ever answers
        port = sock.getsockname()[1]
    else:
        server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        port = server.server_address[1]
    out = tmp_path / "shards"
    try:
        r = reals("shard", "--data-path", synthetic_root, "--output", out, "--resolution", "32",
                  env={"RAY_ADDRESS": f"127.0.0.1:{port}"}, timeout=120)
    finally:
        sock.close() if server is None else server.shutdown()
    line = the_line(r)
    assert line.startswith(f"error: could not start the Ray cluster at RAY_ADDRESS=127.0.0.1:{port}: ")
    assert "accepts connections but no Ray GCS answered" in line
    assert not (out / "manifest.json").exists() and temp_files(tmp_path) == []


@pytest.mark.parametrize("text, expected", [
    ("resolution: true\n", "invalid --resolution: expected an integer, got the boolean true"),
    ("resolution: 7\nshard:\n  image_format: png\n", "top-level resolution is read by nothing beside the shard: "),
    ("resolution: 7\nshard:\n  resolution: 32\n", "resolution is set both at the top level and in the shard: "),
    ("shard:\n  resolution: [32\n  image_format: png\n", ", line 3: "),
    ("resolution: !!python/object/apply:os.system ['touch {marker}']\n",
     ", line 1: could not determine a constructor for the tag 'tag:yaml.org,2002:python/object/apply:os.system'"),
])
def test_a_bad_stage_config_is_one_line(text, expected, synthetic_root, tmp_path, capsys):
    marker = tmp_path / "ran"
    cfg = tmp_path / "shard.yaml"
    cfg.write_text(text.format(marker=marker))
    out = tmp_path / "shards"
    assert cli_main(["shard", "--data-path", str(synthetic_root), "--output", str(out), "--config", str(cfg)]) == 2
    line = one_error_line(capsys)
    assert expected in line and (expected.startswith("invalid") or str(cfg) in line), line
    assert not out.exists() and not marker.exists()


@pytest.mark.parametrize("text, expected", [
    ("output: {out}\nshard: {{resolution: true}}\n", "shard.resolution: expected an integer, got the boolean true"),
    ("output: {out}\nnproc_per_node: true\n", "nproc_per_node: expected an integer, got the boolean true"),
    ("output: !!python/object/apply:os.system ['touch {out}']\n", ", line 1: could not determine a constructor"),
    ("output: {out}\n  shard: x\n", ", line 2: mapping values are not allowed here"),
])
def test_a_bad_pipeline_config_is_one_line(text, expected, tmp_path, capsys):
    from flows.cli import main as reals_main

    out = tmp_path / "run"
    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text(text.format(out=out))
    assert reals_main(["pipeline", "--config", str(cfg)]) == 2
    line = one_error_line(capsys)
    assert expected in line and str(cfg) in line, line
    assert not out.exists()


def test_pipeline_keys_are_the_pipeline_configs_own_settings():
    """What a stage leaves to the pipeline beside its section (``PIPELINE_KEYS``) is PipelineConfig's non-section
    fields (and the former name of ``images``)."""
    import typing

    from pydantic import BaseModel

    from pipelines.pipeline_config import PipelineConfig
    from pipelines.config import PIPELINE_KEYS

    def section(annotation) -> bool:
        kinds = typing.get_args(annotation) or (annotation,)
        return any(isinstance(k, type) and issubclass(k, BaseModel) for k in kinds)

    own = {name for name, field in PipelineConfig.model_fields.items() if not section(field.annotation)}
    assert own | {"data_path"} == PIPELINE_KEYS


def test_a_split_without_image_files_is_refused(tmp_path, capsys):
    for cls, name in (("n01", ".DS_Store"), ("n02", "readme.txt"), ("n03", "labels.csv")):
        (tmp_path / "data" / "train" / cls).mkdir(parents=True)
        (tmp_path / "data" / "train" / cls / name).write_bytes(b"not an image\n")
    out = tmp_path / "shards"
    assert cli_main(["shard", "--data-path", str(tmp_path / "data"), "--output", str(out), "--resolution", "32"]) == 2
    line = one_error_line(capsys)
    assert "split 'train' of" in line and "holds no image files, only 3 other file(s)" in line
    assert not (out / "manifest.json").exists() and not list(out.glob("*.tar"))
    (tmp_path / "data" / "train" / "n02" / "photo").write_bytes(_png())
    from pipelines.stages.shard import list_split

    assert len(list_split(str(tmp_path / "data"), "train")[1]) == 4  # an image without an extension is one


def _png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("flag", ["--vae-ckpt", "--disc-ckpt"])
def test_a_malicious_weights_file_is_one_line(flag, tiny_shards, tmp_path, capsys):
    import torch

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    evil = tmp_path / "weights.pt"
    torch.save({"state_dict": {"w": Payload()}}, evil)
    out = tmp_path / "vae"
    assert cli_main(["train-vae", "--data-path", tiny_shards, "--output", str(out), "--vae-config", "tiny",
                     "--dino-model", "tiny-dinov2", "--max-steps", "1", flag, str(evil), "--no-progress"]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"error: refusing {evil}: not a plain weights file (") and "system" in line
    assert not marker.exists() and not out.exists()


def test_an_s3_endpoint_down_at_start_is_one_line_naming_it(tiny_shards, tiny_vae_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    r = reals("encode", "--data-path", tiny_shards, "--vae-path", tiny_vae_dir, "--output", "s3://bucket/store",
              "--workers", "0", "--no-progress",
              env={"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_MAX_ATTEMPTS": "1"})
    line = the_line(r)
    assert line.startswith(f"error: cannot reach the S3 endpoint http://127.0.0.1:{port} ")
    assert "re-run the same command to resume" in line


def test_disk_full_during_encode_is_one_line_and_leaves_no_temp_file(tiny_shards, tiny_vae_dir, tmp_path):
    out = tmp_path / "store"
    r = reals("encode", "--data-path", tiny_shards, "--vae-path", tiny_vae_dir, "--output", out, "--workers", "0",
              "--chunk-rows", "16", "--no-progress", file_limit=2048)
    line = the_line(r)
    assert line.startswith("error: File too large") and "re-run the same command to resume" in line
    assert temp_files(tmp_path) == []
    assert encode(tiny_shards, tiny_vae_dir, str(out)).rows_done == 48  # the same command, with room, completes


def test_disk_full_during_train_sit_is_one_line_and_a_rerun_removes_stale_temps(tiny_store, tmp_path):
    out = tmp_path / "sit"
    args = sit_args(tiny_store.url, out, "--max-steps", "2", "--ckpt-every", "1")
    r = reals(*args, file_limit=256 * 1024)  # the log and config fit; a checkpoint does not
    line = the_line(r)
    assert line.startswith("error: File too large") and "re-run the same command with --resume" in line
    assert temp_files(tmp_path) == [] and not list(out.glob("*.pt"))
    stale = out / f"0000010.pt.tmp-{'ab' * 16}"  # what a run killed mid-write leaves
    stale.write_bytes(b"x" * 1000)
    r = reals(*args, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert temp_files(tmp_path) == [] and (out / "0000002.pt").exists()


def test_only_the_owning_rank_removes_stale_temps(tmp_path):
    from pipelines.checkpoints import checkpoint_to_resume

    temp = tmp_path / f"log.jsonl.tmp-{'cd' * 16}"  # rank 0 may be writing it while rank 1 starts
    temp.write_bytes(b"{}")
    assert checkpoint_to_resume(str(tmp_path), False, owner=False) is None and temp.exists()
    assert checkpoint_to_resume(str(tmp_path), False, owner=True) is None and not temp.exists()


def test_a_torn_last_log_line_is_dropped_on_resume(tiny_store, tmp_path):
    out = tmp_path / "sit"
    args = sit_args(tiny_store.url, out, "--log-every", "1", "--ckpt-every", "1")
    assert cli_main(args + ["--max-steps", "2"]) == 0
    log = out / "log.jsonl"
    with open(log, "a") as f:
        f.write('{"epoch": 0, "loss": 0.5')  # a run killed while appending step 3
    r = reals(*args, "--max-steps", "3", "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "dropped its torn last line" in r.stderr
    assert [json.loads(ln)["step"] for ln in log.read_text().splitlines()] == [1, 2, 3]


def _stopped_by_sigterm(p: subprocess.Popen, resume: str) -> None:
    import signal

    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=300)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert p.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert lines and lines[-1] == f"stopped by SIGTERM: {resume}", err[-3000:]
    assert "Traceback" not in err and "SIGTERM received" not in err, err[-3000:]


def test_sigterm_stops_train_sit_cleanly_and_it_resumes(tiny_store, tmp_path):
    out = tmp_path / "sit"
    args = sit_args(tiny_store.url, out, "--log-every", "1", "--ckpt-every", "2")
    p = subprocess.Popen([sys.executable, "-m", "pipelines.cli", *map(str, args), "--max-steps", "100000"], cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        poll(lambda: (out / "0000002.pt").exists(), "train-sit to write its first checkpoint")
        _stopped_by_sigterm(p, "re-run the same command with --resume to continue from the last checkpoint")
    finally:
        p.kill()
    assert temp_files(tmp_path) == []
    done = json.loads((out / "latest.json").read_text())["step"]
    r = reals(*args, "--max-steps", done + 1, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((out / "latest.json").read_text())["step"] == done + 1


def test_sigterm_stops_encode_on_ray_cleanly_and_it_resumes(tiny_shards, tiny_vae_dir, tmp_path):
    from pipelines.ray_reaper import _stat, descendants

    out = tmp_path / "store"
    p = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "encode", "--data-path", tiny_shards, "--vae-path",
                          tiny_vae_dir, "--output", str(out), "--workers", "1", "--chunk-rows", "16", "--no-progress"],
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": ""},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def ray_workers() -> bool:
        stat, names = _stat(p.pid), []
        for child in descendants({p.pid: stat[1]}) if stat else []:
            try:
                names.append(Path(f"/proc/{child}/cmdline").read_text())
            except OSError:
                pass
        return any(n.startswith("ray::") for n in names) or p.poll() is not None

    try:
        poll(ray_workers, "the driver to start Ray and its workers", every=0.2)
        assert p.poll() is None, p.communicate()[1][-3000:]
        _stopped_by_sigterm(p, "re-run the same command to resume")
    finally:
        p.kill()
    assert temp_files(tmp_path) == []
    assert encode(tiny_shards, tiny_vae_dir, str(out)).rows_done == 48
