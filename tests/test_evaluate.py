"""`reals evaluate` and `reals make-reference`: end to end on small ADM-layout npz files and tiny shards."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import pipelines.cli as cli
from reals.metrics import fid_inception
from reals.metrics.fid_inception import WEIGHTS_FILE, FIDInceptionV3
from storage.markers import read_json, write_json
from storage.shards import write_shard


@pytest.fixture(autouse=True)
def offline_weights(tmp_path, monkeypatch):
    """No FID-Inception or DINOv2 weights anywhere, whatever this machine's caches hold."""
    import huggingface_hub.constants

    monkeypatch.delenv("REALS_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.delenv("REALS_DINOV2_DIR", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """A random FID-Inception state dict saved where pytorch-fid's file would be."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("fid") / "pt_inception-2015-12-05-00000000.pth"
    torch.save(FIDInceptionV3().state_dict(), path)
    return str(path)


@pytest.fixture()
def published(inception_weights, monkeypatch):
    """The random weights file, taken as the published one (its hash prefix stands in for pytorch-fid's)."""
    monkeypatch.setattr(fid_inception, "WEIGHTS_SHA256_PREFIX", fid_inception.file_sha256(Path(inception_weights))[:8])
    return inception_weights


def _smooth_images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """Images of flat colours with a gentle gradient (a "real" looking set)."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 60, size)[None, :, None, None]
    base = rng.integers(40, 190, (n, 1, 1, 3))
    return np.clip(base + ramp, 0, 255).astype(np.uint8).repeat(size, axis=1).reshape(n, size, size, 3)


def _noise_images(n: int, size: int = 32, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.fixture()
def batches(tmp_path):
    ref, samples = tmp_path / "ref.npz", tmp_path / "samples.npz"
    np.savez(ref, _smooth_images(8))
    np.savez(samples, _noise_images(6), np.arange(6) % 4)
    return str(ref), str(samples)


# ---------------------------------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------------------------------

def test_evaluate_offline_computes_teacher_fds_and_says_fid_was_not_computed(batches, tmp_path, capsys):
    ref, samples = batches
    out = tmp_path / "metrics.json"
    assert cli.main(["evaluate", ref, samples, "--output", str(out), "--batch-size", "5"]) == 0
    report = json.loads(out.read_text())
    metrics = report["metrics"]
    assert {"FD_effnet", "Precision_effnet", "Recall_effnet"} <= set(metrics)
    assert not {"FID", "sFID", "IS", "Precision", "Recall"} & set(metrics)
    for record in metrics.values():
        assert record["feature_space"] == "effnet"
        assert "EfficientNet-Lite0" in record["extractor"] and record["weights"].endswith(".pth")
        assert (record["num_reference"], record["num_samples"]) == (8, 6)
    assert metrics["FD_effnet"]["value"] > 0
    assert report["feature_spaces"]["inception"]["status"] == "skipped"
    assert WEIGHTS_FILE in report["feature_spaces"]["inception"]["reason"]
    assert report["feature_spaces"]["dinov2"]["status"] == "skipped"
    assert any("NOT computed" in note for note in report["notes"])
    printed = capsys.readouterr().out
    assert "FD_effnet" in printed and "skipped inception" in printed


def test_evaluate_of_a_set_against_itself_is_zero_distance_full_precision_recall(batches, tmp_path):
    ref, _ = batches
    out = tmp_path / "self.json"
    assert cli.main(["evaluate", ref, ref, "--features", "effnet", "--output", str(out)]) == 0
    metrics = json.loads(out.read_text())["metrics"]
    assert metrics["FD_effnet"]["value"] == pytest.approx(0.0, abs=1e-3)
    assert metrics["Precision_effnet"]["value"] == 1.0 and metrics["Recall_effnet"]["value"] == 1.0


def test_evaluate_inception_and_dinov2_spaces(tmp_path, published):
    inception_weights = published
    ref, samples, out = tmp_path / "ref.npz", tmp_path / "samples.npz", tmp_path / "metrics.json"
    np.savez(ref, _smooth_images(5, size=16))
    np.savez(samples, _noise_images(5, size=16))
    argv = ["evaluate", str(ref), str(samples), "--features", "inception", "dinov2", "--dinov2-model", "tiny-dinov2",
            "--inception-weights", inception_weights, "--output", str(out)]
    assert cli.main(argv) == 0
    report = json.loads(out.read_text())
    metrics = report["metrics"]
    assert set(metrics) == {"FID", "sFID", "IS", "Precision", "Recall", "FD_dinov2", "Precision_dinov2",
                            "Recall_dinov2"}
    for name in ("FID", "sFID", "IS", "Precision", "Recall"):
        assert metrics[name]["feature_space"] == "inception" and metrics[name]["weights"] == inception_weights
    assert metrics["FID"]["reference_statistics"] == "computed"
    assert metrics["FID"]["value"] > 0 and metrics["IS"]["value"] >= 1.0
    assert metrics["FD_dinov2"]["feature_space"] == "dinov2" and "tiny-dinov2" in metrics["FD_dinov2"]["extractor"]
    assert "effnet" not in report["feature_spaces"]
    assert metrics["FID"]["weights_sha256"] == fid_inception.file_sha256(Path(inception_weights))
    assert "as pytorch-fid" in metrics["FID"]["extractor"]


def test_unpublished_inception_weights_give_no_fid(batches, tmp_path, inception_weights, capsys):
    ref, samples = batches
    out = tmp_path / "m.json"
    assert cli.main(["evaluate", ref, samples, "--inception-weights", inception_weights, "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    assert "FID" not in report["metrics"] and "FD_effnet" in report["metrics"]
    assert "not pytorch-fid's published" in report["feature_spaces"]["inception"]["reason"]
    capsys.readouterr()
    argv = ["evaluate", ref, samples, "--features", "inception", "--inception-weights", inception_weights]
    assert cli.main(argv) == 2
    assert "does not start with 6726825d" in capsys.readouterr().err


def test_tf_resize_and_statistics_made_with_the_other_resize(tmp_path, published):
    _write_dataset(tmp_path / "data")
    ref, samples = tmp_path / "ref.npz", tmp_path / "samples.npz"
    assert cli.main(["make-reference", "--data-path", str(tmp_path / "data"), "--output", str(ref),
                     "--num-samples", "5", "--inception-weights", published]) == 0
    np.savez(samples, _noise_images(5, size=16))
    for resize in ("pytorch-fid", "tf"):
        out = tmp_path / f"{resize}.json"
        assert cli.main(["evaluate", str(ref), str(samples), "--features", "inception", "--resize", resize,
                         "--inception-weights", published, "--output", str(out)]) == 0
        report = json.loads(out.read_text())
        used = report["metrics"]["FID"]["reference_statistics"]
        assert (used, bool(report["notes"])) == (("precomputed", False) if resize == "pytorch-fid" else
                                                 ("computed", True))
    assert "ADM evaluator" in report["metrics"]["FID"]["extractor"]


def test_requested_space_without_weights_is_a_one_line_error(batches, capsys):
    ref, samples = batches
    assert cli.main(["evaluate", ref, samples, "--features", "inception"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and WEIGHTS_FILE in err and "\n" not in err


def test_missing_or_malformed_batches_are_clear_errors(batches, tmp_path, capsys):
    ref, _ = batches
    assert cli.main(["evaluate", ref, str(tmp_path / "absent.npz")]) == 2
    assert "sample batch not found" in capsys.readouterr().err
    np.savez(tmp_path / "float.npz", np.zeros((6, 8, 8, 3), dtype=np.float32))
    assert cli.main(["evaluate", ref, str(tmp_path / "float.npz"), "--features", "effnet"]) == 2
    assert "uint8 NHWC" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# make-reference
# ---------------------------------------------------------------------------------------------------

def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _write_dataset(root, reverse: bool = False) -> list[str]:
    """3 classes x 5 val images at 16 px in 2 shards, plus one undecodable sample; returns the good keys."""
    images = _smooth_images(15, size=16, seed=3)
    samples = [{"__key__": f"c{i % 3}_{i:03d}", "png": _png(images[i]), "cls": i % 3, "json": {"i": i}}
               for i in range(15)]
    samples.insert(7, {"__key__": "broken", "png": b"not a png", "cls": 0, "json": {}})
    names = ["val-000000.tar", "val-000001.tar"]
    write_shard(f"{root}/{names[0]}", samples[:8])
    write_shard(f"{root}/{names[1]}", samples[8:])
    write_json(f"{root}/manifest.json", {
        "classes": ["c0", "c1", "c2"], "resolution": 16, "image_format": "png", "fingerprint": "tiny",
        "splits": {"val": {"count": 16, "shards": names[::-1] if reverse else names, "shard_size": 8}},
    })
    return sorted(s["__key__"] for s in samples if s["__key__"] != "broken")


def test_make_reference_draws_a_seeded_subset_in_adm_layout(tmp_path, capsys):
    _write_dataset(tmp_path / "data")
    out = tmp_path / "ref.npz"
    argv = ["make-reference", "--data-path", str(tmp_path / "data"), "--split", "val", "--output", str(out),
            "--num-samples", "6"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "1 skipped" in printed and "broken" in printed and "Inception statistics: no" in printed
    with np.load(out) as data:
        assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (6, 16, 16, 3)
        assert set(data["arr_1"].tolist()) <= {0, 1, 2}
        assert "mu" not in data.files
        first = data["arr_0"].copy()
    assert cli.main(argv) == 0
    assert "reused" in capsys.readouterr().out

    # the subset depends on the keys and the seed only, not on shard order
    _write_dataset(tmp_path / "reversed", reverse=True)
    assert cli.main(["make-reference", "--data-path", str(tmp_path / "reversed"), "--output",
                     str(tmp_path / "rev.npz"), "--num-samples", "6"]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "rev.npz")["arr_0"], first)
    assert cli.main(["make-reference", "--data-path", str(tmp_path / "data"), "--output",
                     str(tmp_path / "seed1.npz"), "--num-samples", "6", "--seed", "1"]) == 0
    assert not np.array_equal(np.load(tmp_path / "seed1.npz")["arr_0"], first)


def test_make_reference_writes_inception_statistics_when_weights_exist(tmp_path, published):
    inception_weights = published
    _write_dataset(tmp_path / "data")
    out = tmp_path / "ref.npz"
    assert cli.main(["make-reference", "--data-path", str(tmp_path / "data"), "--output", str(out),
                     "--num-samples", "4", "--inception-weights", inception_weights]) == 0
    with np.load(out) as data:
        assert data["arr_0"].shape == (4, 16, 16, 3)
        assert data["mu"].shape == (2048,) and data["sigma"].shape == (2048, 2048)
        assert data["mu_s"].shape == (2023,) and data["sigma_s"].shape == (2023, 2023)


def test_make_reference_and_evaluate_on_s3(tmp_path, s3_bucket):
    _write_dataset(tmp_path / "data")
    ref, out = f"{s3_bucket}/refs/ref.npz", f"{s3_bucket}/eval/metrics.json"
    assert cli.main(["make-reference", "--data-path", str(tmp_path / "data"), "--output", ref]) == 0
    samples = tmp_path / "samples.npz"
    np.savez(samples, _noise_images(8, size=16))
    assert cli.main(["evaluate", ref, str(samples), "--features", "effnet", "--output", out]) == 0
    report = read_json(out)
    assert report["num_reference"] == 15 and report["num_samples"] == 8
    assert report["ref_batch"] == ref and report["metrics"]["FD_effnet"]["value"] > 0
