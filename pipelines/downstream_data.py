"""Labelled images with dense ground truth for `reals downstream`: the images (a synthetic folder or shards),
their segmentation masks and depth maps (``masks/<split>/<class-id>/<stem>.png``, ``depth/...``), cropped as
the shards are, and the generated latents of a samples file."""
from __future__ import annotations

import io
import posixpath

import numpy as np
import torch

from pipelines import StageError
from storage import fs as sfs
from storage.image_folder import file_states, split_images, subfolders
from storage.markers import fingerprint, read_json

TRUTH_DIRS = {"seg": "masks", "depth": "depth"}
DEPTH_RATIO = 1.5  # synthetic depth of drawing order j: DEPTH_RATIO ** -j


def depth_from_order(order: np.ndarray) -> np.ndarray:
    """Synthetic drawing order (0 background, j: the j-th shape, nearer) -> positive depth ``1.5 ** -order``."""
    return (DEPTH_RATIO ** -order.astype(np.float64)).astype(np.float32)


def crop_truth(truth: np.ndarray, size: int) -> np.ndarray:
    """The ADM center-crop geometry applied to a label map, with nearest resampling."""
    from PIL import Image

    h, w = truth.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = Image.fromarray(truth[top:top + side, left:left + side])
    return np.asarray(square.resize((size, size), Image.Resampling.NEAREST))


def crop_image(image, size: int) -> np.ndarray:
    """Encoded bytes or an RGB array -> uint8 ``[size, size, 3]`` (ADM center crop)."""
    from PIL import Image

    from pipelines.imaging import center_crop, open_image, to_rgb

    im = to_rgb(open_image(image)) if isinstance(image, bytes) else Image.fromarray(image)
    if im.size != (size, size):
        im = center_crop(im, size)
    return np.asarray(im)


def _read_png(url: str) -> np.ndarray | None:
    from PIL import Image

    if not sfs.exists(url):
        return None
    with Image.open(io.BytesIO(sfs.read_bytes(url))) as im:
        return np.asarray(im.convert("L"))


def _evenly_spaced(total: int, n: int) -> list[int]:
    """``min(n, total)`` indices spread evenly over ``range(total)`` (every class of a sorted list)."""
    if total <= n:
        return list(range(total))
    return sorted({int(round(i)) for i in np.linspace(0, total - 1, n)})


class Dataset:
    """Labelled images from a synthetic folder or shards, with their ground truth when there is any."""

    def __init__(self, images: str, ground_truth: str | None):
        self.url = sfs.to_url(images)
        self.manifest = read_json(sfs.join(self.url, "manifest.json"))
        if self.manifest is None:
            folders = subfolders(self.url)
            if not folders:
                raise StageError(f"--data-path {images}: neither shards (no manifest.json) nor an image folder")
            self.classes = sorted({c for split in folders if split not in TRUTH_DIRS.values()
                                   for c in subfolders(sfs.join(self.url, split))})
            ground_truth = ground_truth or (self.url if set(TRUTH_DIRS.values()) & set(folders) else None)
        else:
            self.classes = list(self.manifest["classes"])
        self.truth_root = sfs.to_url(ground_truth) if ground_truth else None

    @property
    def num_seg_classes(self) -> int:
        return len(self.classes) + 1

    def fingerprint(self, splits: list[str], tasks: list[str]) -> str:
        """Digest of the inputs: the manifest's fingerprint (or the split folders) and the truth folders."""
        folders = [] if self.manifest is not None else [sfs.join(self.url, s) for s in splits]
        if self.truth_root:
            folders += [sfs.join(self.truth_root, TRUTH_DIRS[t], s) for t in tasks for s in splits]
        rows: list = [self.manifest.get("fingerprint") if self.manifest else None, self.truth_root]
        for folder in folders:
            rows += file_states(folder)
        return fingerprint(rows)

    def _entries(self, split: str) -> list[tuple[str, int]]:
        """``(relative source path, class index)`` of a folder split, sorted."""
        found = split_images(self.url, split)
        if found is None:
            raise StageError(f"no {split!r} split in {self.url}: expected {split}/<class-id>/<images> "
                             "(e.g. `reals synthetic --val-per-class N` writes val/)")
        index = {c: i for i, c in enumerate(self.classes)}
        return [(rel, index[c]) for c, rel in found]

    def _raw(self, split: str, n: int, skipped: list[str]):
        """``(image bytes or array, class, source path)`` of ``n`` images spread over the split."""
        if self.manifest is None:
            entries = self._entries(split)
            for i in _evenly_spaced(len(entries), n):
                rel, cls = entries[i]
                try:
                    data = sfs.read_bytes(sfs.join(self.url, rel))
                except OSError as e:
                    skipped.append(f"{rel}: unreadable ({e.strerror or type(e).__name__})")
                    continue
                yield data, cls, rel
            return
        from storage.shards import iter_shards, shard_urls

        count = int(self.manifest["splits"].get(split, {}).get("count", 0))
        keep = set(_evenly_spaced(count, n))
        bad: list = []
        for i, sample in enumerate(iter_shards(shard_urls(self.url, split), split_by_worker=False, skipped=bad)):
            if i in keep:
                yield sample["image"], sample["cls"], sample["json"].get("source", sample["__key__"])
        skipped.extend(f"{key}: {reason}" for key, reason in bad)

    def truth_url(self, task: str, source: str) -> str:
        """Where the ground truth of ``task`` for the image at ``source`` (relative path) lies."""
        root = sfs.join(self.truth_root, TRUTH_DIRS[task])
        return sfs.within(root, sfs.join(root, posixpath.splitext(source)[0] + ".png"))  # ``source`` is read from a shard

    def examples(self, split: str, n: int, size: int, tasks: list[str], skipped: list[str]) -> list[dict]:
        """Up to ``n`` images ``{image, cls, source, truth: {task: map}}`` cropped to ``size``."""
        out = []
        for raw, cls, source in self._raw(split, n, skipped):
            truth, missing = {}, None
            for task in tasks if self.truth_root else ():
                found = _read_png(self.truth_url(task, source))
                if found is None:
                    missing = self.truth_url(task, source)
                    break
                truth[task] = crop_truth(found, size)
            if missing:
                skipped.append(f"{source}: no ground truth at {missing}")
                continue
            try:
                image = crop_image(raw, size)
            except Exception as e:  # noqa: BLE001 - a bad image is skipped and reported, never fatal
                skipped.append(f"{source}: unreadable image ({type(e).__name__})")
                continue
            out.append({"image": image, "cls": int(cls), "source": source, "truth": truth})
        return out


def truth_tensor(task: str, maps: list[np.ndarray]) -> torch.Tensor:
    stack = np.stack(maps)
    return torch.from_numpy(depth_from_order(stack) if task == "depth" else stack.astype(np.int64))


def load_generated(path: str, limit: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """``(latents [N, C, h, w] float32, labels or None, images uint8 NHWC or None)`` from a samples file."""
    url = sfs.to_url(path)
    if not sfs.exists(url):
        raise StageError(f"--samples {path} not found")
    data = np.load(io.BytesIO(sfs.read_bytes(url)), allow_pickle=False)
    if isinstance(data, np.ndarray):
        return data[:limit].astype(np.float32), None, None
    labels = data["arr_1"][:limit] if "arr_1" in data.files else None
    images = data["arr_0"][:limit] if "arr_0" in data.files else None
    if "latents" in data.files:
        latents = data["latents"]
    else:
        beside = [url + ".latents.npy", url.removesuffix(".npz") + ".latents.npy"]
        found = next((u for u in beside if sfs.exists(u)), None)
        if found is None:
            raise StageError(f"--samples {path} holds no latents (no `latents` array, no {beside[-1]}); "
                             "sample with --save-latents")
        latents = np.load(io.BytesIO(sfs.read_bytes(found)), allow_pickle=False)
    return latents[:limit].astype(np.float32), labels, images
