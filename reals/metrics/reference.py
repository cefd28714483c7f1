"""ADM-layout ``.npz`` batches: ``arr_0`` uint8 NHWC images, optional ``arr_1`` labels, and for reference
batches the precomputed Inception statistics ``mu``, ``sigma`` (pool_3) and ``mu_s``, ``sigma_s`` (spatial).

Images stream from the zip member in batches, so a 50k-image batch never has to sit in memory whole.
``file`` is a path or a seekable binary file object.
"""
from __future__ import annotations

import json
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from numpy.lib import format as npy_format

from reals import ReaLSError

IMAGES_KEY = "arr_0"
LABELS_KEY = "arr_1"
META_KEY = "meta"
STATS_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


def _name(file) -> str:
    return str(getattr(file, "name", None) or getattr(file, "path", None) or file)


def _load(file):
    """``np.load`` from the start of ``file`` (a file object may have been moved by ``zipfile``)."""
    if hasattr(file, "seek"):
        file.seek(0)
    return np.load(file)


@contextmanager
def _member(file, key: str):
    """The open ``{key}.npy`` member of an npz and its ``(shape, fortran_order, dtype)`` header."""
    try:
        zf = zipfile.ZipFile(file)
    except (zipfile.BadZipFile, OSError) as e:
        raise ReaLSError(f"{_name(file)} is not a readable .npz file: {e}") from e
    with zf:
        if f"{key}.npy" not in zf.namelist():
            raise ReaLSError(f"{_name(file)} has no {key!r} array (ADM layout: arr_0 = uint8 NHWC images)")
        with zf.open(f"{key}.npy") as f:
            version = npy_format.read_magic(f)
            if version == (1, 0):
                header = npy_format.read_array_header_1_0(f)
            elif version == (2, 0):
                header = npy_format.read_array_header_2_0(f)
            else:
                header = None
            yield f, header


def _check_images(file, shape, dtype) -> None:
    if np.dtype(dtype) != np.uint8 or len(shape) != 4 or shape[-1] != 3:
        raise ReaLSError(f"{_name(file)}: arr_0 must be uint8 NHWC RGB images, got {np.dtype(dtype)} {tuple(shape)}")


def npz_keys(file) -> list[str]:
    """Names of the arrays in an npz."""
    with _load(file) as data:
        return list(data.files)


def has_array(file, key: str) -> bool:
    """Whether the npz holds an array ``key``."""
    with zipfile.ZipFile(file) as zf:
        return f"{key}.npy" in zf.namelist()


def array_shape(file, key: str) -> tuple[int, ...]:
    """Shape of the array ``key``, read from its header only."""
    with _member(file, key) as (_, header):
        return tuple(_load(file)[key].shape) if header is None else tuple(header[0])


def array_head(file, key: str, n: int) -> np.ndarray:
    """The first ``n`` rows of the array ``key``, read without loading the rest."""
    with _member(file, key) as (f, header):
        if header is None or header[1] or header[2].hasobject:
            return _load(file)[key][:n]
        shape, _, dtype = header
        n = min(n, shape[0])
        row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        return np.frombuffer(f.read(n * row), dtype=dtype).reshape((n, *shape[1:]))


def image_shape(file) -> tuple[int, ...]:
    """Shape of ``arr_0`` (N, H, W, 3), read from its header only."""
    with _member(file, IMAGES_KEY) as (_, header):
        if header is None:
            return tuple(_load(file)[IMAGES_KEY].shape)
        shape, _, dtype = header
        _check_images(file, shape, dtype)
        return tuple(shape)


def iter_images(file, batch_size: int = 64) -> Iterator[np.ndarray]:
    """Consecutive ``arr_0`` batches of at most ``batch_size`` uint8 NHWC images."""
    with _member(file, IMAGES_KEY) as (f, header):
        if header is None or header[1] or header[2].hasobject:
            whole = _load(file)[IMAGES_KEY]
            _check_images(file, whole.shape, whole.dtype)
            for start in range(0, len(whole), batch_size):
                yield whole[start:start + batch_size]
            return
        shape, _, dtype = header
        _check_images(file, shape, dtype)
        row = int(np.prod(shape[1:]))
        for start in range(0, shape[0], batch_size):
            n = min(batch_size, shape[0] - start)
            data = f.read(n * row)
            if len(data) != n * row:
                raise ReaLSError(f"{_name(file)}: arr_0 is truncated at image {start}")
            yield np.frombuffer(data, dtype=np.uint8).reshape(n, *shape[1:])


def read_stats(file) -> dict[str, np.ndarray]:
    """The precomputed Inception statistics present in an npz (``mu``, ``sigma``, ``mu_s``, ``sigma_s``)."""
    with _load(file) as data:
        return {k: data[k] for k in STATS_KEYS if k in data.files}


def read_meta(file) -> dict:
    """This project's provenance record stored in a reference npz (``{}`` for published ADM batches)."""
    with _load(file) as data:
        return json.loads(str(data[META_KEY])) if META_KEY in data.files else {}


def write_reference(file, images: np.ndarray, labels: np.ndarray | None = None,
                    stats: dict[str, np.ndarray] | None = None, meta: dict | None = None) -> None:
    """Write an ADM-layout reference batch readable by ``np.load`` and the ADM evaluator."""
    _check_images(file, images.shape, images.dtype)
    arrays = {IMAGES_KEY: images}
    if labels is not None:
        arrays[LABELS_KEY] = np.asarray(labels, dtype=np.int64)
    for k, v in (stats or {}).items():
        if k not in STATS_KEYS:
            raise ReaLSError(f"unknown reference statistic {k!r}; ADM layout has {', '.join(STATS_KEYS)}")
        arrays[k] = np.asarray(v, dtype=np.float64)
    if meta:
        arrays[META_KEY] = np.array(json.dumps(meta, sort_keys=True))
    np.savez(file, **arrays)
