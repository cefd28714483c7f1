"""Injected faults (issue 19): crafted URLs and names, broken chunks and weights, mismatched shapes, empty input.

Each test injects one fault into a copy of the session's artifacts and checks the stage's answer: one
clear line (exit 2 from the CLI), nothing written where it does not belong, and a repair where one exists.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from pipelines.cli import main as cli_main
from pipelines.encode import EncodeConfig, run as encode_run
from storage import StorageError
from storage.fs import check_name, join, within


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
