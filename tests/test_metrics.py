"""reals.metrics: Frechet distance, Inception Score, precision/recall, the FID-Inception network, ADM npz IO."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from reals import ReaLSError
from reals.metrics import (
    FeatureExtractor, FIDInceptionV3, activation_statistics, build_fid_inception, find_weights, frechet_distance,
    frechet_distance_from_activations, inception_score, manifold_radii, precision_recall, space_metrics,
)
from reals.metrics import fid_inception
from reals.metrics.fid_inception import WEIGHTS_FILE
from reals.metrics.reference import image_shape, iter_images, read_meta, read_stats, write_reference


# ---------------------------------------------------------------------------------------------------
# Frechet distance
# ---------------------------------------------------------------------------------------------------

def test_identical_sets_have_zero_distance():
    acts = np.random.default_rng(0).normal(size=(300, 12))
    mu, sigma = activation_statistics(acts)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance_from_activations(acts, acts) == pytest.approx(0.0, abs=1e-8)


def test_diagonal_gaussians_match_the_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.5, 0.0])
    s1, s2 = np.array([1.0, 4.0, 0.25]), np.array([2.0, 1.0, 0.25])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-9)
    # statistics estimated from samples of those Gaussians converge to the same number
    rng = np.random.default_rng(1)
    a = mu1 + rng.normal(size=(40000, 3)) * np.sqrt(s1)
    b = mu2 + rng.normal(size=(40000, 3)) * np.sqrt(s2)
    assert frechet_distance(*activation_statistics(a), *activation_statistics(b)) == pytest.approx(expected, abs=0.1)


def test_full_covariances_match_the_symmetric_form():
    rng = np.random.default_rng(2)
    m1, m2 = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = m1 @ m1.T + 0.1 * np.eye(6), m2 @ m2.T + 0.1 * np.eye(6)
    w, v = np.linalg.eigh(s1)
    root1 = v @ np.diag(np.sqrt(w)) @ v.T
    tr_covmean = np.sum(np.sqrt(np.linalg.eigvalsh(root1 @ s2 @ root1)))
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_covmean
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_subspace_shortcut_equals_the_full_computation_when_rows_are_few():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(9, 48)) * rng.uniform(0.5, 2.0, 48)
    b = rng.normal(size=(7, 48)) + 0.5
    full = frechet_distance(*activation_statistics(a), *activation_statistics(b))
    assert frechet_distance_from_activations(a, b) == pytest.approx(full, rel=1e-6)


def test_frechet_rejects_mismatched_statistics():
    with pytest.raises(ReaLSError, match="shape"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ReaLSError, match="at least 2"):
        activation_statistics(np.zeros((1, 5)))


# ---------------------------------------------------------------------------------------------------
# Inception Score
# ---------------------------------------------------------------------------------------------------

def test_inception_score_of_uniform_predictions_is_one():
    assert inception_score(np.full((50, 10), 0.1)) == pytest.approx(1.0)


def test_inception_score_of_confident_balanced_predictions_is_the_class_count():
    classes = 8
    probs = np.eye(classes)[np.arange(5 * classes) % classes]
    assert inception_score(probs) == pytest.approx(classes)
    assert inception_score(60.0 * probs - 30.0) == pytest.approx(classes, rel=1e-6)  # read as logits


def test_inception_score_averages_over_splits():
    classes = 4
    one_class = np.eye(classes)[np.zeros(8, dtype=int)]          # IS 1
    balanced = np.eye(classes)[np.arange(8) % classes]           # IS = classes
    score = inception_score(np.concatenate([one_class, balanced]), split_size=8)
    assert score == pytest.approx((1 + classes) / 2)


# ---------------------------------------------------------------------------------------------------
# Precision and recall
# ---------------------------------------------------------------------------------------------------

def _line(xs) -> np.ndarray:
    return np.array([[x, 0.0] for x in xs], dtype=np.float32)


def test_manifold_radii_are_kth_neighbour_distances():
    radii = manifold_radii(_line(range(10)), k=3)
    assert radii[0] == pytest.approx(9.0)   # neighbours 1, 2, 3: squared distance 3^2
    assert radii[5] == pytest.approx(4.0)   # neighbours 4, 6, then 3 or 7: squared distance 2^2


@pytest.mark.parametrize("batch_size", [3, 4096])
def test_precision_recall_of_constructed_sets(batch_size):
    real = _line(range(10))
    # half the samples copy real points 0..4, half sit far away: precision 1/2.
    # Sample radii: 3 at 0 and 4, 2 at 1..3 (k=3 within the samples), so real points 0..7 are covered: recall 0.8.
    fake = _line([0, 1, 2, 3, 4, 1000, 1001, 1002, 1003, 1004])
    precision, recall = precision_recall(real, fake, k=3, batch_size=batch_size)
    assert precision == pytest.approx(0.5)
    assert recall == pytest.approx(0.8)


def test_precision_recall_of_identical_sets_is_one():
    feats = np.random.default_rng(4).normal(size=(40, 16))
    assert precision_recall(feats, feats, k=3) == (1.0, 1.0)


def test_precision_recall_needs_more_points_than_k():
    with pytest.raises(ReaLSError, match="k=3"):
        precision_recall(_line(range(3)), _line(range(10)), k=3)


# ---------------------------------------------------------------------------------------------------
# The numbers of each feature space
# ---------------------------------------------------------------------------------------------------

def _acts(seed: int, n: int = 30) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"pool": rng.normal(size=(n, 5)) + seed, "spatial": rng.normal(size=(n, 4)),
            "logits": rng.normal(size=(n, 6))}


def test_inception_space_gives_adm_metrics_and_uses_precomputed_reference_statistics():
    ref, sample = _acts(0), _acts(1)
    computed = {m["metric"]: m for m in space_metrics("inception", ref, sample)}
    assert list(computed) == ["FID", "sFID", "IS", "Precision", "Recall"]
    assert computed["FID"]["value"] > 0.5 and computed["FID"]["reference_statistics"] == "computed"
    mu, sigma = activation_statistics(sample["pool"])
    mu_s, sigma_s = activation_statistics(sample["spatial"])
    stats = {"mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s}
    pre = {m["metric"]: m for m in space_metrics("inception", ref, sample, ref_stats=stats)}
    assert pre["FID"]["value"] == pytest.approx(0.0, abs=1e-6)
    assert pre["sFID"]["value"] == pytest.approx(0.0, abs=1e-6)
    assert pre["FID"]["reference_statistics"] == "precomputed"


def test_teacher_space_metrics_are_named_fd_not_fid():
    ref, sample = {"global": _acts(0)["pool"]}, {"global": _acts(1)["pool"]}
    names = [m["metric"] for m in space_metrics("effnet", ref, sample)]
    assert names == ["FD_effnet", "Precision_effnet", "Recall_effnet"]


class _MeanColour(FeatureExtractor):
    space, description, weights, outputs = "mean", "per-channel mean", "none", ("global",)

    def features(self, images):
        return {"global": images.mean(dim=(2, 3))}


def test_feature_extractor_takes_uint8_nhwc_and_rejects_other_layouts():
    images = np.zeros((2, 5, 5, 3), dtype=np.uint8)
    images[..., 0] = 255
    out = _MeanColour()(images)["global"]
    np.testing.assert_allclose(out, [[1.0, 0.0, 0.0]] * 2)
    with pytest.raises(ReaLSError, match="uint8 NHWC"):
        _MeanColour()(images.astype(np.float32))


# ---------------------------------------------------------------------------------------------------
# The FID-Inception network
# ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def random_inception():
    torch.manual_seed(0)
    return FIDInceptionV3()


@pytest.fixture(scope="module")
def inception_weights(random_inception, tmp_path_factory):
    path = tmp_path_factory.mktemp("fid") / "pt_inception-2015-12-05-00000000.pth"
    torch.save(random_inception.state_dict(), path)
    return path


def test_fid_inception_gives_pool_spatial_and_logits(random_inception):
    captured = {}
    hook = random_inception.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: captured.update(out=o))
    images = torch.rand(2, 3, 40, 40)
    with torch.no_grad():
        out = random_inception(images)
    hook.remove()
    assert out["pool"].shape == (2, 2048)
    assert out["spatial"].shape == (2, 17 * 17 * 7)
    assert out["logits"].shape == (2, 1008)
    # mixed_6/conv: Mixed_6d's 1x1 branch on the 17x17 grid, first 7 channels, flattened in TF's HWC order
    expected = captured["out"][:, :7].permute(0, 2, 3, 1).reshape(2, -1)
    torch.testing.assert_close(out["spatial"], expected)


def test_fid_inception_loads_weights_from_env(random_inception, inception_weights, monkeypatch):
    with pytest.raises(ReaLSError, match="not pytorch-fid's published"):
        build_fid_inception(inception_weights)  # random weights: not the published file
    monkeypatch.setattr(fid_inception, "WEIGHTS_SHA256_PREFIX", fid_inception.file_sha256(inception_weights)[:8])
    monkeypatch.setenv("REALS_INCEPTION_WEIGHTS", str(inception_weights.parent))
    assert find_weights() == inception_weights
    model = build_fid_inception()
    images = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(images)["pool"], random_inception(images)["pool"])
    assert model.weights_path == str(inception_weights)


def test_missing_fid_weights_name_the_file_and_where_it_goes(tmp_path, monkeypatch):
    monkeypatch.setenv("REALS_INCEPTION_WEIGHTS", str(tmp_path / "nowhere.pth"))
    with pytest.raises(ReaLSError, match=WEIGHTS_FILE) as e:
        build_fid_inception()
    assert str(tmp_path / "nowhere.pth") in str(e.value)
    monkeypatch.delenv("REALS_INCEPTION_WEIGHTS")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(ReaLSError, match=WEIGHTS_FILE) as e:
        build_fid_inception()
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in str(e.value)


def test_tf_resize_is_tf1_resize_bilinear():
    """A re-statement of TF 1.x ResizeBilinear (align_corners=False, half_pixel_centers=False), pixel by pixel."""
    x = torch.rand(1, 1, 5, 7, generator=torch.Generator().manual_seed(0))
    out = fid_inception.tf1_resize_bilinear(x, 11)
    img = x[0, 0].double().numpy()
    for i in range(11):
        for j in range(11):
            sy, sx = i * 5 / 11, j * 7 / 11
            y0, x0 = int(sy), int(sx)
            y1, x1 = min(y0 + 1, 4), min(x0 + 1, 6)
            top = img[y0, x0] + (img[y0, x1] - img[y0, x0]) * (sx - x0)
            bottom = img[y1, x0] + (img[y1, x1] - img[y1, x0]) * (sx - x0)
            assert abs(out[0, 0, i, j].item() - (top + (bottom - top) * (sy - y0))) < 1e-5
    assert not torch.allclose(out, torch.nn.functional.interpolate(x, size=(11, 11), mode="bilinear"))
    seen = {}
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for resize in ("pytorch-fid", "tf"):
        model = FIDInceptionV3(resize)
        model.Conv2d_1a_3x3.register_forward_hook(lambda m, i, o, r=resize: seen.update({r: i[0]}))
        with torch.no_grad():
            model(images)
    torch.testing.assert_close(seen["tf"], (fid_inception.tf1_resize_bilinear(images * 255, 299) - 128) / 128)
    assert (seen["tf"] - seen["pytorch-fid"]).abs().mean() > 1e-3


def test_wrong_fid_weights_file_is_a_clear_error(tmp_path, monkeypatch):
    bad = tmp_path / "pt_inception-2015-12-05-bad.pth"
    torch.save({"weight": torch.zeros(3)}, bad)
    monkeypatch.setattr(fid_inception, "WEIGHTS_SHA256_PREFIX", fid_inception.file_sha256(bad)[:8])
    with pytest.raises(ReaLSError, match="not pytorch-fid's FID Inception"):
        build_fid_inception(bad)


# ---------------------------------------------------------------------------------------------------
# ADM npz batches
# ---------------------------------------------------------------------------------------------------

def _images(n: int = 10, size: int = 6, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_reference_npz_is_adm_layout_for_plain_numpy(tmp_path):
    images, labels = _images(), np.arange(10) % 3
    stats = {"mu": np.zeros(4), "sigma": np.eye(4), "mu_s": np.ones(2), "sigma_s": np.eye(2)}
    path = tmp_path / "ref.npz"
    write_reference(path, images, labels, stats, meta={"split": "val"})
    with np.load(path) as data:
        assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (10, 6, 6, 3)
        np.testing.assert_array_equal(data["arr_0"], images)
        np.testing.assert_array_equal(data["arr_1"], labels)
        np.testing.assert_array_equal(data["sigma"], np.eye(4))
    assert set(read_stats(path)) == {"mu", "sigma", "mu_s", "sigma_s"}
    assert read_meta(path) == {"split": "val"}


@pytest.mark.parametrize("writer", [np.savez, np.savez_compressed])
def test_images_stream_in_batches_from_path_or_file(tmp_path, writer):
    images = _images(11)
    path = tmp_path / "samples.npz"
    writer(path, images, np.arange(11))                       # arr_0, arr_1 as the ADM sampler writes them
    assert image_shape(path) == (11, 6, 6, 3)
    batches = list(iter_images(path, batch_size=4))
    assert [len(b) for b in batches] == [4, 4, 3]
    np.testing.assert_array_equal(np.concatenate(batches), images)
    with open(path, "rb") as f:
        np.testing.assert_array_equal(np.concatenate(list(iter_images(io.BytesIO(f.read()), 5))), images)
    assert read_stats(path) == {}


def test_bad_npz_files_are_clear_errors(tmp_path):
    np.savez(tmp_path / "float.npz", np.zeros((2, 4, 4, 3), dtype=np.float32))
    with pytest.raises(ReaLSError, match="uint8 NHWC"):
        image_shape(tmp_path / "float.npz")
    np.savez(tmp_path / "other.npz", images=_images(2))
    with pytest.raises(ReaLSError, match="arr_0"):
        list(iter_images(tmp_path / "other.npz"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ReaLSError, match="not a readable .npz"):
        image_shape(tmp_path / "junk.npz")
