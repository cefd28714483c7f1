"""``reals shard``: ADM crop, deterministic shards on local disk and S3, resume after crashes, bad input."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from pipelines import StageError
from pipelines.cli import main
from pipelines.imaging import center_crop, to_rgb
from pipelines.stages.shard import ShardConfig, plan, run
from storage import fs as sfs
from storage.markers import sha256_url
from storage.shards import iter_shards, read_manifest, shard_urls

TINY = dict(resolution=32, shard_size=24, workers=2, show_progress=False)  # as the tiny_shards fixture


def _encoded(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _samples(urls: list[str]) -> list[dict]:
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


# ---------------------------------------------------------------------------------------------------
# Imaging
# ---------------------------------------------------------------------------------------------------

def test_center_crop_follows_adm():
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8))
    box = Image.Resampling.BOX
    assert center_crop(im, 32).tobytes() == im.resize((64, 64), box).resize((32, 32), box).tobytes()
    wide = np.zeros((200, 300, 3), np.uint8)
    wide[:, 148:152] = 255  # a bright bar in the middle column survives the centred crop in the middle
    out = np.asarray(center_crop(Image.fromarray(wide), 64))
    assert out.shape == (64, 64, 3)
    assert out[:, 31:33].mean() > 100 and out[:, :20].max() == 0 and out[:, -20:].max() == 0
    assert center_crop(Image.new("RGB", (10, 20)), 32).size == (32, 32)  # small images are upsampled


def test_to_rgb_composites_alpha_on_white_and_scales_depth():
    transparent = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert np.asarray(to_rgb(transparent)).min() == 255
    half = np.asarray(to_rgb(Image.new("LA", (2, 2), (0, 128))))
    assert np.all(np.abs(half.astype(int) - 127) <= 1)
    deep = Image.fromarray(np.array([[0, 32896, 65535]], np.uint16))
    assert deep.mode.startswith("I;16")
    assert np.asarray(to_rgb(deep))[0, :, 0].tolist() == [0, 128, 255]
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))
    assert np.asarray(to_rgb(cmyk))[0, 0].tolist() == [255, 0, 0]


# ---------------------------------------------------------------------------------------------------
# Shards of the synthetic dataset
# ---------------------------------------------------------------------------------------------------

def test_assignment_is_a_pure_function_of_the_sorted_listing(synthetic_root, tmp_path):
    config = ShardConfig(data_path=str(synthetic_root), output=str(tmp_path / "o"), shard_size=10)
    first = plan(config)
    classes, units = first.classes, first.units
    assert plan(config) == first and not first.empty and first.assignment.new and not first.assignment.recorded
    assert [len(u["entries"]) for u in units] == [10, 10, 10, 10, 8]
    flat = [e for u in units for e in u["entries"]]
    assert [e[0] for e in flat] == sorted(e[0] for e in flat)
    keys = [e[3] for e in flat]
    assert len(set(keys)) == 48 and all("." not in k and k.isascii() for k in keys)
    assert all(e[0].split("/")[1] == classes[e[1]] for e in flat)


def test_tiny_shards_read_back_with_plain_webdataset(tiny_shards, synthetic_root):
    manifest = read_manifest(tiny_shards)
    classes = sorted(p.name for p in (Path(synthetic_root) / "train").iterdir())
    assert manifest["classes"] == classes and manifest["resolution"] == 32 and manifest["image_format"] == "png"
    counts = {s: (v["count"], len(v["shards"])) for s, v in manifest["splits"].items()}
    assert counts == {"train": (48, 2), "val": (12, 1)}
    for split, per_class in (("train", 12), ("val", 3)):
        samples = _samples(shard_urls(tiny_shards, split))
        assert len(samples) == per_class * 4 and len({s["__key__"] for s in samples}) == len(samples)
        labels = [int(s["cls"]) for s in samples]
        assert np.bincount(labels).tolist() == [per_class] * 4
        for s in samples:
            meta = json.loads(s["json"])
            assert (Path(synthetic_root) / meta["source"]).is_file()
            assert meta["source"].startswith(f"{split}/{classes[int(s['cls'])]}/")
            assert Image.open(io.BytesIO(s["png"])).size == (32, 32)


def test_ray_data_reads_the_shards(tiny_shards, ray_session):
    import ray

    rows = ray.data.read_webdataset(shard_urls(tiny_shards, "train")).take_all()
    assert len(rows) == 48
    assert {"__key__", "png", "cls", "json"} <= set(rows[0])
    assert sorted(np.bincount([int(r["cls"]) for r in rows]).tolist()) == [12] * 4
    assert np.asarray(rows[0]["png"]).shape == (32, 32, 3)


def test_local_and_s3_shards_are_byte_identical_and_resume(storage_root, synthetic_root, tiny_shards):
    out = sfs.join(storage_root, "ds")
    summary = run(ShardConfig(data_path=str(synthetic_root), output=out, **TINY))
    assert (summary.shards, summary.shards_written, summary.images, summary.skipped_files) == (2, 2, 48, 0)
    for url, reference in zip(shard_urls(out), shard_urls(tiny_shards)):
        assert sha256_url(url) == sha256_url(reference)
    assert len(list(iter_shards(shard_urls(out)))) == 48
    again = run(ShardConfig(data_path=str(synthetic_root), output=out, **TINY))
    assert (again.shards_skipped, again.shards_written, again.shards_redone, again.images) == (2, 0, 0, 48)


def test_rerun_after_crash_repairs_broken_shards(synthetic_root, tmp_path, ray_session):
    out = str(tmp_path / "ds")
    config = ShardConfig(data_path=str(synthetic_root), output=out, resolution=16, shard_size=12, workers=2,
                         show_progress=False)
    assert run(config).shards_written == 4
    clean = {p.name: p.read_bytes() for p in sorted(Path(out).iterdir())}
    (Path(out) / "train-000000.json").unlink()                         # crash between tar and marker
    tar1 = Path(out) / "train-000001.tar"
    tar1.write_bytes(clean["train-000001.tar"][:5000])                 # truncated upload
    tar2 = bytearray(clean["train-000002.tar"])
    tar2[2000] ^= 0xFF
    (Path(out) / "train-000002.tar").write_bytes(bytes(tar2))          # same size, wrong checksum
    (Path(out) / "train-000007.tar").write_bytes(b"left over from a larger input")
    summary = run(config)
    assert (summary.shards_redone, summary.shards_skipped, summary.shards_written) == (3, 1, 0)
    assert {p.name: p.read_bytes() for p in sorted(Path(out).iterdir())} == clean


def test_changed_settings_redo_every_shard(synthetic_root, tmp_path, ray_session):
    out = str(tmp_path / "ds")
    base = dict(data_path=str(synthetic_root), output=out, shard_size=24, workers=2, show_progress=False)
    run(ShardConfig(resolution=16, **base))
    summary = run(ShardConfig(resolution=24, **base))
    assert summary.shards_redone == 2 and read_manifest(out)["resolution"] == 24
    assert Image.open(io.BytesIO(_samples(shard_urls(out))[0]["png"])).size == (24, 24)


# ---------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------

def _broken_dataset(root: Path) -> tuple[set[str], dict[str, str]]:
    """A train split with every kind of awkward file; returns (names expected skipped, name -> expected mode)."""
    a, b = root / "train" / "cls_a", root / "train" / "cls_b"
    for d in (a, b, root / "train" / "cls_empty", a / "nested_folder"):
        d.mkdir(parents=True)
    good = _encoded(Image.new("RGB", (40, 40), (10, 200, 30)), "JPEG")
    (a / "good.JPEG").write_bytes(good)
    (a / "truncated.JPEG").write_bytes(good[: len(good) // 2])
    (a / "garbage.JPEG").write_bytes(os.urandom(300))
    (a / "notes.txt").write_text("not an image")
    (a / "cmyk.jpg").write_bytes(_encoded(Image.new("CMYK", (40, 40), (0, 255, 255, 0)), "JPEG"))
    (a / "grey.png").write_bytes(_encoded(Image.new("L", (40, 40), 90)))
    palette = Image.new("P", (40, 40), 0)
    palette.putpalette([255, 0, 0] * 256)
    (b / "palette.png").write_bytes(_encoded(palette, transparency=0))
    (b / "deep.png").write_bytes(_encoded(Image.fromarray(np.full((40, 40), 65535, np.uint16))))
    (b / "alpha.png").write_bytes(_encoded(Image.new("RGBA", (40, 40), (255, 0, 0, 0))))
    (b / "tiny.png").write_bytes(_encoded(Image.new("RGB", (8, 8), (1, 2, 3))))
    (b / "éclair_日本.png").write_bytes(_encoded(Image.new("RGB", (40, 40), (5, 5, 250))))
    (b / "a.b.c.png").write_bytes(_encoded(Image.new("RGB", (40, 40), (5, 250, 5))))
    (b / "broken_link.JPEG").symlink_to(b / "does_not_exist.JPEG")
    (b / "locked.png").write_bytes(_encoded(Image.new("RGB", (40, 40))))
    (b / "locked.png").chmod(0)
    skipped = {"truncated.JPEG", "garbage.JPEG", "notes.txt", "broken_link.JPEG"}
    if os.geteuid() != 0:  # root reads files whatever their permissions
        skipped.add("locked.png")
    return skipped, {"alpha.png": "RGBA", "deep.png": "I;16", "palette.png": "P", "cmyk.jpg": "CMYK"}


def test_bad_files_are_skipped_and_reported(tmp_path, ray_session):
    expected_skipped, modes = _broken_dataset(tmp_path / "data")
    out = str(tmp_path / "ds")
    summary = run(ShardConfig(data_path=str(tmp_path / "data"), output=out, resolution=32, shard_size=4,
                              workers=2, show_progress=False))
    reasons = {Path(s.source).name: s.reason for s in summary.skipped}
    assert set(reasons) == expected_skipped
    assert reasons["notes.txt"].startswith("not an image") and reasons["garbage.JPEG"].startswith("not an image")
    assert reasons["truncated.JPEG"].startswith("corrupt image")
    assert reasons["broken_link.JPEG"].startswith("unreadable")
    assert summary.empty_classes == ["cls_empty"] and summary.classes == 3 and summary.upsampled == 1
    assert summary.images == 14 - len(expected_skipped)
    markers = [json.loads(Path(out, f"train-{i:06d}.json").read_text()) for i in range(summary.shards)]
    assert {Path(s["source"]).name for m in markers for s in m["skipped"]} == expected_skipped
    samples = {Path(json.loads(s["json"])["source"]).name: s for s in _samples(shard_urls(out))}
    assert len(samples) == summary.images and all(k.isascii() and "." not in k for k in
                                                  (s["__key__"] for s in samples.values()))
    pixels = {name: np.asarray(Image.open(io.BytesIO(s["png"]))) for name, s in samples.items()}
    assert all(p.shape == (32, 32, 3) for p in pixels.values())
    assert pixels["alpha.png"].min() == 255 and pixels["palette.png"].min() == 255  # transparent -> white
    assert pixels["deep.png"].min() == 255 and pixels["grey.png"][0, 0].tolist() == [90, 90, 90]
    assert pixels["cmyk.jpg"][16, 16].tolist() == [255, 0, 0]
    assert {n: json.loads(samples[n]["json"])["mode"] for n in modes} == modes
    assert {int(s["cls"]) for n, s in samples.items() if n in ("good.JPEG", "grey.png")} == {0}
    assert int(samples["tiny.png"]["cls"]) == 1


def test_resolution_zero_keeps_original_bytes(tmp_path, ray_session):
    d = tmp_path / "data" / "train" / "c"
    d.mkdir(parents=True)
    rgb = _encoded(Image.new("RGB", (30, 20), (1, 2, 3)), "JPEG", quality=80)
    (d / "rgb.jpg").write_bytes(rgb)
    (d / "grey.jpg").write_bytes(_encoded(Image.new("L", (30, 20), 77), "JPEG"))
    out = str(tmp_path / "ds")
    run(ShardConfig(data_path=str(tmp_path / "data"), output=out, resolution=0, show_progress=False))
    grey, kept = _samples(shard_urls(out))
    assert kept["jpg"] == rgb
    assert Image.open(io.BytesIO(grey["png"])).mode == "RGB" and Image.open(io.BytesIO(grey["png"])).size == (30, 20)


def test_splits_must_share_classes_and_settings(synthetic_root, tmp_path):
    out = tmp_path / "ds"
    out.mkdir()
    manifest = {"classes": ["n00000000"], "resolution": 32, "image_format": "png",
                "splits": {"val": {"count": 1, "shards": [], "shard_size": 1}}}
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StageError, match="not in the classes"):
        plan(ShardConfig(data_path=str(synthetic_root), output=str(out), resolution=32))
    with pytest.raises(StageError, match="resolution"):
        plan(ShardConfig(data_path=str(synthetic_root), output=str(out), resolution=64))


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------

def test_cli_missing_folder_is_one_line_and_non_zero(tmp_path):
    env = {**os.environ, "REALS_DEBUG": ""}
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "shard", "--data-path", str(tmp_path / "nope"),
                           "--output", str(tmp_path / "out")], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).parents[1], timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [f"error: input folder not found: {tmp_path / 'nope'}"]


def test_cli_folder_without_class_folders(tmp_path, capsys):
    (tmp_path / "data" / "train").mkdir(parents=True)
    assert main(["shard", "--data-path", str(tmp_path / "data"), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no class folders") and len(err.splitlines()) == 1
    assert main(["shard", "--data-path", str(tmp_path), "--output", str(tmp_path / "o"), "--split", "val"]) == 2
    assert "no 'val' folder" in capsys.readouterr().err


def test_cli_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        main(["shard", "--help"])
    text = capsys.readouterr().out
    for flag in ("--data-path", "--output", "--split", "--resolution", "--shard-size", "--image-format", "--workers"):
        assert flag in text
