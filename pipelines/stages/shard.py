"""ImageNet-layout folder -> WebDataset shards + manifest.json (``reals shard``), one Ray task per shard.

Input: ``<data-path>/<split>/<class-id>/<file>``. Class folders are sorted and a class's index is its
position in that order (when other splits are already in the output's manifest, its class list is kept
so that labels agree across splits). Files are sorted; the first run gives shard ``i`` files
``[i*size, (i+1)*size)`` and records that assignment (``pipelines.assignment``): later runs keep it, put
files that arrived anywhere in the tree into new shards, and report files removed since (their samples
stay in their shards). A class folder that the recorded class list lacks is refused by name.

Each shard ``{split}-{i:06d}.tar`` holds ``{key}.png|.jpg`` (the ADM center crop, see
``pipelines.imaging``), ``{key}.cls`` and ``{key}.json`` (source path relative to the data path, original
size, mode, format, class id); keys are ``<class-id>_<stem>_<position in the split>``, ASCII, without
dots. Its marker ``{split}-{i:06d}.json`` (counts, skipped files with reasons, sha256 of the tar,
fingerprint of the shard's inputs and settings) is written last; a re-run skips a shard whose marker
agrees with its inputs (or, for a shard that lost source files since, with its settings) and tar, and
rewrites it otherwise. Files that cannot be read or decoded are skipped and reported, never fatal.
``manifest.json`` is written after all shards and merges the splits already in it. One run at a time
writes an output: a run holds ``shard.lease.json`` there (``storage.lease``) and its tasks write only while
it holds; another run waits ``--lease-wait`` seconds for it, then stops with one line. A record that exists
but does not parse (the assignment, the manifest, a marker) stops the run; it is never taken as absent.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import stat
import unicodedata
from typing import Literal, NamedTuple

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, Field

from pipelines import StageError
from pipelines.assignment import Assignment, assign, record_name, shard_name, to_record
from pipelines.config import Images, ShowProgress, StageConfig
from pipelines.imaging import prepare
from pipelines.registry import Chain, Output, Stage
from pipelines.report_parts import Card, ReportPart, Save, table, table_lines
from storage import fs as sfs
from storage.lease import Lease, fence
from storage.markers import fingerprint, read_json, sha256_url, write_json
from storage.shards import MANIFEST_REMEDY, write_shard

LEASE_FILE = "shard.lease.json"
FORMAT_VERSION = 1  # bump when the crop or the member layout changes: every shard is then redone
LOGGER = logging.getLogger(__name__)  # a Prefect flow attaches its run log to ``pipelines``


class ShardConfig(StageConfig):
    """Settings of ``reals shard``."""

    images: Images = Field(description="ImageNet-layout folder: split folders (train, val), class folders in them")
    output: str = Field(description="URL of the dataset folder to write shards and manifest.json into")
    split: str = Field("train", pattern=r"^[A-Za-z0-9_-]+$", description="split folder to shard")
    resolution: int = Field(256, ge=0, description="ADM center-crop side in pixels; 0 keeps the original bytes")
    shard_size: int = Field(1000, ge=1, description="images per shard")
    image_format: Literal["png", "jpg"] = Field("png", description="member encoding: png (lossless) or jpg (q95)")
    workers: int | None = Field(None, ge=1, description="most shards processed at once (default: all CPUs)")
    lease_wait: float = Field(0.0, ge=0, description="seconds to wait for another run's lease on the output")
    lease_ttl: float = Field(120.0, gt=0, description="lease lifetime in seconds; renewed every third of it")
    show_progress: ShowProgress = Field(True, description="show a progress bar")


class SkippedFile(BaseModel):
    """An input file left out of the shards, and why."""

    source: str
    reason: str


class ShardSummary(BaseModel):
    """What ``reals shard`` did."""

    output: str
    split: str
    classes: int
    shards: int
    shards_written: int
    shards_skipped: int
    shards_redone: int
    images: int
    upsampled: int
    skipped_files: int
    skipped: list[SkippedFile]
    empty_classes: list[str]
    new_files: int
    removed: list[str]


# ---------------------------------------------------------------------------------------------------
# Listing: a pure function of the folder's sorted contents
# ---------------------------------------------------------------------------------------------------

def sanitize(name: str, limit: int = 64) -> str:
    """ASCII-only, dot-free token for shard keys (accents stripped, other characters -> '-')."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    return re.sub(r"[^A-Za-z0-9_-]+", "-", ascii_name).strip("-")[:limit] or "x"


def printable(rel: str) -> str:
    """A path as valid Unicode for reports: bytes that are not UTF-8 in a file name become ``\\xNN``."""
    return os.fsencode(rel).decode("utf-8", "backslashreplace")


def _split_dir(images: str, split: str) -> str:
    if sfs.local_path(images) is None:
        raise StageError(f"--data-path must be a local folder, got {images}")
    root = images.removeprefix("file://")
    if not os.path.isdir(root):
        raise StageError(f"input folder not found: {images}")
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
        raise StageError(f"no {split!r} folder in {images}: expected {images}/{split}/<class-id>/<images>")
    return split_dir


def class_folders(split_dir: str) -> list[str]:
    """Sorted class folder names (hidden folders ignored)."""
    with os.scandir(split_dir) as it:
        return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))


def list_split(images: str, split: str) -> tuple[list[str], list[list], list[str]]:
    """``(class_folders, files, empty_classes)``; a file is ``[rel_path, size, mtime_ns]``, sorted by class, then name.

    Every non-directory entry is listed (broken links included) so that unreadable files get reported.
    """
    split_dir = _split_dir(images, split)
    found = class_folders(split_dir)
    if not found:
        raise StageError(f"no class folders in {split_dir}: expected {split}/<class-id>/<images>")
    files, empty = [], []
    for cid in found:
        with os.scandir(os.path.join(split_dir, cid)) as it:
            listed = sorted((e for e in it if not e.is_dir()), key=lambda e: e.name)
        if not listed:
            empty.append(printable(cid))
        for e in listed:
            try:
                st = e.stat()
                size, mtime = st.st_size, st.st_mtime_ns
            except OSError:
                size, mtime = -1, -1
            files.append([f"{split}/{cid}/{e.name}", size, mtime])
    if not files:
        raise StageError(f"split {split!r} of {images} holds no files (empty class folders: "
                         f"{', '.join(empty[:5])}{' ...' if len(empty) > 5 else ''})")
    if not any(_may_be_image(os.path.join(os.path.dirname(split_dir), rel)) for rel, _, _ in files):
        raise StageError(f"split {split!r} of {images} holds no image files, only {len(files)} other file(s) "
                         f"such as {printable(files[0][0])}")
    return found, files, empty


def _may_be_image(path: str) -> bool:
    """Whether a listed file may be an image: an image file name, else a header PIL recognises (read only when
    the name says otherwise, so a split of images costs one check)."""
    name = os.path.basename(path)
    if name.startswith("."):
        return False
    if os.path.splitext(name)[1].lower() in Image.registered_extensions():
        return True
    try:
        with Image.open(path):
            return True
    except Exception:  # noqa: BLE001 - unreadable or not an image: either way no image here
        return False


def _digest(rows, *settings) -> str:
    h = hashlib.sha256(json.dumps(settings).encode())
    for row in rows:
        h.update(json.dumps(row).encode() + b"\n")
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------
# One unit of work: one shard (runs in a Ray task)
# ---------------------------------------------------------------------------------------------------

def _read_source(path: str) -> bytes:
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise OSError(0, "not a regular file")
    with open(path, "rb") as f:
        return f.read()


def _samples(unit: dict, skipped: list, upsampled: list):
    """Encoded samples of a unit's files; files that fail are appended to ``skipped`` with a reason."""
    for path, cls, cid, key in unit["entries"]:
        rel = printable(path)
        try:
            data = _read_source(os.path.join(unit["root"], path))
        except OSError as e:
            skipped.append({"source": rel, "reason": f"unreadable: {e.strerror or type(e).__name__}"})
            continue
        try:
            ext, payload, info = prepare(data, unit["resolution"], unit["image_format"])
        except UnidentifiedImageError:
            skipped.append({"source": rel, "reason": "not an image (unknown or unreadable format)"})
            continue
        except Exception as e:  # noqa: BLE001 - any decode failure skips the file, never the run
            skipped.append({"source": rel, "reason": f"corrupt image: {type(e).__name__}: {e}"})
            continue
        upsampled.append(info["upsampled"])
        yield {"__key__": key, ext: payload, "cls": cls,
               "json": {"source": rel, "class_id": printable(cid), "size": info["size"], "mode": info["mode"],
                        "format": info["format"]}}


def _current(marker: dict | None, unit: dict) -> bool:
    """The marker is for this shard's inputs and settings; a shard that lost source files since is kept as
    it is (those samples stay) when its marker has the unit's settings."""
    if not marker:
        return False
    if marker.get("unit") == unit["fingerprint"]:
        return True
    settings = ("resolution", "image_format", "format_version")
    return unit["removed"] > 0 and [marker.get(k) for k in settings] == [unit[k] for k in settings]


def _agrees(marker: dict | None, unit: dict, tar_url: str) -> bool:
    """The marker is current for the unit, and the tar is the one it describes."""
    if not _current(marker, unit):
        return False
    fs, path = sfs.filesystem(tar_url)
    if not fs.exists(path) or fs.size(path) != marker.get("bytes"):
        return False
    return sha256_url(tar_url) == marker.get("sha256")


def _fence(unit: dict) -> None:
    """Write only while the driver's lease on the output holds (see ``storage.lease.fence``)."""
    if unit.get("lease_url"):
        fence(unit["lease_url"], unit["lease_owner"], unit["lease_margin"])


def process_unit(unit: dict) -> dict:
    """Write (or verify and skip) one shard; returns its marker plus ``status`` (or ``error``)."""
    name = shard_name(unit["split"], unit["index"])
    tar_url, marker_url = sfs.join(unit["output"], f"{name}.tar"), sfs.join(unit["output"], f"{name}.json")
    try:
        marker = read_json(marker_url)
        status = "written"
        if marker is not None or sfs.exists(tar_url):
            if _agrees(marker, unit, tar_url):
                return {**marker, "status": "skipped"}
            status = "redone"
            _fence(unit)
            sfs.remove(marker_url)
        skipped, upsampled = [], []
        written = write_shard(tar_url, _samples(unit, skipped, upsampled), before_publish=lambda: _fence(unit))
        fs, path = sfs.filesystem(tar_url)
        marker = {
            "shard": f"{name}.tar", "split": unit["split"], "index": unit["index"], "count": written["count"],
            "skipped": skipped, "upsampled": sum(upsampled), "sha256": written["sha256"], "bytes": fs.size(path),
            "unit": unit["fingerprint"], "resolution": unit["resolution"], "image_format": unit["image_format"],
            "format_version": FORMAT_VERSION,
        }
        _fence(unit)
        write_json(marker_url, marker)
        return {**marker, "status": status}
    except Exception as e:  # noqa: BLE001 - reported per shard by the driver; the other shards go on
        return {"shard": f"{name}.tar", "status": "failed", "error": f"{type(e).__name__}: {e}"}


# ---------------------------------------------------------------------------------------------------
# Stage
# ---------------------------------------------------------------------------------------------------

def _previous_classes(manifest: dict | None, config: ShardConfig, found_split_classes) -> list[str] | None:
    """The class list to keep from a manifest that already holds other splits (None: start afresh)."""
    others = [s for s in (manifest or {}).get("splits", {}) if s != config.split]
    if not others:
        return None
    for field in ("resolution", "image_format"):
        if manifest.get(field) != getattr(config, field):
            raise StageError(f"{config.output} holds splits {others} with {field}={manifest.get(field)!r}; "
                             f"use the same --{field.replace('_', '-')} or another --output")
    classes = manifest["classes"]
    _refuse_new_classes(found_split_classes, classes, config, f"splits {others}")
    return classes


def _refuse_new_classes(found: list[str], classes: list[str], config: ShardConfig, holder: str) -> None:
    extra = sorted(set(found) - set(classes))
    if extra:
        raise StageError(f"class folders {extra[:3]} of split {config.split!r} are not in the classes of "
                         f"{config.output} ({holder}); labels of written shards cannot change: move them out, "
                         "or shard all splits into a new --output")


def _remove_stale(output: str, split: str, count: int) -> None:
    """Delete shards of this split numbered beyond the assigned shard count (left over from another input)."""
    pattern = re.compile(rf"^{re.escape(split)}-(\d{{6}})\.(tar|json)$")
    for url in sfs.list_files(output):
        m = pattern.match(url.rsplit("/", 1)[-1])
        if m and int(m.group(1)) >= count:
            sfs.remove(url)


class Plan(NamedTuple):
    """The work of one run, a pure function of the input and the recorded assignment."""

    classes: list[str]
    units: list[dict]
    empty: list[str]
    fingerprint: str  # of the split's listing (paths, sizes, times)
    assignment: Assignment


def plan(config: ShardConfig) -> Plan:
    """The recorded shards (and new ones for unassigned files) as units, with the split's classes."""
    output = sfs.to_url(config.output)
    manifest = read_json(sfs.join(output, "manifest.json"), remedy=MANIFEST_REMEDY)
    folders, files, empty = list_split(config.images, config.split)
    found = [printable(c) for c in folders]
    listing_fingerprint = _digest(files)
    a = assign(output, config.split, manifest, [f[0] for f in files], listing_fingerprint,
               _previous_classes(manifest, config, found) or found, config.shard_size)
    _refuse_new_classes(found, a.classes, config, f"recorded in {record_name(config.split)}")
    index = {c: i for i, c in enumerate(a.classes)}
    stats = {rel: (size, mtime) for rel, size, mtime in files}
    settings = {"resolution": config.resolution, "image_format": config.image_format, "format_version": FORMAT_VERSION}
    root = os.path.abspath(config.images.removeprefix("file://"))
    units, position = [], 0
    for i, sources in enumerate(a.shards):
        rows = []
        for rel in sources:
            _, cid, name = rel.split("/")
            key = f"{sanitize(cid)}_{sanitize(os.path.splitext(name)[0])}_{position:07d}"
            rows.append([rel, index[printable(cid)], cid, key, *stats.get(rel, (-1, -1))])
            position += 1
        units.append({
            "index": i, "split": config.split, "output": output, "root": root, **settings,
            "entries": [row[:4] for row in rows], "fingerprint": _digest(rows, *settings.values()),
            "removed": sum(rel not in stats for rel in sources),
        })
    return Plan(a.classes, units, empty, listing_fingerprint, a)


def _write_manifest(config: ShardConfig, output: str, classes: list[str], results: list[dict],
                    split_fingerprint: str, removed: list[str]) -> None:
    url = sfs.join(output, "manifest.json")
    previous = read_json(url, remedy=MANIFEST_REMEDY) or {}
    splits = {s: v for s, v in previous.get("splits", {}).items() if s != config.split}
    splits[config.split] = {
        "count": sum(r["count"] for r in results),
        "shards": [r["shard"] for r in results],
        "shard_size": config.shard_size,
        "skipped": sum(len(r["skipped"]) for r in results),
        "fingerprint": split_fingerprint,
        "assignment": record_name(config.split),
        "removed": [printable(rel) for rel in removed],
    }
    splits = dict(sorted(splits.items()))
    write_json(url, {
        "classes": classes,
        "num_classes": len(classes),
        "resolution": config.resolution,
        "image_format": config.image_format,
        "format_version": FORMAT_VERSION,
        "splits": splits,
        "fingerprint": fingerprint({"classes": classes, "splits": {s: v["fingerprint"] for s, v in splits.items()},
                                    "resolution": config.resolution, "image_format": config.image_format}),
    })


def run(config: ShardConfig) -> ShardSummary:
    """Shard one split under the output's lease: one Ray task per shard, markers last, then the merged manifest."""
    output = sfs.to_url(config.output)
    lease = Lease(sfs.join(output, LEASE_FILE), ttl=config.lease_ttl)
    with lease.hold(wait=config.lease_wait):
        return _run(config, output, lease)


def _run(config: ShardConfig, output: str, lease: Lease) -> ShardSummary:
    import ray

    from pipelines.parallel import ensure_ray, map_units

    p = plan(config)
    classes, units, a = p.classes, p.units, p.assignment
    for u in units:
        u.update(lease_url=lease.url, lease_owner=lease.owner, lease_margin=lease.margin)
    lease.check()
    if not a.recorded:  # before any shard, so that a killed run resumes into the same shards
        write_json(sfs.join(output, record_name(config.split)), to_record(config.split, a))
    if a.removed:
        LOGGER.warning("%d source files of %s were removed since they were sharded; their samples stay in their "
                       "shards (listed under splits.%s.removed in manifest.json): %s%s", len(a.removed),
                       config.split, config.split, ", ".join(map(printable, a.removed[:5])),
                       " ..." if len(a.removed) > 5 else "")
    _remove_stale(output, config.split, len(units))
    results = []
    if units:
        ensure_ray()
        task = ray.remote(num_cpus=1, max_retries=0)(process_unit)  # map_units re-submits lost units
        results = map_units(task, units, f"shard {config.split}", max_in_flight=config.workers,
                            show_progress=config.show_progress)
    lease.check()  # a lost lease is the cause of whatever failed after it
    failed = [r for r in results if r["status"] == "failed"]
    if failed:
        raise StageError(f"{len(failed)} of {len(units)} shards failed (first: {failed[0]['shard']}: "
                         f"{failed[0]['error']}); re-run to retry them")
    _write_manifest(config, output, classes, results, p.fingerprint, a.removed)
    skipped = [SkippedFile(**s) for r in results for s in r["skipped"]]
    statuses = [r["status"] for r in results]
    return ShardSummary(
        output=output, split=config.split, classes=len(classes), shards=len(units),
        shards_written=statuses.count("written"), shards_skipped=statuses.count("skipped"),
        shards_redone=statuses.count("redone"), images=sum(r["count"] for r in results),
        upsampled=sum(r["upsampled"] for r in results), skipped_files=len(skipped), skipped=skipped,
        empty_classes=p.empty, new_files=len(a.new), removed=[printable(rel) for rel in a.removed],
    )


def missing_outputs(config: ShardConfig) -> str | None:
    """What the split's shards lack (a manifest entry, current markers), or None when they match the input."""
    manifest = read_json(sfs.join(sfs.to_url(config.output), "manifest.json"), remedy=MANIFEST_REMEDY)
    info = (manifest or {}).get("splits", {}).get(config.split)
    if not info:
        return f"no split {config.split!r} in manifest.json"
    if (manifest["resolution"], manifest["image_format"], info["shard_size"]) != (
            config.resolution, config.image_format, config.shard_size):
        return "manifest.json was written with other settings"
    p = plan(config)
    if info.get("fingerprint") != p.fingerprint or len(p.units) != len(info["shards"]):
        return f"the {config.split} folder changed since it was sharded"
    for u in p.units:
        marker = read_json(sfs.join(sfs.to_url(config.output), shard_name(config.split, u["index"]) + ".json"))
        if not _current(marker, u):
            return f"shard {shard_name(config.split, u['index'])} has no current marker"
    return None


def progress(config: ShardConfig):
    """A function giving the fraction of the split's shards whose marker is written."""
    total = max(1, len(plan(config).units))
    marker = re.compile(rf"^{re.escape(config.split)}-\d{{6}}\.json$")
    output = sfs.to_url(config.output)
    return lambda: sum(1 for u in sfs.list_files(output, ".json") if marker.match(u.rsplit("/", 1)[-1])) / total


def show(summary: ShardSummary, shown: int = 10) -> None:
    """A short table of the run, then the first skipped files with their reasons."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"reals shard {summary.split}", show_header=False)
    rows = {"output": summary.output, "classes": summary.classes, "shards": summary.shards,
            "shards written": summary.shards_written, "shards already done": summary.shards_skipped,
            "shards redone": summary.shards_redone, "images": summary.images,
            "upsampled (smaller than target)": summary.upsampled, "skipped files": summary.skipped_files,
            "new files (in new shards)": summary.new_files,
            "removed since sharded (samples kept)": len(summary.removed)}
    for name, value in rows.items():
        table.add_row(name, str(value))
    console = Console()
    console.print(table)
    for s in summary.skipped[:shown]:
        console.print(f"skipped {s.source}: {s.reason}", markup=False, highlight=False)
    if summary.skipped_files > shown:
        console.print(f"... and {summary.skipped_files - shown} more (listed in the shard markers)")
    if summary.empty_classes:
        console.print(f"empty class folders: {', '.join(summary.empty_classes)}", markup=False)


def check_split(config: ShardConfig) -> None:
    """Refuse, before anything runs, a data folder without the split's folder."""
    folder = sfs.local_path(config.images) or config.images
    if not os.path.exists(folder):
        raise StageError(f"data folder {config.images} not found: images must be an ImageNet-layout folder "
                         "(train/ and val/ with one folder per class)")
    if not os.path.isdir(folder):
        raise StageError(f"images {config.images} is not a folder")
    try:
        os.listdir(folder)
    except PermissionError:
        raise StageError(f"data folder {config.images} is not readable (permission denied)") from None
    if not os.path.isdir(os.path.join(folder, config.split)):
        raise StageError(f"no {config.split}/ folder in {config.images}")


def cards(summary: ShardSummary) -> list[Card]:
    """Shard counts and the files left out, with their reasons."""
    split = summary.split
    return [table(f"shard-{split}-counts", [{
        "split": split, "classes": summary.classes, "shards": summary.shards, "written": summary.shards_written,
        "already done": summary.shards_skipped, "redone": summary.shards_redone, "images": summary.images,
        "upsampled": summary.upsampled, "skipped files": summary.skipped_files,
        "empty classes": len(summary.empty_classes), "new files": summary.new_files,
        "removed since sharded": len(summary.removed), "output": summary.output,
    }], f"WebDataset shards of split {split!r} (removed files keep their samples in their shards)"),
        table(f"shard-{split}-skipped-files", [s.model_dump() for s in summary.skipped],
              f"input files of split {split!r} left out of the shards, and why")]


def report(config: ShardConfig, save: Save) -> ReportPart | None:
    """The data: classes, resolution and every split's images, shards and skipped files."""
    manifest = read_json(sfs.join(sfs.to_url(config.output), "manifest.json"))
    if not manifest:
        return None
    rows = [[s, v["count"], len(v["shards"]), v.get("skipped", 0)] for s, v in manifest["splits"].items()]
    return ReportPart(["## Data", "", f"{manifest['num_classes']} classes at {manifest['resolution']} px "
                       f"({manifest['image_format']}), from `{sfs.to_url(config.output)}`.", "",
                       *table_lines(["split", "images", "shards", "files skipped"], rows)])


STAGES = [Stage("shard", ShardConfig, ShardSummary, run, runs_on="ray", missing=missing_outputs, progress=progress,
                show=show, cards=cards, report=report, reads={"images": "images"},
                writes={"output": Output("shards/{split}", "shards")},
                chain=Chain("shard", "sharding (both splits)", splits=("train", "val"), check=check_split),
                help="pack an ImageNet-layout folder into WebDataset shards",
                description="Pack the images of one split (--data-path/split/class-id/*) into WebDataset shards (ADM center "
                            "crop) and manifest.json, one Ray task per shard. Re-runs skip finished shards, put files "
                            "that arrived since into new shards and redo broken ones; removed files are reported "
                            "(their samples stay); unreadable or corrupt files are skipped and listed.")]
