"""reals encode and verify-store on the tiny shards with a real (tiny) converted ReaLS VAE, on 2 Ray workers."""
from __future__ import annotations

import glob
import json
import shutil
import threading
import time

import numpy as np
import pytest
import zarr

from pipelines import StageError
from pipelines.cli import main as cli_main
from pipelines.stages.encode import ENCODE_THREADS, EncodeConfig, EncodeWorker, run
from pipelines.encoding import TeacherSpec
from pipelines.stages.verify_store import VerifyStoreConfig
from pipelines.stages.verify_store import run as verify
from storage import StorageError
from storage.fs import join
from storage.latent_store import LatentStore, commit_log, committed_shards
from storage.lease import Lease
from storage.markers import read_json
from storage.shards import iter_shard

from helpers import make_vae_dir


@pytest.fixture(scope="module")
def vae_dirs(tiny_vae_dir, tmp_path_factory):
    """The VAE of ``tiny_store`` and another one (seed 1)."""
    return tiny_vae_dir, make_vae_dir(tmp_path_factory.mktemp("vaes") / "b", seed=1)


def encode(data_path, vae_path, output, **kw):
    kw.setdefault("workers", 0)  # in-process; the S3 test runs 2 Ray workers
    return run(EncodeConfig(data_path=data_path, vae_path=vae_path, output=output, chunk_rows=16,
                            show_progress=False, **kw))


def arrays(version_url):
    """Every row of every array of a version, padding included, as readers see them (committed rows only)."""
    store = LatentStore.open(version_url)
    return store.read_rows(0, store.num_rows)


def segment(version_url, shard):
    """The Zarr group of a shard's committed rows (plain zarr, writable: for tampering)."""
    name = committed_shards(commit_log(version_url))[shard]["segment"]
    return zarr.open_group(join(version_url, "segments", name), mode="r+")


def uncommit(version_url, shard):
    """Turn a shard's commits into no-op entries, as if its writer had died before committing."""
    for path in sorted(glob.glob(join(version_url, "commits", "*.json"))):
        with open(path) as f:
            doc = json.load(f)
        if doc.get("shard") == shard:
            with open(path, "w") as f:
                json.dump({"takeover": "test"}, f)


def assert_same_arrays(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert np.array_equal(a[name], b[name]), name


def copy_store(src, tmp_path):
    dst = str(tmp_path / "copy")
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------------------------------------------
# Encode
# ---------------------------------------------------------------------------------------------------

def test_encode_writes_a_complete_store(tiny_store, tiny_shards):
    out, summary = tiny_store
    assert (summary.shards, summary.shards_encoded, summary.rows_encoded, summary.rows_done) == (2, 2, 48, 48)
    group = zarr.open_group(join(out, summary.version), mode="r")  # plain zarr, no project code
    attrs = dict(group.attrs)
    rows = arrays(join(out, summary.version))
    for key in ("vae_fingerprint", "vae_path", "teacher", "latents_mean", "latents_std", "resolution", "latent_shape",
                "num_classes", "classes", "source_fingerprint", "source_shards", "code_version", "created"):
        assert attrs.get(key) not in (None, "", []), key
    assert attrs["latent_shape"] == [4, 8, 8] and attrs["teacher"]["name"] == "tiny-dinov2"
    assert attrs["source_shards"] == ["train-000000.tar", "train-000001.tar"]
    assert rows["mean"].shape == (64, 4, 8, 8) and rows["teacher_global"].shape == (64, 32)
    # rows of a shard are its samples in order; the pad rows of each 32-row range stay unlabelled
    for entry, url in zip(attrs["shards"], sorted(f"{tiny_shards}/{s}" for s in attrs["source_shards"])):
        samples = list(iter_shard(url))
        start = entry["row_start"]
        assert list(rows["keys"][start:start + len(samples)]) == [s["__key__"] for s in samples]
        assert rows["labels"][start:start + len(samples)].tolist() == [s["cls"] for s in samples]
        assert (rows["labels"][start + len(samples):start + entry["capacity"]] == -1).all()
        assert segment(join(out, summary.version), entry["name"])["mean"].shape == (entry["capacity"], 4, 8, 8)
    mean, flipped = rows["mean"][:24].astype(np.float32), rows["mean_flip"][:24].astype(np.float32)
    assert np.isfinite(mean).all() and not np.allclose(mean, flipped)
    assert (rows["std"][:24] > 0).all()
    assert read_json(join(out, "versions.json"))["latest"] == summary.version


def test_rerun_skips_done_shards(tiny_store, tiny_shards, vae_dirs, capsys):
    out, summary = tiny_store
    again = encode(tiny_shards, vae_dirs[0], out)
    assert (again.shards_encoded, again.shards_skipped, again.rows_done) == (0, 2, 48)
    assert "skipping 2 of 2 shards" in capsys.readouterr().out


def test_encode_writes_the_same_bits_in_process_and_on_one_or_two_actors(tiny_shards, vae_dirs, tmp_path,
                                                                        ray_session):
    """A driver computes on all its cores by default (2 here), a Ray actor on one: the workers pin theirs."""
    import torch

    torch.set_num_threads(2)
    try:
        stores = {w: encode(tiny_shards, vae_dirs[0], str(tmp_path / f"w{w}"), workers=w) for w in (0, 1, 2)}
        assert torch.get_num_threads() == 2  # the driver's own setting is given back
    finally:
        torch.set_num_threads(1)
    got = {w: arrays(join(str(tmp_path / f"w{w}"), s.version)) for w, s in stores.items()}
    for w in (1, 2):
        assert_same_arrays(got[0], got[w])
    threads = {w: LatentStore.open(str(tmp_path / f"w{w}")).attrs["torch_threads"] for w in stores}
    assert set(threads.values()) == {ENCODE_THREADS}


def test_encode_on_s3_with_two_ray_workers(tiny_shards, vae_dirs, s3_bucket, tiny_store, ray_session):
    out = f"{s3_bucket}/latents"
    summary = encode(tiny_shards, vae_dirs[0], out, workers=2)
    assert summary.rows_done == 48
    assert_same_arrays(arrays(join(out, summary.version)), arrays(join(tiny_store.url, tiny_store.summary.version)))


def test_interrupted_run_resumes_to_the_same_arrays(tiny_store, tiny_shards, vae_dirs, tmp_path):
    out, summary = tiny_store
    copy = copy_store(out, tmp_path)
    version = join(copy, summary.version)
    # a run killed while writing shard 1: half its rows garbage, no commit ...
    segment(version, "train-000001.tar")["mean"][0:8] = np.full((8, 4, 8, 8), 7, np.float16)
    uncommit(version, "train-000001.tar")
    # ... and rows of shard 0 damaged after its commit (found by --verify)
    segment(version, "train-000000.tar")["std"][0:16] = np.zeros((16, 4, 8, 8), np.float16)
    assert LatentStore.open_for_vae(copy, summary.vae_fingerprint, (4, 8, 8)).done_rows().sum() == 24
    resumed = encode(tiny_shards, vae_dirs[0], copy, verify=True)
    assert (resumed.shards_encoded, resumed.shards_redone, resumed.shards_skipped) == (1, 1, 0)
    assert_same_arrays(arrays(version), arrays(join(out, summary.version)))


def test_new_shards_extend_the_store(tiny_store, tiny_shards, vae_dirs, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(tiny_shards, partial)
    manifest = json.loads((partial / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"] = manifest["splits"]["train"]["shards"][:1]
    (partial / "manifest.json").write_text(json.dumps(manifest))
    out = str(tmp_path / "store")
    first = encode(str(partial), vae_dirs[0], out)
    assert (first.shards, first.shards_encoded, first.rows_done) == (1, 1, 24)
    shutil.copy(f"{tiny_shards}/manifest.json", partial / "manifest.json")
    # a crashed run left a lease behind: it has expired, so this run takes the store over
    Lease(join(out, "encode.lease.json"), owner="crashed-run", ttl=0.1).acquire()
    time.sleep(0.2)
    second = encode(str(partial), vae_dirs[0], out)
    assert (second.shards_encoded, second.shards_skipped, second.rows_done) == (1, 1, 48)
    assert_same_arrays(arrays(join(out, second.version)), arrays(join(tiny_store.url, tiny_store.summary.version)))


def test_another_vae_gets_its_own_version(tiny_store, tiny_shards, vae_dirs, tmp_path):
    out, summary = tiny_store
    copy = copy_store(out, tmp_path)
    other = encode(tiny_shards, vae_dirs[1], copy)
    assert other.version != summary.version and other.shards_encoded == 2
    index = read_json(join(copy, "versions.json"))
    assert [v["name"] for v in index["versions"]] == [summary.version, other.version]
    assert index["latest"] == other.version
    assert LatentStore.open(copy).version == other.version
    old = LatentStore.open(copy, version=summary.version)
    assert old.done_rows().sum() == 48
    assert_same_arrays(arrays(old.url), arrays(join(out, summary.version)))
    with pytest.raises(StorageError, match=f"made by VAE {summary.version}, not by VAE {other.version}"):
        LatentStore.open_for_vae(old.url, other.version, (4, 8, 8))


def test_live_lease_refuses_or_waits(tiny_store, tiny_shards, vae_dirs):
    out, _ = tiny_store
    holder = Lease(join(out, "encode.lease.json"), owner="other-run", ttl=60).acquire()
    try:
        with pytest.raises(StorageError, match="leased by other-run until"):
            encode(tiny_shards, vae_dirs[0], out)
        threading.Timer(0.5, holder.release).start()
        waited = encode(tiny_shards, vae_dirs[0], out, lease_wait=20)
        assert waited.shards_skipped == 2
    finally:
        holder.release()


def test_a_failing_unit_is_retried_before_its_marker(tiny_store, tiny_shards, vae_dirs, tmp_path, monkeypatch):
    out, summary = tiny_store
    copy = copy_store(out, tmp_path)
    store = LatentStore.open_for_vae(copy, summary.vae_fingerprint, (4, 8, 8))
    entry = store.shard_map[1]
    checksum = store.markers()[entry["name"]]["checksum"]
    unit = {"name": entry["name"], "url": f"{tiny_shards}/{entry['name']}", "source_sha256": None, "marker": None,
            "group_url": store.url, "vae_fingerprint": summary.vae_fingerprint, "latent_shape": [4, 8, 8],
            "row_start": entry["row_start"], "capacity": entry["capacity"]}
    worker = EncodeWorker(vae_dirs[0], TeacherSpec("tiny-dinov2", 28, None), "cpu", batch_size=32, retries=2,
                          retry_delay=0)
    real_write = LatentStore.write_rows
    calls = []

    def flaky_write(self, row_start, rows):
        calls.append(row_start)
        if len(calls) == 1:
            raise OSError("S3 said: SlowDown")
        return real_write(self, row_start, rows)

    def broken_write(self, row_start, rows):
        raise OSError("S3 is down")

    monkeypatch.setattr(LatentStore, "write_rows", flaky_write)
    uncommit(store.url, entry["name"])
    result = worker.encode_shard(unit)
    assert (result["status"], result["attempts"], len(calls)) == ("encoded", 2, 2)
    assert store.markers()[entry["name"]]["checksum"] == checksum
    assert_same_arrays(arrays(store.url), arrays(join(out, summary.version)))
    uncommit(store.url, entry["name"])
    monkeypatch.setattr(LatentStore, "write_rows", broken_write)
    failed = worker.encode_shard(unit)
    assert failed["status"] == "failed" and "S3 is down" in failed["error"]
    assert entry["name"] not in store.markers()


def test_bad_inputs_are_clear_errors(tiny_shards, vae_dirs, tmp_path, tiny_store):
    with pytest.raises(StageError, match="split 'test' not in"):
        encode(tiny_shards, vae_dirs[0], str(tmp_path / "s"), split="test")
    with pytest.raises(StageError, match="has flip=True, this run wants False"):
        encode(tiny_shards, vae_dirs[0], tiny_store.url, flip=False)
    assert cli_main(["encode", "--data-path", str(tmp_path / "none"), "--vae-path", vae_dirs[0],
                     "--output", str(tmp_path / "s")]) == 2


# ---------------------------------------------------------------------------------------------------
# verify-store
# ---------------------------------------------------------------------------------------------------

def test_verify_store_accepts_a_good_store(tiny_store, tiny_shards, vae_dirs):
    out, _ = tiny_store
    summary = verify(VerifyStoreConfig(store=out, data_path=tiny_shards, vae_path=vae_dirs[0], num_samples=8))
    assert summary.ok, summary.problems
    assert (summary.markers_checked, summary.rows_compared) == (2, 8)
    assert cli_main(["verify-store", out, "--data-path", tiny_shards, "--vae-path", vae_dirs[0],
                     "--num-samples", "2"]) == 0


def test_verify_store_rejects_tampering_and_another_vae(tiny_store, tiny_shards, vae_dirs, tmp_path):
    out, summary = tiny_store
    copy = copy_store(out, tmp_path)
    group = segment(join(copy, summary.version), "train-000001.tar")  # rows 32.. of the store
    group["teacher_global"][8] = group["teacher_global"][8] + np.float16(1)
    result = verify(VerifyStoreConfig(store=copy, data_path=tiny_shards, vae_path=vae_dirs[0], num_samples=48))
    assert not result.ok
    assert any("train-000001.tar do not match their marker's checksum" in p for p in result.problems)
    assert any(p.startswith("row 40 ") and "teacher_global differs" in p for p in result.problems)
    assert cli_main(["verify-store", copy, "--data-path", tiny_shards, "--vae-path", vae_dirs[0],
                     "--num-samples", "0"]) == 1
    wrong = verify(VerifyStoreConfig(store=out, data_path=tiny_shards, vae_path=vae_dirs[1], num_samples=2))
    assert not wrong.ok and any("store was made by VAE" in p for p in wrong.problems)
