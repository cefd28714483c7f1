"""Arrivals anywhere in the folder tree: new files go to new shards, only their rows are encoded, written shards
and store rows stay byte-identical, removed files are reported and keep their samples, resume, old manifests."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import webdataset as wds

from pipelines import StageError
from pipelines.stages.encode import EncodeConfig
from pipelines.stages.encode import run as encode
from pipelines.stages.shard import ShardConfig, missing_outputs
from pipelines.stages.shard import run as shard
from storage.shards import read_manifest, shard_urls

SHARD = dict(resolution=32, shard_size=24, workers=2, show_progress=False)


def _data(synthetic_root, tmp_path) -> Path:
    shutil.copytree(synthetic_root / "train", tmp_path / "data" / "train")
    return tmp_path / "data"


def _add(data: Path, class_index: int, name: str) -> str:
    """Copy an image of another class into the ``class_index``-th class folder; its path relative to ``data``."""
    classes = sorted(p.name for p in (data / "train").iterdir())
    donor = sorted((data / "train" / classes[class_index - 1]).iterdir())[0]
    shutil.copy(donor, data / "train" / classes[class_index] / name)
    return f"train/{classes[class_index]}/{name}"


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _samples(url: str) -> list[dict]:
    return list(wds.WebDataset([url], shardshuffle=False, empty_check=False))


def _settled(store: dict[str, bytes]) -> dict[str, bytes]:
    """Store files that must never change once written: chunks and done-markers (metadata grows, the lease moves)."""
    return {k: v for k, v in store.items() if not k.endswith("zarr.json") and "lease" not in k}


def test_new_images_anywhere_go_to_new_shards_and_only_their_rows_are_encoded(synthetic_root, tiny_vae_dir,
                                                                               tmp_path, ray_session):
    data, shards, store = _data(synthetic_root, tmp_path), tmp_path / "shards", tmp_path / "store"
    config = ShardConfig(images=str(data), output=str(shards), **SHARD)
    enc = EncodeConfig(shards=str(shards), vae_path=tiny_vae_dir, output=str(store), chunk_rows=16, workers=0,
                       show_progress=False)
    assert shard(config).shards_written == 2 and encode(enc).rows_encoded == 48
    tars, rows = _files(shards), _settled(_files(store))

    added = _add(data, 0, "aaa_first.JPEG")  # sorts first in the first class: a re-slice would move every file
    summary = shard(config)
    assert (summary.shards, summary.shards_written, summary.shards_skipped, summary.shards_redone) == (3, 1, 2, 0)
    assert (summary.new_files, summary.images, summary.removed) == (1, 49, [])
    now = _files(shards)
    assert {k: now[k] for k in tars if k.endswith(".tar")} == {k: v for k, v in tars.items() if k.endswith(".tar")}
    [new] = _samples(str(shards / "train-000002.tar"))
    assert json.loads(new["json"])["source"] == added and int(new["cls"]) == 0 and new["__key__"].endswith("_0000048")
    encoded = encode(enc)
    assert (encoded.shards_encoded, encoded.shards_skipped, encoded.rows_encoded, encoded.rows_done) == (1, 2, 1, 49)
    after = _settled(_files(store))
    assert {k: after[k] for k in rows} == rows  # every chunk and marker written before is byte-identical

    two = [_add(data, 1, "zz_second.JPEG"), _add(data, 3, "b_third.JPEG")]  # two classes, one new shard
    summary = shard(config)
    assert (summary.shards_written, summary.shards_skipped, summary.new_files) == (1, 3, 2)
    assert [json.loads(s["json"])["source"] for s in _samples(str(shards / "train-000003.tar"))] == two
    assert encode(enc).rows_encoded == 2

    tars, manifest, rows = _files(shards), read_manifest(str(shards)), _settled(_files(store))
    again = shard(config)  # nothing new: nothing written, nothing encoded
    assert (again.shards_written, again.shards_skipped, again.new_files, again.images) == (0, 4, 0, 51)
    assert _files(shards) == tars and read_manifest(str(shards)) == manifest and missing_outputs(config) is None
    assert encode(enc).rows_encoded == 0 and _settled(_files(store)) == rows


def test_removed_file_is_listed_and_logged_and_keeps_its_samples(synthetic_root, tmp_path, ray_session, caplog):
    data, out = _data(synthetic_root, tmp_path), tmp_path / "shards"
    config = ShardConfig(images=str(data), output=str(out), **SHARD)
    shard(config)
    tars = _files(out)
    gone = sorted((data / "train").glob("*/*.JPEG"))[30]
    gone.unlink()
    rel = str(gone.relative_to(data))
    with caplog.at_level(logging.WARNING, logger="pipelines.stages.shard"):
        summary = shard(config)
    assert (summary.removed, summary.shards_skipped, summary.shards_written, summary.images) == ([rel], 2, 0, 48)
    [line] = [r.getMessage() for r in caplog.records if "removed" in r.getMessage()]
    assert line.startswith("1 source files of train were removed") and rel in line and "\n" not in line
    assert read_manifest(str(out))["splits"]["train"]["removed"] == [rel]
    assert {k: v for k, v in _files(out).items() if k.endswith(".tar")} == {
        k: v for k, v in tars.items() if k.endswith(".tar")}
    assert rel in {json.loads(s["json"])["source"] for u in shard_urls(str(out)) for s in _samples(u)}
    assert missing_outputs(config) is None

    # a shard that lost a file but must be rewritten (its tar is gone) is rewritten without it, and says so
    (out / "train-000001.tar").unlink()
    redo = shard(config)
    assert redo.shards_redone == 1 and [s.source for s in redo.skipped] == [rel]


def test_a_killed_incremental_run_resumes_into_the_same_shards(synthetic_root, tmp_path, ray_session):
    data, out = _data(synthetic_root, tmp_path), tmp_path / "shards"
    config = ShardConfig(images=str(data), output=str(out), **{**SHARD, "shard_size": 12})
    shard(config)
    for i in range(14):  # 14 arrivals in the first class: two new shards of 12 and 2
        _add(data, 0, f"new_{i:02d}.JPEG")
    assert shard(config).shards_written == 2
    clean = _files(out)
    (out / "manifest.json").unlink()                 # killed before the manifest ...
    (out / "train-000005.json").unlink()             # ... and before the last new shard's marker
    (out / "train-000004.tar").write_bytes(b"torn")  # ... with another new shard torn
    resumed = shard(config)
    assert (resumed.shards, resumed.shards_redone, resumed.shards_skipped, resumed.new_files) == (6, 2, 4, 0)
    assert _files(out) == clean


def test_manifest_from_before_assignments_is_adopted_when_the_folder_matches(synthetic_root, tmp_path, ray_session):
    data, out = _data(synthetic_root, tmp_path), tmp_path / "shards"
    config = ShardConfig(images=str(data), output=str(out), **SHARD)
    shard(config)
    record = (out / "train-assignment.json").read_bytes()
    manifest = json.loads((out / "manifest.json").read_text())
    for field in ("assignment", "removed"):
        del manifest["splits"]["train"][field]
    old = json.dumps(manifest)
    (out / "manifest.json").write_text(old)
    (out / "train-assignment.json").unlink()
    adopted = shard(config)  # the folder still matches: its sorted slices are the recorded assignment
    assert (adopted.shards_skipped, adopted.shards_written) == (2, 0)
    assert (out / "train-assignment.json").read_bytes() == record

    (out / "manifest.json").write_text(old)
    (out / "train-assignment.json").unlink()
    _add(data, 0, "late.JPEG")
    with pytest.raises(StageError, match="sharded before shard assignments were recorded"):
        shard(config)


def test_a_new_class_folder_is_refused_by_name(synthetic_root, tmp_path, ray_session):
    data, out = _data(synthetic_root, tmp_path), tmp_path / "shards"
    config = ShardConfig(images=str(data), output=str(out), **SHARD)
    shard(config)
    (data / "train" / "n99999999").mkdir()
    shutil.copy(next((data / "train").glob("*/*.JPEG")), data / "train" / "n99999999" / "x.JPEG")
    with pytest.raises(StageError, match=r"class folders \['n99999999'\] of split 'train' are not in the classes"):
        shard(config)
