"""The synthetic ImageNet-layout generator: determinism, layout, ground truth, learnable classes, CLI."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from pipelines.cli import main
from pipelines.stages.synthetic import SyntheticConfig, class_id, class_spec, run


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _images(root: Path, split: str) -> list[tuple[int, Path]]:
    classes = sorted(p.name for p in (root / split).iterdir())
    return [(k, p) for k, c in enumerate(classes) for p in sorted((root / split / c).glob("*.JPEG"))]


def _ground_truth(root: Path, split: str, image: Path) -> tuple[np.ndarray, np.ndarray]:
    rel = Path(split) / image.parent.name / f"{image.stem}.png"
    return np.asarray(Image.open(root / "masks" / rel)), np.asarray(Image.open(root / "depth" / rel))


def test_same_seed_gives_byte_identical_files(tmp_path):
    settings = dict(classes=3, per_class=3, val_per_class=1, size=32)
    run(SyntheticConfig(output=str(tmp_path / "a"), seed=7, **settings))
    run(SyntheticConfig(output=str(tmp_path / "b"), seed=7, **settings))
    run(SyntheticConfig(output=str(tmp_path / "c"), seed=8, **settings))
    a, b, c = (_files(tmp_path / d) for d in "abc")
    assert a == b
    assert a.keys() == c.keys()
    images = [k for k in a if k.endswith(".JPEG")]
    assert len(images) == 3 * (3 + 1)
    assert all(a[k] != c[k] for k in images)


def test_layout_follows_imagenet(synthetic_root):
    root = Path(synthetic_root)
    for split, per_class in (("train", 12), ("val", 3)):
        classes = sorted(p.name for p in (root / split).iterdir())
        assert classes == [class_id(k) for k in range(4)]
        for c in classes:
            assert len(list((root / split / c).glob("*.JPEG"))) == per_class
            for kind in ("masks", "depth"):
                assert len(list((root / kind / split / c).glob("*.png"))) == per_class
    mapping = (root / "LOC_synset_mapping.txt").read_text().splitlines()
    assert [line.split()[0] for line in mapping] == [class_id(k) for k in range(4)]
    assert all(class_spec(k)["shape"] in mapping[k] for k in range(4))


def test_masks_and_depth_match_the_images(synthetic_root):
    root = Path(synthetic_root)
    saw_overlap_order = False
    for split in ("train", "val"):
        for k, path in _images(root, split):
            rgb = np.asarray(Image.open(path).convert("RGB")).astype(np.float64) / 255
            mask, depth = _ground_truth(root, split, path)
            assert mask.shape == depth.shape == rgb.shape[:2] == (48, 48)
            assert set(np.unique(mask)) == {0, k + 1}
            np.testing.assert_array_equal(mask > 0, depth > 0)
            saw_overlap_order |= depth.max() >= 2
            # shape interiors stand out from the background around them; a misplaced mask would not
            inner, outer = ndimage.binary_erosion(mask > 0), ~ndimage.binary_dilation(mask > 0)
            distance = np.abs(rgb - rgb[outer].mean(0)).sum(-1)
            assert distance[inner].mean() > 1.25 * distance[outer].mean(), path
    assert saw_overlap_order  # layouts with several shapes number them in drawing order


def test_classes_are_learnable(synthetic_root):
    """A nearest-centroid classifier on the hues of vivid pixels beats chance by far on the val split."""
    root = Path(synthetic_root)

    def features(path: Path) -> np.ndarray:
        hsv = np.asarray(Image.open(path).convert("HSV")).reshape(-1, 3).astype(np.float64)
        vivid = hsv[hsv[:, 1] > 100]  # the background is never this saturated
        hist = np.bincount(vivid[:, 0].astype(int) * 12 // 256, minlength=12)
        return hist / max(hist.sum(), 1)

    train = _images(root, "train")
    centroids = np.stack([np.mean([features(p) for c, p in train if c == k], axis=0) for k in range(4)])
    val = _images(root, "val")
    predicted = [int(np.argmin(((centroids - features(p)) ** 2).sum(1))) for _, p in val]
    accuracy = np.mean([pred == k for pred, (k, _) in zip(predicted, val)])
    assert accuracy >= 0.75


def test_cli_writes_dataset_and_rejects_bad_flags(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["synthetic", "--output", str(out), "--classes", "2", "--per-class", "2", "--size", "16"]) == 0
    assert len(list(out.glob("train/*/*.JPEG"))) == 4 and not (out / "val").exists()
    assert "2 classes" in capsys.readouterr().out
    assert main(["synthetic", "--output", str(out), "--classes", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "classes" in err and len(err.splitlines()) == 1
