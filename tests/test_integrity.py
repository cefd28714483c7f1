"""Writes that cannot be torn and reads that stay in their root: one shard writer per output, damaged records
refused, manifest names checked on read, the store-root check through symbolic links."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pipelines.cli import main
from storage.markers import read_json
from storage.shards import iter_shard

REPO = Path(__file__).resolve().parents[1]


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.suffix in (".tar", ".json")}


# ---------------------------------------------------------------------------------------------------
# One writer per shards output
# ---------------------------------------------------------------------------------------------------

def test_two_concurrent_shard_runs_on_one_output_never_mix(synthetic_root, tmp_path, ray_session):
    """Two `reals shard` runs at once with different resolutions: one completes, the other is refused in one
    line before it writes anything, and every tar holds images of the manifest's resolution."""
    import ray

    out = tmp_path / "shards"
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    cmd = [sys.executable, "-m", "pipelines.cli", "shard", "--data-path", str(synthetic_root), "--output", str(out),
           "--shard-size", "2", "--no-progress"]
    runs = {r: subprocess.Popen(cmd + ["--resolution", str(r)], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for r in (32, 16)}
    try:
        done = {r: (p.wait(timeout=600), p.communicate()[1]) for r, p in runs.items()}
    finally:
        for p in runs.values():
            if p.poll() is None:
                p.kill()
    assert sorted(rc for rc, _ in done.values()) == [0, 2], {r: err[-2000:] for r, (_, err) in done.items()}
    (winner,) = [r for r, (rc, _) in done.items() if rc == 0]
    (loser_err,) = [err for rc, err in done.values() if rc == 2]
    errors = _error_lines(loser_err)
    assert len(errors) == 1 and "shard.lease.json is leased by" in errors[0] and "Traceback" not in loser_err

    manifest = read_json(str(out / "manifest.json"))
    assert manifest["resolution"] == winner
    tars = sorted(out.glob("train-*.tar"))
    assert [t.name for t in tars] == manifest["splits"]["train"]["shards"] and len(tars) == 24
    for tar in tars:
        assert read_json(str(tar.with_suffix(".json")))["resolution"] == winner
        sizes = {s["image"].shape[:2] for s in iter_shard(str(tar))}
        assert sizes == {(winner, winner)}, tar.name
    assert not (out / "shard.lease.json").exists()  # released


# ---------------------------------------------------------------------------------------------------
# Damaged records are refused, never read as absent
# ---------------------------------------------------------------------------------------------------

def test_a_truncated_assignment_record_is_refused_and_no_tar_is_rewritten(synthetic_root, tiny_shards, tmp_path,
                                                                          capsys):
    out = tmp_path / "shards"
    shutil.copytree(tiny_shards, out)
    record = out / "train-assignment.json"
    record.write_bytes(record.read_bytes()[:40])
    before = _files(out)
    args = ["shard", "--data-path", str(synthetic_root), "--output", str(out), "--resolution", "32",
            "--shard-size", "24", "--no-progress"]
    assert main(args) == 2
    errors = _error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and "train-assignment.json is damaged" in errors[0] and "restore it" in errors[0]
    assert _files(out) == before


def test_a_truncated_manifest_is_refused_by_its_readers(tiny_shards, tmp_path, capsys):
    out = tmp_path / "shards"
    shutil.copytree(tiny_shards, out)
    (out / "manifest.json").write_text('{"classes": ["a"')
    assert main(["make-reference", "--data-path", str(out), "--output", str(tmp_path / "ref.npz"),
                 "--no-progress"]) == 2
    errors = _error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and "manifest.json is damaged" in errors[0]
    assert not (tmp_path / "ref.npz").exists()


# ---------------------------------------------------------------------------------------------------
# Readers check names too
# ---------------------------------------------------------------------------------------------------

@pytest.fixture()
def evil_shards(tiny_shards, tmp_path):
    """A copy of the tiny shards whose manifest lists ``../evil.tar`` (a real shard, outside the folder)."""
    out = tmp_path / "shards"
    shutil.copytree(tiny_shards, out)
    shutil.copy(out / "val-000000.tar", tmp_path / "evil.tar")
    manifest = json.loads((out / "manifest.json").read_text())
    for split in manifest["splits"].values():
        split["shards"] = ["../evil.tar"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def test_make_reference_refuses_a_manifest_name_outside_the_shards(evil_shards, tmp_path, capsys):
    ref = tmp_path / "ref.npz"
    assert main(["make-reference", "--data-path", str(evil_shards), "--output", str(ref), "--no-progress"]) == 2
    errors = _error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and "refusing manifest.json shard name '../evil.tar'" in errors[0]
    assert not ref.exists()


def test_train_vae_refuses_a_manifest_name_outside_the_shards(evil_shards, tmp_path, capsys):
    run = tmp_path / "vae"
    assert main(["train-vae", "--data-path", str(evil_shards), "--output", str(run), "--vae-config", "tiny",
                 "--dino-model", "tiny-dinov2", "--perceptual", "none", "--max-steps", "1", "--no-progress"]) == 2
    errors = _error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and "refusing manifest.json shard name '../evil.tar'" in errors[0]
    assert not list(run.rglob("*.pt"))


# ---------------------------------------------------------------------------------------------------
# The store-root check resolves symbolic links
# ---------------------------------------------------------------------------------------------------

def test_an_output_through_a_symlink_into_a_store_version_is_refused(tiny_store, tiny_shards, tiny_vae_dir, tmp_path,
                                                                      capsys):
    store = tmp_path / "store"
    shutil.copytree(tiny_store.url, store)
    commits = store / tiny_store.summary.version / "commits"
    before = sorted(p.name for p in commits.iterdir())
    link = tmp_path / "elsewhere"
    link.symlink_to(commits, target_is_directory=True)
    assert main(["encode", "--data-path", tiny_shards, "--vae-path", tiny_vae_dir, "--output", str(link / "inner"),
                 "--workers", "0", "--no-progress"]) == 2
    errors = _error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and f"lies inside the latent store {store}" in errors[0], errors
    assert sorted(p.name for p in commits.iterdir()) == before

