"""The stable assignment of a split's source files to shards, recorded in ``{split}-assignment.json``.

A file keeps the shard, and the position in the split (hence its key and label), that it was first given;
files found later, wherever they are in the folder tree, fill new shards after the last one, so the shards
already written and the latent-store rows made from them never change. Files gone from the folder stay
assigned (their samples stay in their shards, their rows in the stores) and are reported as removed.

The record is ``{"split", "classes", "shards": [[source, ...], ...]}``: shard ``i`` is ``{split}-{i:06d}``,
sources are paths relative to the data path (``<split>/<class-id>/<file>``). A manifest written before
the record existed is adopted as the sorted slices it was made from, when the folder still matches it.
"""
from __future__ import annotations

from typing import NamedTuple

from pipelines import StageError
from storage.fs import join
from storage.markers import read_json


class Assignment(NamedTuple):
    """The split's shards as lists of sources, what the folder gained and lost, and whether to record it."""

    classes: list[str]
    shards: list[list[str]]
    new: list[str]
    removed: list[str]
    recorded: bool  # False: this assignment differs from (or is not yet) the one on disk


def record_name(split: str) -> str:
    return f"{split}-assignment.json"


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}"


def _check_sources(record: dict, split: str, url: str) -> list[list[str]]:
    """The record's shards; a source outside ``<split>/<class-id>/<file>`` is refused by name."""
    shards = record.get("shards")
    if record.get("split") != split or not isinstance(shards, list):
        raise StageError(f"{url} is not the shard assignment of split {split!r}; move it away to start afresh")
    for sources in shards:
        for rel in sources:
            parts = rel.split("/") if isinstance(rel, str) else []
            if len(parts) != 3 or parts[0] != split or any(p in ("", ".", "..") or "\0" in p for p in parts):
                raise StageError(f"refusing source {rel!r} in {url}: expected {split}/<class-id>/<file>")
    return shards


def _recorded(output: str, split: str, manifest: dict | None, files: list[str],
              listing_fingerprint: str) -> tuple[dict | None, bool]:
    """``(record, on_disk)``: the record, the adopted pre-record manifest, or None (nothing sharded yet)."""
    url = join(output, record_name(split))
    record = read_json(url, remedy="restore it from a copy (it fixes which files each shard holds); deleting it "
                                   "re-derives it from manifest.json only while the folder is as it was sharded")
    if record is not None:
        _check_sources(record, split, url)
        return record, True
    info = (manifest or {}).get("splits", {}).get(split)
    if not info:
        return None, False
    size = info.get("shard_size") or 0
    slices = [files[i:i + size] for i in range(0, len(files), size)] if size else []
    if info.get("fingerprint") != listing_fingerprint or len(slices) != len(info.get("shards", [])):
        raise StageError(f"{output} was sharded before shard assignments were recorded, and the {split} folder "
                         f"changed since: shard it once with the folder as it was then (that records the "
                         f"assignment), or shard into a new --output")
    return {"split": split, "classes": manifest["classes"], "shards": slices}, False


def assign(output: str, split: str, manifest: dict | None, files: list[str], listing_fingerprint: str,
           classes: list[str], shard_size: int) -> Assignment:
    """Recorded shards first, then the unassigned ``files`` (in listing order) in new shards of ``shard_size``.

    ``classes`` is the label order for a split sharded for the first time; a recorded split keeps its own.
    """
    record, on_disk = _recorded(output, split, manifest, files, listing_fingerprint)
    shards = record["shards"] if record else []
    assigned = {rel for sources in shards for rel in sources}
    present = set(files)
    new = [rel for rel in files if rel not in assigned]
    removed = [rel for sources in shards for rel in sources if rel not in present]
    shards = shards + [new[i:i + shard_size] for i in range(0, len(new), shard_size)]
    return Assignment(record["classes"] if record else classes, shards, new, removed, on_disk and not new)


def to_record(split: str, assignment: Assignment) -> dict:
    return {"split": split, "classes": assignment.classes, "shards": assignment.shards}
