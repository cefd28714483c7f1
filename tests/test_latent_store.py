"""Latent store and lease: one suite run on local disk and S3 (moto), plus plain-zarr readability."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import zarr

from storage import StorageError
from storage.fs import join
from storage.latent_store import LatentStore, MissingRowsWarning, rows_checksum
from storage.lease import Lease
from storage.markers import read_json

SHAPE = (4, 2, 2)


def make_store(root, fingerprint="vae-a", chunk_rows=8, shards=(("s-0.tar", 10), ("s-1.tar", 5)), flip=True):
    store = LatentStore.create(root, fingerprint=fingerprint, latent_shape=SHAPE, teacher_width=3,
                               chunk_rows=chunk_rows, flip=flip,
                               provenance={"num_classes": 7, "classes": list("abcdefg"), "split": "train"})
    return store, store.plan_shards(list(shards))


def fill(store, entry, seed=0, marker=True):
    """Write an entry's rows (label = row number) and, by default, its marker; returns the rows."""
    rng = np.random.default_rng(seed)
    n, c, h, w = entry["count"], *SHAPE
    rows = {name: rng.standard_normal((n, c, h, w)).astype(np.float16) for name in ("mean", "mean_flip")}
    rows.update(std=np.ones((n, c, h, w), np.float16), std_flip=np.ones((n, c, h, w), np.float16),
                labels=np.arange(entry["row_start"], entry["row_start"] + n, dtype=np.int32),
                keys=np.array([f"key{entry['row_start'] + i}" for i in range(n)], dtype=object),
                teacher_global=rng.standard_normal((n, 3)).astype(np.float16))
    rows = {k: v for k, v in rows.items() if k in store.array_names}
    store.write_rows(entry["row_start"], rows)
    if marker:
        store.write_marker({"shard": entry["name"], "row_start": entry["row_start"], "count": n,
                            "vae_fingerprint": store.attrs["vae_fingerprint"], "arrays": store.array_names,
                            "checksum": rows_checksum(rows)})
    return rows


# ---------------------------------------------------------------------------------------------------
# Store
# ---------------------------------------------------------------------------------------------------

def test_row_map_is_chunk_aligned_and_stable(storage_root):
    store, entries = make_store(storage_root, shards=[("s-0.tar", 10), ("s-1.tar", 5)])
    assert [(e["row_start"], e["capacity"]) for e in entries] == [(0, 16), (16, 8)]
    assert store.num_rows == 24 and store.num_samples == 15
    # a shard added later goes after the existing ones; the existing ranges do not move
    again = store.plan_shards([("s-0.tar", 10), ("s-1.tar", 5), ("s-2.tar", 9)], shard_size=10)
    assert [(e["row_start"], e["capacity"]) for e in again] == [(0, 16), (16, 8), (24, 16)]
    assert store.num_rows == 40
    with pytest.raises(StorageError, match="grew to 9 samples"):
        store.plan_shards([("s-1.tar", 9)])


def test_done_rows_follow_markers_and_open_warns(storage_root):
    store, (e0, e1) = make_store(storage_root)
    written = fill(store, e0)
    fill(store, e1, marker=False)  # rows written, no marker: not done
    done = store.done_rows()
    assert done[:10].all() and not done[10:].any()
    with pytest.warns(MissingRowsWarning, match="5 of 15 rows are not encoded"):
        reader = LatentStore.open(storage_root)
    assert reader.version == "vae-a"
    assert np.array_equal(reader.read_rows(0, 10)["mean"], written["mean"])
    assert list(reader.read_rows(0, 3)["keys"]) == ["key0", "key1", "key2"]
    marker = reader.markers()["s-0.tar"]
    assert reader.stored_checksum(marker) == marker["checksum"]
    # a marker from another VAE, or at another row offset, does not count
    store.write_marker({**marker, "shard": "s-1.tar", "row_start": e1["row_start"], "count": 5,
                        "vae_fingerprint": "vae-other"})
    assert store.done_rows().sum() == 10


def test_tampered_rows_change_the_checksum(tmp_path):
    store, (e0, _) = make_store(str(tmp_path / "s"))
    fill(store, e0)
    marker = store.markers()["s-0.tar"]
    zarr.open_group(join(store.url, "segments", marker["segment"]))["std"][3] = np.full(SHAPE, 2, np.float16)
    assert store.stored_checksum(marker) != marker["checksum"]


def test_versions_and_open_for_vae_refusals(storage_root):
    make_store(storage_root, fingerprint="vae-a")
    with pytest.raises(StorageError, match="made by VAE vae-a, not by VAE vae-b"):
        LatentStore.open_for_vae(storage_root, "vae-b", SHAPE)
    with pytest.raises(StorageError, match=r"shape \[4, 2, 2\].*makes \[4, 4, 4\]"):
        LatentStore.open_for_vae(storage_root, "vae-a", (4, 4, 4))
    assert LatentStore.open_for_vae(storage_root, "vae-a", SHAPE).version == "vae-a"
    make_store(storage_root, fingerprint="vae-b")
    index = read_json(join(storage_root, "versions.json"))
    assert index["latest"] == "vae-b" and [v["name"] for v in index["versions"]] == ["vae-a", "vae-b"]
    with pytest.warns(MissingRowsWarning):
        assert LatentStore.open(storage_root).version == "vae-b"
        assert LatentStore.open(storage_root, version="vae-a").version == "vae-a"
        assert LatentStore.open(join(storage_root, "vae-a")).version == "vae-a"
    with pytest.raises(StorageError, match="has no version 'vae-c'"):
        LatentStore.open(storage_root, version="vae-c")
    with pytest.raises(StorageError, match="already exists"):
        make_store(storage_root, fingerprint="vae-a")


def test_missing_store_is_a_clear_error(tmp_path):
    with pytest.raises(StorageError, match="no latent store at .*run `reals encode`"):
        LatentStore.open(str(tmp_path / "nothing"))


def test_the_docs_plain_reader_reads_committed_rows_only(tmp_path):
    """docs/reference/latent-store.md's reader (zarr and JSON, no project code) runs as written."""
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "reference" / "latent-store.md").read_text()
    [code] = [b for b in re.findall(r"```python\n(.*?)```", page, flags=re.S) if "url_to_fs" in b]
    root = str(tmp_path / "s")
    store, (e0, e1) = make_store(root)
    fill(store, e0, seed=1)
    written = fill(store, e1)  # the last shard: its rows are what the block leaves in `mean`, `labels`
    fill(store, e0, marker=False, seed=2)  # a segment no commit names is never read
    scope: dict = {}
    exec(compile(code.replace('"s3://bucket/latents"', repr(root)), "latent-store.md", "exec"), scope)
    assert sorted(scope["latest"]) == ["s-0.tar", "s-1.tar"] and scope["attrs"]["layout"] == 2
    assert np.array_equal(scope["mean"], written["mean"]) and np.array_equal(scope["labels"], written["labels"])
    first = scope["group"]["segments"][scope["latest"]["s-0.tar"]["segment"]]
    assert np.array_equal(first["mean"][:10], store.read_rows(0, 10)["mean"])


def test_commit_claims_the_next_free_slot_and_a_takeover_fences_late_commits(storage_root):
    """A commit prepared before another writer's takeover targets a slot the takeover holds: it fails."""
    store, (e0, e1) = make_store(storage_root)
    fill(store, e0)
    late = LatentStore.open_for_vae(storage_root, "vae-a", SHAPE)  # an earlier writer, its next slot known
    late._next_slot = 1  # it saw slot 0 taken and chose slot 1 before the takeover
    rows = fill(late, e1, marker=False)
    new = LatentStore.open_for_vae(storage_root, "vae-a", SHAPE)
    assert new.takeover("run-b") == 1
    lost = []

    def fence():  # the late writer's fence passed before its PUT; after the takeover its lease is gone
        if lost:
            raise StorageError("lease lost")
        lost.append(1)

    with pytest.raises(StorageError, match="lease lost"):
        late.commit({"shard": "s-1.tar", "row_start": e1["row_start"], "count": 5, "vae_fingerprint": "vae-a",
                     "arrays": late.array_names, "checksum": rows_checksum(rows)}, fence=fence)
    assert "s-1.tar" not in new.markers()
    assert new.done_rows().sum() == 10


def test_no_flip_store_has_no_flip_arrays(tmp_path):
    store, _ = make_store(str(tmp_path / "s"), flip=False)
    assert store.array_names == ["mean", "std", "labels", "keys", "teacher_global"]


# ---------------------------------------------------------------------------------------------------
# Lease
# ---------------------------------------------------------------------------------------------------

def test_lease_refuses_then_waits(storage_root):
    url = join(storage_root, "lease.json")
    first = Lease(url, owner="run-one", ttl=30).acquire()
    with pytest.raises(StorageError, match="leased by run-one until"):
        Lease(url, owner="run-two").acquire(wait=0)
    timer = threading.Timer(0.5, first.release)
    timer.start()
    second = Lease(url, owner="run-two", ttl=30).acquire(wait=10, poll=0.1)
    assert second.holder()["owner"] == "run-two"
    second.release()
    assert second.holder() is None


def test_crashed_holder_expires_and_live_holder_renews(storage_root):
    url = join(storage_root, "lease.json")
    crashed = Lease(url, owner="crashed", ttl=0.5).acquire()
    time.sleep(0.6)
    taker = Lease(url, owner="taker", ttl=4)  # renewed every 1.3 s, even on a loaded machine
    with taker.hold():
        time.sleep(8.5)  # two expiries' worth: only the background renewal keeps it
        with pytest.raises(StorageError, match="leased by taker"):
            Lease(url, owner="late").acquire(wait=0)
    assert taker.holder() is None
    with pytest.raises(StorageError, match="was lost"):
        crashed.renew()


def test_lease_race_has_one_winner(storage_root):
    url = join(storage_root, "lease.json")
    results: dict[str, bool] = {}
    barrier = threading.Barrier(4)

    def attempt(name):
        barrier.wait()
        try:
            Lease(url, owner=name, ttl=30).acquire(wait=0)
            results[name] = True
        except StorageError:
            results[name] = False

    threads = [threading.Thread(target=attempt, args=(f"r{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [n for n, won in results.items() if won]
    assert len(winners) == 1
    assert Lease(url).holder()["owner"] == winners[0]


# ---------------------------------------------------------------------------------------------------
# Layout 1 (rows in place, markers) -> layout 2
# ---------------------------------------------------------------------------------------------------

def layout1_store(root, counts=(10, 5), damaged=1):
    """A version as encode wrote it before commits: arrays at the version's root, ``markers/<shard>.json``;
    the rows of shard ``damaged`` no longer match their marker."""
    from storage.fs import join as j
    from storage.latent_store import zarr_store
    from storage.markers import write_json

    rng = np.random.default_rng(0)
    shards, rows, start = [], {}, 0
    for i, n in enumerate(counts):
        shards.append({"name": f"s-{i}.tar", "row_start": start, "capacity": 16, "count": n})
        start += 16
    group = zarr.open_group(zarr_store(j(root, "vae-old")), mode="w", zarr_format=3, attributes={
        "vae_fingerprint": "vae-old", "latent_shape": list(SHAPE), "chunk_rows": 8, "flip": False,
        "teacher_width": 3, "teacher_patch": False, "shards": shards, "num_classes": 7, "split": "train"})
    group.create_group("markers")
    full = {"mean": rng.standard_normal((start, *SHAPE)).astype(np.float16),
            "std": np.ones((start, *SHAPE), np.float16), "labels": np.arange(start, dtype=np.int32),
            "keys": np.array([f"k{r}" for r in range(start)], dtype=object),
            "teacher_global": rng.standard_normal((start, 3)).astype(np.float16)}
    for name, values in full.items():
        kw = {"dtype": str} if name == "keys" else {"dtype": values.dtype}
        group.create_array(name, shape=values.shape, chunks=(8, *values.shape[1:]), **kw)[:] = values
    for i, e in enumerate(shards):
        rows[e["name"]] = {n: a[e["row_start"]:e["row_start"] + e["count"]] for n, a in full.items()}
        write_json(j(root, "vae-old", "markers", f"s-{i}.json"), {
            "shard": e["name"], "row_start": e["row_start"], "count": e["count"], "vae_fingerprint": "vae-old",
            "arrays": ["mean", "std", "labels", "keys", "teacher_global"], "checksum": rows_checksum(rows[e["name"]])})
    group["std"][shards[damaged]["row_start"]] = np.full(SHAPE, 3, np.float16)
    write_json(j(root, "versions.json"), {"versions": [{"name": "vae-old"}], "latest": "vae-old"})
    return rows


def test_layout1_store_is_refused_until_migrated_by_one_command(storage_root, capsys):
    from pipelines.cli import main as cli_main

    rows = layout1_store(storage_root)
    with pytest.raises(StorageError, match="has layout 1 .*run `reals migrate-store"):
        LatentStore.open(storage_root)
    with pytest.raises(StorageError, match="has layout 1"):
        LatentStore.open_for_vae(storage_root, "vae-old", SHAPE)
    assert cli_main(["migrate-store", storage_root]) == 0
    out = capsys.readouterr().out
    assert "1 version(s) converted (vae-old), 1 shards committed" in out and "left out (first: s-1.tar)" in out
    with pytest.warns(MissingRowsWarning, match="5 of 15 rows are not encoded"):
        store = LatentStore.open(storage_root)
    assert store.done_rows().sum() == 10
    got = store.read_rows(0, 10)
    for name, want in rows["s-0.tar"].items():
        assert np.array_equal(got[name], want), name
    assert not {"mean", "std", "labels", "keys", "teacher_global", "markers"} & set(
        zarr.open_group(join(storage_root, "vae-old"), mode="r").keys())
    assert cli_main(["migrate-store", storage_root]) == 0
    assert "already in the committed layout" in capsys.readouterr().out


def test_a_commit_whose_segment_is_gone_reads_as_a_damaged_shard(tmp_path):
    import shutil

    from storage.latent_store import CorruptChunk

    store, (e0, _) = make_store(str(tmp_path / "s"))
    fill(store, e0)
    marker = store.markers()["s-0.tar"]
    shutil.rmtree(join(store.url, "segments", marker["segment"], "std"))
    with pytest.raises(CorruptChunk, match="shard s-0.tar: its committed segment .* has no array std") as caught:
        store.stored_checksum(marker)
    assert (caught.value.shard, caught.value.rows) == ("s-0.tar", (0, 10))


def test_a_commit_that_does_not_parse_is_refused_with_its_remedy(tmp_path):
    from pathlib import Path

    from storage.markers import DamagedRecord

    store, (e0, _) = make_store(str(tmp_path / "s"))
    fill(store, e0)
    slot = sorted(Path(store.url, "commits").glob("[0-9]*.json"))[-1]
    slot.write_text('{"shard": "s-0.t')
    with pytest.raises(DamagedRecord, match=r"commit .* is damaged .* replace its content with \{\}"):
        store.markers()
    slot.write_text("{}")
    assert "s-0.tar" not in store.markers()
