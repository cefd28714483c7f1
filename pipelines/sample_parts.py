"""The parts of a samples file: what each unit of `reals sample` writes, and their merge into the file.

A unit ``[start, end)`` of sample indices is ``<output>.parts/{start:08d}-{end:08d}.npz`` (``arr_0`` uint8 NHWC
images, ``arr_1`` labels, optionally ``latents``), followed by its done-marker ``.json``, which records the run's
fingerprint and the part's sha256. The merged file is read back whole (every member's CRC and shape) before the
parts may go.
"""
from __future__ import annotations

import io
import zipfile

import numpy as np

from pipelines import StageError
from storage.fs import filesystem, join, read_bytes, to_url, write_bytes_atomic
from storage.markers import read_json, sha256_bytes, write_json


def parts_url(output: str) -> str:
    """The folder of a samples file's parts: ``<output>.parts``."""
    return to_url(output) + ".parts"


def part_url(parts: str, start: int, end: int, ext: str) -> str:
    return join(parts, f"{start:08d}-{end:08d}.{ext}")


def part_is_done(parts: str, start: int, end: int, run_fp: str) -> bool:
    """Whether the unit's marker exists, belongs to these settings and agrees with the part's bytes."""
    marker = read_json(part_url(parts, start, end, "json"))
    if not marker or marker.get("run") != run_fp or marker.get("count") != end - start:
        return False
    try:
        return sha256_bytes(read_bytes(part_url(parts, start, end, "npz"))) == marker.get("sha256")
    except FileNotFoundError:
        return False


def write_part(parts: str, start: int, end: int, arrays: dict[str, np.ndarray], run_fp: str, **extra) -> dict:
    """Write the unit's part file, then its marker (``extra`` recorded in it too); returns the marker."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    data = buf.getvalue()
    write_bytes_atomic(part_url(parts, start, end, "npz"), data)
    marker = {"start": start, "end": end, "count": end - start, "run": run_fp, "sha256": sha256_bytes(data), **extra}
    write_json(part_url(parts, start, end, "json"), marker)
    return marker


def merge_parts(parts: str, units: list[dict], save_latents: bool) -> dict[str, np.ndarray]:
    """The full arrays from every unit's part file, in index order."""
    arrays: dict[str, np.ndarray] = {}
    for u in units:
        with np.load(io.BytesIO(read_bytes(part_url(parts, u["start"], u["end"], "npz")))) as part:
            names = ["arr_0", "arr_1"] + (["latents"] if save_latents else [])
            for name in names:
                a = part[name]
                if name not in arrays:
                    arrays[name] = np.empty((units[-1]["end"], *a.shape[1:]), a.dtype)
                arrays[name][u["start"]:u["end"]] = a
    return arrays


def verify_merged(url: str, arrays: dict[str, np.ndarray]) -> None:
    """Read the merged ``.npz`` back from storage: every member's CRC holds and each array has its shape."""
    from reals.metrics.reference import array_shape

    fs, path = filesystem(url)
    with fs.open(path, "rb") as f:
        with zipfile.ZipFile(f) as z:
            bad = z.testzip()
            names = sorted(n.removesuffix(".npy") for n in z.namelist())
        if bad is not None or names != sorted(arrays):
            raise StageError(f"{url} did not read back whole ({f'member {bad} fails its CRC' if bad else names}); "
                             f"its parts are kept: re-run the same command")
        for name, a in arrays.items():
            if tuple(array_shape(f, name)) != a.shape:
                raise StageError(f"{url}: {name} reads back with another shape; its parts are kept: re-run")
