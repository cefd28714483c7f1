"""WebDataset shard IO on every fsspec backend: a deterministic single-shard writer and readers.

webdataset 1.0.2 knows no ``s3://``/``memory://``: ``register_gopen`` routes those schemes through
fsspec so plain ``webdataset.WebDataset(url)`` works on them too.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import webdataset as wds

from storage import StorageError
from storage.fs import apply_umask, child, filesystem, is_local_fs, join
from storage.markers import read_json

FSSPEC_SCHEMES = ("s3", "s3a", "memory", "gs", "gcs", "az", "abfs", "file")
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
MANIFEST_REMEDY = "restore it from a copy, or delete it and re-run `reals shard` for each split it listed"


def _gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **_):
    fs, path = filesystem(url)
    return fs.open(path, mode)


def register_gopen() -> None:
    """Let webdataset open every fsspec URL scheme (reads and writes)."""
    for scheme in FSSPEC_SCHEMES:
        wds.gopen_schemes[scheme] = _gopen_fsspec


register_gopen()


def write_shard(url: str, samples: Iterable[dict], before_publish: Callable[[], None] | None = None) -> dict:
    """Write one tar of samples (``{"__key__", ext: bytes|str|int|dict}``) byte-deterministically.

    The tar is built in a local temporary file, then moved (local) or uploaded (object store) in one
    piece, so a reader never sees a half-written shard under its final name; ``before_publish`` runs just
    before that (a writer's lease check). Returns count and sha256.
    """
    count = 0
    with tempfile.NamedTemporaryFile(suffix=".tar", delete=False) as tmp:
        with wds.TarWriter(tmp, user="reals", group="reals", mtime=0.0, encoder=False) as sink:
            for sample in samples:
                sink.write(_encode(sample))
                count += 1
        tmp_path = tmp.name
    try:
        digest = _sha256_file(tmp_path)
        if before_publish is not None:
            before_publish()
        fs, path = filesystem(url)
        if is_local_fs(fs):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            shutil.move(tmp_path, path)
            apply_umask(path)
        else:
            fs.put_file(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
    return {"count": count, "sha256": digest}


def _encode(sample: dict) -> dict:
    out = {}
    for k, v in sample.items():
        if k.startswith("__"):
            out[k] = v
        elif isinstance(v, (bytes, bytearray)):
            out[k] = bytes(v)
        elif isinstance(v, (dict, list)):
            out[k] = json.dumps(v, sort_keys=True).encode()
        else:
            out[k] = str(v).encode()
    if "." in out["__key__"]:
        raise StorageError(f"shard keys must not contain dots: {out['__key__']!r}")
    return out


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------

def read_manifest(dataset_url: str) -> dict:
    """The dataset's manifest.json; a clear error when the folder holds no shards."""
    manifest = read_json(join(dataset_url, "manifest.json"), remedy=MANIFEST_REMEDY)
    if manifest is None:
        raise StorageError(f"no manifest.json under {dataset_url}: run `reals shard` first")
    return manifest


def shard_urls(dataset_url: str, split: str = "train") -> list[str]:
    """URLs of a split's shards, in manifest order; a shard name that is not a plain file name is refused."""
    manifest = read_manifest(dataset_url)
    if split not in manifest["splits"]:
        raise StorageError(f"split {split!r} not in {dataset_url} (has {sorted(manifest['splits'])})")
    return [child(dataset_url, name, "manifest.json shard name") for name in manifest["splits"][split]["shards"]]


def decode_image(data: bytes) -> np.ndarray:
    """Encoded image bytes -> uint8 HxWx3 RGB array."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def _decode_sample(raw: dict) -> dict:
    ext = next((e for e in IMAGE_EXTS if e in raw), None)
    if ext is None:
        raise ValueError("no image member")
    return {
        "__key__": raw["__key__"],
        "__url__": raw.get("__url__", ""),
        "image": decode_image(raw[ext]),
        "cls": int(raw["cls"]),
        "json": json.loads(raw["json"]) if "json" in raw else {},
    }


def iter_shards(urls: list[str], shuffle: int | bool = 0, seed: int = 0, split_by_node: bool = False,
                split_by_worker: bool = True, skipped: list | None = None) -> Iterator[dict]:
    """Decoded samples ``{"__key__", "__url__", "image" (uint8 HxWx3), "cls", "json"}`` from shards.

    ``shuffle`` > 0 shuffles shards and a sample buffer of that size; ``split_by_node`` splits shards
    across torch.distributed ranks. Undecodable samples are skipped; ``(key, reason)`` goes to ``skipped``.
    """
    dataset = wds.WebDataset(
        list(urls),
        shardshuffle=len(urls) if shuffle else False,
        seed=seed,
        detshuffle=bool(shuffle),
        nodesplitter=wds.split_by_node if split_by_node else None,
        workersplitter=wds.split_by_worker if split_by_worker else None,
        empty_check=False,
        handler=wds.warn_and_continue,
    )
    if shuffle:
        dataset = dataset.shuffle(int(shuffle), seed=seed)
    for raw in dataset:
        try:
            yield _decode_sample(raw)
        except Exception as e:  # noqa: BLE001 - a corrupt sample is skipped and reported, never fatal
            if skipped is not None:
                skipped.append((raw.get("__key__", "?"), f"{type(e).__name__}: {e}"))


def iter_shard(url: str, skipped: list | None = None) -> Iterator[dict]:
    """Samples of one shard in stored order (for stages whose unit is a shard)."""
    yield from iter_shards([url], shuffle=0, split_by_worker=False, skipped=skipped)
