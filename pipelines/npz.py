"""``.npz`` files by URL (local or object store): opened for the readers in ``reals.metrics.reference``, written
whole or not at all, and peeked at (an array's shape or first rows) without loading the rest."""
from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np

from pipelines import StageError
from reals.metrics.reference import array_head, array_shape, has_array
from storage.fs import exists, filesystem, is_local_fs


@contextmanager
def open_npz(url: str, what: str) -> Iterator:
    """A local path, or an open seekable file for object-store URLs; a StageError naming ``what`` when absent."""
    fs, path = filesystem(url)
    if not fs.exists(path):
        raise StageError(f"{what} not found: {url}")
    if is_local_fs(fs):
        yield path
    else:
        with fs.open(path, "rb") as f:
            yield f


def write_npz(url: str, write: Callable) -> None:
    """Call ``write(file)`` (``np.savez`` and the like) so the npz at ``url`` appears whole or not at all."""
    fs, path = filesystem(url)
    if is_local_fs(fs):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}.npz"
        try:
            with open(tmp, "wb") as f:
                write(f)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    else:
        with fs.open(path, "wb") as f:
            write(f)


def npz_shape(url: str, name: str = "arr_0") -> tuple[int, ...] | None:
    """The shape of one array of an ``.npz`` (its header only), or None when the file or array is absent."""
    if not exists(url):
        return None
    fs, path = filesystem(url)
    with fs.open(path, "rb") as f:
        return array_shape(f, name) if has_array(f, name) else None


def npz_head(url: str, name: str, n: int) -> np.ndarray:
    """The first ``n`` rows of one array of an ``.npz``, read without loading the rest."""
    fs, path = filesystem(url)
    with fs.open(path, "rb") as f:
        return array_head(f, name, n)
