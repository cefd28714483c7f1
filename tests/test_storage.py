"""storage.fs, storage.markers and storage.shards: one suite run on local disk, memory:// and S3 (moto)."""
from __future__ import annotations

import io
import os
import uuid

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from storage import StorageError
from storage import fs as sfs
from storage.markers import DamagedRecord, fingerprint, read_json, sha256_bytes, sha256_url, write_json
from storage.shards import iter_shard, iter_shards, read_manifest, shard_urls, write_shard


@pytest.fixture(params=["local", "memory", "s3"])
def root(request, tmp_path):
    """A fresh root URL on each backend."""
    if request.param == "local":
        return str(tmp_path / "root")
    if request.param == "memory":
        return f"memory://reals-{uuid.uuid4().hex[:10]}"
    return request.getfixturevalue("s3_bucket") + "/root"


def _png(value: int, side: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (value, 255 - value, 7)).save(buf, format="PNG")
    return buf.getvalue()


def _samples(n: int) -> list[dict]:
    return [{"__key__": f"k{i:03d}", "png": _png(10 * i), "cls": i % 3, "json": {"i": i}} for i in range(n)]


# ---------------------------------------------------------------------------------------------------
# fs
# ---------------------------------------------------------------------------------------------------

def test_bytes_roundtrip_listing_and_remove(root):
    a, b = sfs.join(root, "d", "a.bin"), sfs.join(root, "d", "b.txt")
    assert not sfs.exists(a)
    sfs.write_bytes_atomic(a, b"first")
    sfs.write_bytes_atomic(a, b"second")
    sfs.write_bytes_atomic(b, b"text")
    assert sfs.read_bytes(a) == b"second"
    assert sfs.list_files(sfs.join(root, "d")) == [a, b]
    assert sfs.list_files(sfs.join(root, "d"), ".bin") == [a]
    assert sfs.list_files(sfs.join(root, "missing")) == []
    sfs.remove(a)
    sfs.remove(a)  # removing an absent object is a no-op
    assert not sfs.exists(a) and sfs.exists(b)


def test_local_atomic_write_leaves_no_temporaries(tmp_path):
    url = str(tmp_path / "x" / "m.json")
    for i in range(3):
        sfs.write_bytes_atomic(url, str(i).encode())
    assert os.listdir(tmp_path / "x") == ["m.json"]


def test_urls_are_canonical(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert sfs.to_url("rel/dir") == str(tmp_path / "rel" / "dir")
    assert sfs.to_url("s3://b/k") == "s3://b/k"
    assert sfs.join("s3://b/k/", "x", "y.tar") == "s3://b/k/x/y.tar"
    assert sfs.join("memory://r") == "memory://r"


def test_unknown_scheme_is_a_storage_error():
    with pytest.raises(StorageError, match="nosuchscheme"):
        sfs.filesystem("nosuchscheme://bucket/key")


# ---------------------------------------------------------------------------------------------------
# markers
# ---------------------------------------------------------------------------------------------------

def test_json_markers_and_checksums(root):
    url = sfs.join(root, "m", "marker.json")
    assert read_json(url) is None
    write_json(url, {"b": [1, 2], "a": "é"})
    assert read_json(url) == {"a": "é", "b": [1, 2]}
    sfs.write_bytes_atomic(url, b'{"torn": ')
    with pytest.raises(DamagedRecord, match="marker.json is damaged .9 bytes.*: delete it to redo"):
        read_json(url)  # damaged is not absent
    payload = os.urandom(3 * 1024 + 5)
    data_url = sfs.join(root, "m", "payload.bin")
    sfs.write_bytes_atomic(data_url, payload)
    assert sha256_url(data_url, block=1000) == sha256_bytes(payload)


def test_fingerprint_is_stable_and_order_free():
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})
    assert len(fingerprint([])) == 16


# ---------------------------------------------------------------------------------------------------
# shards
# ---------------------------------------------------------------------------------------------------

def test_write_shard_roundtrip_is_deterministic(root):
    first, second = sfs.join(root, "a", "train-000000.tar"), sfs.join(root, "b", "train-000000.tar")
    info = write_shard(first, _samples(5))
    assert info == write_shard(second, _samples(5))
    assert info["count"] == 5
    assert sfs.read_bytes(first) == sfs.read_bytes(second)
    assert sha256_url(first) == info["sha256"]
    got = list(iter_shard(first))
    assert [s["__key__"] for s in got] == [f"k{i:03d}" for i in range(5)]
    assert [s["cls"] for s in got] == [i % 3 for i in range(5)]
    assert [s["json"] for s in got] == [{"i": i} for i in range(5)]
    assert got[2]["image"].shape == (8, 8, 3) and tuple(got[2]["image"][0, 0]) == (20, 235, 7)


def test_plain_webdataset_reads_every_backend(root):
    url = sfs.join(root, "train-000000.tar")
    write_shard(url, _samples(4))
    keys = [s["__key__"] for s in wds.WebDataset(url, shardshuffle=False, empty_check=False)]
    assert keys == [f"k{i:03d}" for i in range(4)]


def test_keys_with_dots_are_refused(tmp_path):
    with pytest.raises(StorageError, match="dots"):
        write_shard(str(tmp_path / "x.tar"), [{"__key__": "a.b", "cls": 1}])


def test_manifest_and_shard_urls(root):
    with pytest.raises(StorageError, match="reals shard"):
        read_manifest(root)
    names = ["train-000000.tar", "train-000001.tar"]
    write_json(sfs.join(root, "manifest.json"), {"classes": ["a"], "splits": {"train": {"count": 6, "shards": names}}})
    assert shard_urls(root) == [sfs.join(root, n) for n in names]
    with pytest.raises(StorageError, match="val"):
        shard_urls(root, "val")


def test_iter_shards_skips_and_reports_corrupt_samples(root):
    url = sfs.join(root, "train-000000.tar")
    samples = _samples(3)
    samples[1]["png"] = b"not a png"
    write_shard(url, samples)
    skipped: list = []
    got = list(iter_shards([url], skipped=skipped))
    assert [s["__key__"] for s in got] == ["k000", "k002"]
    assert [k for k, _ in skipped] == ["k001"]


def test_iter_shards_shuffle_is_seeded(tmp_path):
    urls = []
    for i in range(3):
        urls.append(str(tmp_path / f"train-{i:06d}.tar"))
        write_shard(urls[-1], [{**s, "__key__": f"s{i}_{s['__key__']}"} for s in _samples(6)])
    order = lambda seed: [s["__key__"] for s in iter_shards(urls, shuffle=8, seed=seed)]  # noqa: E731
    assert order(3) == order(3)
    assert sorted(order(3)) == sorted(s["__key__"] for s in iter_shards(urls))
    assert order(3) != [s["__key__"] for s in iter_shards(urls)]
    assert np.unique(order(3)).size == 18


def test_a_file_another_process_wrote_after_a_listing_is_read(s3_bucket):
    """A driver that listed a folder (a progress poll) still reads the parts its Ray workers write there later."""
    import s3fs

    folder = f"{s3_bucket}/samples.npz.parts"
    sfs.write_bytes_atomic(f"{folder}/00000000-00000004.json", b"{}")
    assert sfs.list_files(folder, ".json") == [f"{folder}/00000000-00000004.json"]
    other = s3fs.S3FileSystem(skip_instance_cache=True)  # another process's client
    with other.open(f"{folder.removeprefix('s3://')}/00000004-00000008.npz", "wb") as f:
        f.write(b"part")
    assert sfs.read_bytes(f"{folder}/00000004-00000008.npz") == b"part"
    assert sfs.exists(f"{folder}/00000004-00000008.npz")
    assert len(sfs.list_files(folder)) == 2
