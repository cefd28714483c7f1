"""The Zarr v3 latent store: normalised posteriors per image, one group per (dataset, VAE fingerprint).

Layout under an output URL (layout 2)::

    versions.json                  index of versions, newest last ("latest" names it)
    <vae_fingerprint>/             Zarr v3 group; attrs hold provenance, the row map and "layout": 2
        segments/<shard>-<token>/  one writer's rows of one source shard, a Zarr group of arrays
                                   mean, std (the normalised posterior moments, float16 [n, C, h, w]),
                                   mean_flip, std_flip (optional), labels (int32 [n]), keys (vlen utf-8 [n]),
                                   teacher_global (float16 [n, D]; absent from a latents-only version:
                                   teacher_width null), teacher_patch (float16 [n, D, gh, gw], optional)
        commits/<slot:012d>.json   the commit log: each entry a shard's done-marker naming its segment,
                                   or a writer's takeover; the latest entry of a shard wins

A writer puts a shard's rows into a segment of its own (a fresh token per attempt), then commits: it claims
the next free slot of the log with an exclusive create (an S3 conditional PUT), after checking its lease.
A run that takes the lease over first claims a slot itself. Slots are claimed in order, each only after the
one before it was seen taken, so any commit still in flight from the former holder targets a slot at or
below the takeover's and fails: rows become visible only through a commit, and a writer that lost its lease
cannot commit however late its bytes arrive. A segment no commit names is never read. Readers list the log,
keep each shard's latest entry and read that entry's segment. The row map (global row numbers: each source
shard a fixed range of whole chunks) is kept so readers address rows as before. Stores of layout 1 (arrays
at the version's root, ``markers/``) are converted by ``migrate_layout`` (``reals migrate-store``).
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import posixpath
import re
import uuid
import warnings
from typing import NamedTuple

import numpy as np
import zarr
import zarr.codecs as zc

from storage import StorageError
from storage.fs import (check_name, child, filesystem, is_local_fs, join, list_files, remove, resolved,
                        storage_options, to_url, within)
from storage.lease import create_exclusive
from storage.markers import DamagedRecord, read_json, write_json

VERSIONS = "versions.json"
LEASE_FILE = "encode.lease.json"  # the lease every writer of a store root takes (encode, migrate-store)
SEGMENTS = "segments"
COMMITS = "commits"
MARKERS = "markers"  # layout 1 only
LAYOUT = 2
# Each row's posterior moments, normalised: the posterior mean and std of its latent (and of its mirror image's).
# Not the channel statistics (``latents_mean``/``latents_std`` in the version's attrs; in older stores' attrs
# ``mean``/``std``), which normalise them.
POSTERIOR_ARRAYS = ("mean", "std")
FLIPPED_POSTERIOR_ARRAYS = ("mean_flip", "std_flip")
_SLOT = re.compile(r"^\d{12}\.json$")


# What zarr's codecs raise for a chunk whose bytes cannot be decoded (storage errors are OSErrors and pass).
DECODE_ERRORS = (RuntimeError, ValueError, TypeError)


class CorruptChunk(StorageError):
    """A chunk of a latent store that cannot be decoded; names its shard, rows and array."""

    def __init__(self, message: str, shard: str, rows: tuple[int, int], array: str):
        super().__init__(message)
        self.shard, self.rows, self.array = shard, rows, array


class MissingRowsWarning(UserWarning):
    """A store is read while some of its rows are not encoded yet."""


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def zarr_store(url: str, read_only: bool = False):
    """A zarr store for a URL: LocalStore for local paths, FsspecStore for s3:// and memory://."""
    fs, path = filesystem(url)
    if is_local_fs(fs):
        return zarr.storage.LocalStore(path, read_only=read_only)
    return zarr.storage.FsspecStore.from_url(to_url(url), storage_options=storage_options(url) or None,
                                             read_only=read_only)


def rows_checksum(rows: dict[str, np.ndarray]) -> str:
    """sha256 over the named row arrays (sorted by name; strings as utf-8 lines)."""
    h = hashlib.sha256()
    for name in sorted(rows):
        a = rows[name]
        h.update(name.encode())
        if a.dtype.kind in "OTU":
            h.update("\n".join(str(s) for s in a.tolist()).encode())
        else:
            h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _float_codec():
    return zc.BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")


# ---------------------------------------------------------------------------------------------------
# The store
# ---------------------------------------------------------------------------------------------------

class ArraySpec(NamedTuple):
    """What one row array holds: its dtype, the shape of a row, the value of a padding row."""

    dtype: np.dtype
    row_shape: tuple[int, ...]
    fill: object


def array_specs(attrs: dict) -> dict[str, ArraySpec]:
    """The row arrays a version holds (from its attrs), in the order markers list them."""
    c, h, w = (int(x) for x in attrs["latent_shape"])
    f16 = np.dtype("float16")
    moments = POSTERIOR_ARRAYS + (FLIPPED_POSTERIOR_ARRAYS if attrs["flip"] else ())
    specs = {n: ArraySpec(f16, (c, h, w), 0.0) for n in moments}
    specs.update(labels=ArraySpec(np.dtype("int32"), (), -1), keys=ArraySpec(np.dtype(object), (), ""))
    if attrs.get("teacher_width") is None:  # encode --no-teacher: latents only
        return specs
    d = int(attrs["teacher_width"])
    specs["teacher_global"] = ArraySpec(f16, (d,), 0.0)
    if attrs.get("teacher_patch"):
        specs["teacher_patch"] = ArraySpec(f16, (d, *(int(x) for x in attrs["teacher_grid"])), 0.0)
    return specs


def commit_log(group_url: str) -> list[dict]:
    """The commit log of a version, in slot order (entries that are not JSON objects are skipped; one that does
    not parse is refused)."""
    fs, path = filesystem(join(group_url, COMMITS))
    fs.invalidate_cache(path)  # writers in other processes append
    if not fs.exists(path):
        return []
    paths = sorted(p for p in fs.ls(path, detail=False) if _SLOT.match(posixpath.basename(p)))
    blobs = fs.cat(paths, on_error="omit") if paths else {}
    out = []
    for p in paths:
        try:
            doc = json.loads(blobs[p]) if p in blobs else None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:  # a commit is created whole, never torn
            raise DamagedRecord(f"commit {p} of latent store {group_url} is damaged (not valid JSON): replace its "
                                "content with {} (an empty entry), and `reals encode` re-encodes the shards it "
                                "committed") from e
        if isinstance(doc, dict):
            out.append(doc)
    return out


def committed_shards(entries: list[dict]) -> dict[str, dict]:
    """Each shard's latest commit (its done-marker) among commit log ``entries``; takeovers are skipped."""
    out = {}
    for doc in entries:
        try:
            check_name(doc.get("shard"), "shard name")
            check_name(doc.get("segment"), "segment name")
        except StorageError:
            continue
        out[doc["shard"]] = doc
    return out


def _layout_error(group_url: str, root: str) -> StorageError:
    return StorageError(f"latent store version {group_url} has layout 1 (rows written in place, before commits): "
                        f"run `reals migrate-store {root}` once to convert it")


class LatentStore:
    """One version (Zarr group) of a latent store; open it with ``open``, ``create`` or ``open_for_vae``."""

    def __init__(self, group: zarr.Group, url: str, root_url: str):
        self.group = group
        self.url = url
        self.root_url = root_url
        self.version = posixpath.basename(url.rstrip("/"))
        self._committed: dict[str, dict] | None = None  # shard -> latest commit, as last read
        self._visible_cache: tuple[list, np.ndarray] | None = None
        self._arrays: dict[tuple[str, str], zarr.Array] = {}
        self._staged: dict[int, str] = {}  # row_start -> segment written by this writer, not committed yet
        self._next_slot: int | None = None

    # -- opening ----------------------------------------------------------------------------------

    @staticmethod
    def resolve(url: str, version: str | None = None) -> tuple[str, str]:
        """``(root_url, group_url)`` for a store root (newest or named version) or a version's own URL."""
        url = to_url(url).rstrip("/")
        if version is None and read_json(join(url, "zarr.json")) is not None:
            return posixpath.dirname(url), url
        index = read_json(join(url, VERSIONS))
        if index is None:
            raise StorageError(f"no latent store at {url}: run `reals encode` first")
        name = check_name(version or index["latest"], "version name")
        if name not in {v["name"] for v in index["versions"]}:
            names = ", ".join(v["name"] for v in index["versions"])
            raise StorageError(f"latent store {url} has no version {name!r} (has {names})")
        return url, join(url, name)

    @staticmethod
    def check_root(url: str) -> None:
        """Refuse a store root that is a version group itself, or that lies inside another store (symbolic links
        resolved: a link into a store version names a folder inside that store)."""
        url = resolved(url).rstrip("/")
        if read_json(join(url, "zarr.json")) is not None:
            parent = posixpath.dirname(url)
            raise StorageError(f"{url} is a Zarr group (a version of the latent store {parent}), not a store "
                               f"root: pass --output {parent}")
        scheme, sep, path = url.rpartition("://")
        head = scheme + sep if sep else "/"
        parts = path.strip("/").split("/")
        for n in range(len(parts) - 1, 0, -1):
            ancestor = head + "/".join(parts[:n])
            if read_json(join(ancestor, VERSIONS)) is not None or read_json(join(ancestor, "zarr.json")) is not None:
                raise StorageError(f"{url} lies inside the latent store {ancestor}: pass --output {ancestor} "
                                   "(each VAE gets its own version there) or a folder outside it")

    @classmethod
    def open(cls, url: str, version: str | None = None) -> "LatentStore":
        """Open a store for reading; warns when some rows are not encoded yet (only done rows are served)."""
        root, group_url = cls.resolve(url, version)
        store = cls(cls._read_group(group_url, root), group_url, root)
        markers = store.markers()
        missing = sum(e["count"] for e in store.shard_map if not store.marker_agrees(markers.get(e["name"]), e))
        if missing:
            warnings.warn(f"latent store {group_url}: {missing} of {store.num_samples} rows are not encoded "
                          f"yet; only done rows are readable", MissingRowsWarning, stacklevel=2)
        return store

    @staticmethod
    def _read_group(group_url: str, root: str) -> zarr.Group:
        try:
            group = zarr.open_group(zarr_store(group_url, read_only=True), mode="r", zarr_format=3)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as e:
            raise StorageError(f"no latent store group at {group_url}") from e
        if group.attrs.get("layout") != LAYOUT:
            raise _layout_error(group_url, root)
        return group

    def reopened(self) -> "LatentStore":
        """This version opened again for reading, with fresh storage clients (e.g. in a forked process)."""
        store = type(self)(self._read_group(self.url, self.root_url), self.url, self.root_url)
        store._committed = self._committed
        return store

    @staticmethod
    def has_version(url: str, fingerprint: str) -> bool:
        """Whether the store root ``url`` holds a version made by VAE ``fingerprint``."""
        return read_json(join(child(to_url(url).rstrip("/"), fingerprint, "version name"), "zarr.json")) is not None

    @classmethod
    def open_for_vae(cls, url: str, fingerprint: str, latent_shape) -> "LatentStore":
        """Open this VAE's version of a store (root or version URL) for writing; refuse another VAE's."""
        url = to_url(url).rstrip("/")
        if read_json(join(url, "zarr.json")) is None and cls.has_version(url, fingerprint):
            url = join(url, fingerprint)
        root, group_url = cls.resolve(url)
        group = zarr.open_group(zarr_store(group_url), mode="r+", zarr_format=3)
        store = cls(group, group_url, root)
        have_fp, have_shape = store.attrs.get("vae_fingerprint"), list(store.attrs.get("latent_shape", []))
        if have_fp != fingerprint:
            raise StorageError(f"latent store {group_url} was made by VAE {have_fp}, not by VAE {fingerprint}")
        if have_shape != list(latent_shape):
            raise StorageError(f"latent store {group_url} holds latents of shape {have_shape}, "
                               f"VAE {fingerprint} makes {list(latent_shape)}")
        if store.attrs.get("layout") != LAYOUT:
            raise _layout_error(group_url, root)
        return store

    @classmethod
    def create(cls, url: str, *, fingerprint: str, latent_shape, teacher_width: int | None, chunk_rows: int,
               provenance: dict, flip: bool = True, teacher_grid: tuple[int, int] | None = None) -> "LatentStore":
        """Create an empty version named by the VAE fingerprint under ``url`` and add it to versions.json;
        ``teacher_width`` None: latents only, no teacher arrays."""
        root = to_url(url).rstrip("/")
        group_url = child(root, fingerprint, "version name")
        if read_json(join(group_url, "zarr.json")) is not None:
            raise StorageError(f"latent store version {group_url} already exists")
        c, h, w = (int(x) for x in latent_shape)
        attrs = {**provenance, "vae_fingerprint": fingerprint, "latent_shape": [c, h, w], "chunk_rows": chunk_rows,
                 "flip": flip, "teacher_width": teacher_width, "teacher_patch": teacher_width is not None and teacher_grid is not None,
                 "teacher_grid": list(teacher_grid) if teacher_grid is not None else None,
                 "layout": LAYOUT, "shards": [], "created": utc_now()}
        group = zarr.open_group(zarr_store(group_url), mode="w", zarr_format=3, attributes=attrs)
        _add_layout_groups(group)
        _add_version(root, fingerprint, provenance)
        return cls(group, group_url, root)

    # -- metadata ---------------------------------------------------------------------------------

    @property
    def attrs(self) -> dict:
        return dict(self.group.attrs)

    @property
    def chunk_rows(self) -> int:
        return int(self.group.attrs["chunk_rows"])

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(self.group.attrs["latent_shape"])

    @property
    def has_flip(self) -> bool:
        return bool(self.group.attrs["flip"])

    @property
    def array_names(self) -> list[str]:
        """Names of the per-row arrays this version holds."""
        return list(array_specs(self.attrs))

    def spec(self, name: str) -> ArraySpec:
        """dtype, row shape and padding value of one row array."""
        return array_specs(self.attrs)[name]

    @property
    def has_teacher(self) -> bool:
        """Whether the version holds teacher features (``encode --no-teacher`` writes latents only)."""
        return self.group.attrs.get("teacher_width") is not None

    @property
    def num_rows(self) -> int:
        """Rows of the row map, padding included (a multiple of ``chunk_rows``)."""
        return max((e["row_start"] + e["capacity"] for e in self.shard_map), default=0)

    @property
    def shard_map(self) -> list[dict]:
        """Row map: ``{"name", "row_start", "capacity", "count"}`` per source shard, in row order."""
        return list(self.group.attrs.get("shards", []))

    @property
    def num_samples(self) -> int:
        """Rows the source shards should fill (manifest counts, padding excluded)."""
        return sum(s["count"] for s in self.shard_map)

    # -- growth (driver only) ---------------------------------------------------------------------

    def plan_shards(self, shards: list[tuple[str, int]], shard_size: int = 0) -> list[dict]:
        """Give every source shard ``(name, count)`` a fixed range of whole chunks; extend for new ones.

        A new shard's range holds ``max(count, shard_size)`` rows rounded up to whole chunks, so the
        last shard of a split can fill up later without moving any other shard's rows.
        """
        cr = self.chunk_rows
        entries = self.shard_map
        by_name = {e["name"]: e for e in entries}
        end = max((e["row_start"] + e["capacity"] for e in entries), default=0)
        for name, count in shards:
            if name in by_name:
                e = by_name[name]
                if count > e["capacity"]:
                    raise StorageError(f"source shard {name} grew to {count} samples but its rows in "
                                       f"{self.url} hold {e['capacity']}: encode into a new --output")
                e["count"] = count
                continue
            capacity = max(1, -(-max(count, shard_size) // cr)) * cr
            e = {"name": name, "row_start": end, "capacity": capacity, "count": count}
            entries.append(e)
            by_name[name] = e
            end += capacity
        if entries != self.shard_map:
            self.group.attrs["shards"] = entries
        return [by_name[name] for name, _ in shards]

    # -- writing: segments, then a commit ---------------------------------------------------------

    def write_rows(self, row_start: int, rows: dict[str, np.ndarray]) -> str:
        """Write one shard's rows (from its row map entry's ``row_start``) into a new segment; returns its name.

        Nothing reads the segment until ``commit`` names it.
        """
        entry = next((e for e in self.shard_map if e["row_start"] == row_start), None)
        if entry is None:
            raise StorageError(f"latent store {self.url}: no source shard starts at row {row_start}")
        stem = posixpath.splitext(check_name(entry["name"], "shard name"))[0]
        segment = f"{stem}-{uuid.uuid4().hex[:12]}"
        group = zarr.open_group(self.group.store, path=f"{SEGMENTS}/{segment}", mode="w", zarr_format=3)
        specs = array_specs(self.attrs)
        for name, values in rows.items():
            spec = specs[name]
            kind = {"dtype": str} if name == "keys" else {"dtype": spec.dtype, "fill_value": spec.fill}
            if spec.dtype == np.float16:
                kind["compressors"] = _float_codec()
            a = group.create_array(name, shape=(len(values), *spec.row_shape),
                                   chunks=(self.chunk_rows, *spec.row_shape), **kind)
            a[:] = values
        self._staged[row_start] = segment
        return segment

    def commit(self, marker: dict, fence=None) -> int:
        """Make a shard's rows visible: append its done-marker, naming its segment, to the commit log.

        ``marker`` names its ``segment``, or the one this object last wrote at its ``row_start``.
        ``fence()`` runs before each claim of a slot (it raises when the writer's lease is gone).
        Returns the slot.
        """
        check_name(marker.get("shard"), "shard name")
        segment = marker.get("segment") or self._staged.get(marker.get("row_start"))
        if segment is None:
            raise StorageError(f"latent store {self.url}: no rows written for shard {marker['shard']} to commit")
        slot = self._append({**marker, "segment": check_name(segment, "segment name")}, fence)
        self._staged.pop(marker.get("row_start"), None)
        return slot

    write_marker = commit  # the name writers of layout 1 used

    def takeover(self, owner: str) -> int:
        """Record that ``owner`` now writes this version: every commit still in flight from an earlier
        writer targets this slot or one before it, and fails."""
        return self._append({"takeover": owner}, None)

    def _append(self, doc: dict, fence) -> int:
        if self._next_slot is None:
            self._next_slot = len(commit_log_slots(self.url))
        slot = self._next_slot
        while True:
            if fence is not None:
                fence()
            entry = {**doc, "slot": slot, "committed": utc_now()}
            url = within(self.url, join(self.url, COMMITS, f"{slot:012d}.json"))
            if create_exclusive(url, (json.dumps(entry, indent=2, sort_keys=True) + "\n").encode()):
                self._next_slot = slot + 1
                return slot
            slot += 1  # taken: the next one, only after this one was seen taken

    # -- reading ----------------------------------------------------------------------------------

    def read_rows(self, start: int, stop: int, names=None) -> dict[str, np.ndarray]:
        """Arrays of rows ``[start, stop)`` (keys as an object array of str)."""
        out = {}
        for name in names or self.array_names:
            a = self.read(name, slice(start, stop))
            out[name] = a.astype(object) if name == "keys" else a
        return out

    def read(self, name: str, rows: slice | np.ndarray) -> np.ndarray:
        """Rows of one array (a slice or sorted row indices); rows without a commit read as padding.

        An undecodable chunk raises ``CorruptChunk``.
        """
        idx = (np.arange(*rows.indices(max(self.num_rows, rows.stop or 0))) if isinstance(rows, slice)
               else np.asarray(rows, dtype=np.int64))
        spec = self.spec(name)
        out = np.full((len(idx), *spec.row_shape), spec.fill, dtype=spec.dtype)
        entries, starts = self._visible()
        touched = np.unique(np.searchsorted(starts, idx, side="right") - 1) if len(starts) else []
        for k in touched:
            if k < 0:
                continue
            e, marker = entries[k]
            lo, hi = np.searchsorted(idx, [e["row_start"], e["row_start"] + e["capacity"]])
            try:
                array = self._segment_array(marker["segment"], name)
            except FileNotFoundError as err:  # zarr's ArrayNotFoundError too
                raise CorruptChunk(f"latent store {self.url}: shard {e['name']}: its committed segment "
                                   f"{marker['segment']} has no array {name}; `reals encode --verify` redoes the "
                                   "shard", shard=e["name"], rows=(e["row_start"], e["row_start"] + marker["count"]),
                                   array=name) from err
            local = idx[lo:hi] - e["row_start"]
            local = local[local < array.shape[0]]
            if not len(local):
                continue
            try:
                contiguous = local[-1] - local[0] + 1 == len(local)
                values = array[local[0]:local[-1] + 1] if contiguous else array.oindex[local]
            except DECODE_ERRORS as err:
                raise self._corrupt(e, marker["segment"], name, local, err) from err
            out[lo:lo + len(local)] = values
        return out

    def _visible(self) -> tuple[list[tuple[dict, dict]], np.ndarray]:
        """The row map entries with an agreeing commit, with that commit, and their ``row_start``s (cached
        until ``markers`` reads the log again)."""
        if self._visible_cache is None:
            committed = self._committed if self._committed is not None else self.markers()
            entries = sorted(((e, committed[e["name"]]) for e in self.shard_map
                              if self.marker_agrees(committed.get(e["name"]), e)), key=lambda x: x[0]["row_start"])
            self._visible_cache = entries, np.array([e["row_start"] for e, _ in entries], dtype=np.int64)
        return self._visible_cache

    def _segment_array(self, segment: str, name: str) -> zarr.Array:
        key = (segment, name)
        if key not in self._arrays:
            self._arrays[key] = zarr.open_array(self.group.store, path=f"{SEGMENTS}/{segment}/{name}", mode="r",
                                                zarr_format=3)
        return self._arrays[key]

    def _corrupt(self, entry: dict, segment: str, name: str, local: np.ndarray, error: Exception) -> CorruptChunk:
        """The first chunk of ``local`` rows that does not decode, named by its source shard, rows and array."""
        array, cr = self._segment_array(segment, name), self.chunk_rows
        start, stop = int(local.min()), int(local.max()) + 1
        for c in np.unique(local // cr):
            lo, hi = int(c) * cr, min(int(c + 1) * cr, array.shape[0])
            try:
                array[lo:hi]
            except DECODE_ERRORS as e:
                start, stop, error = lo, hi, e
                break
        r0, shard = entry["row_start"], entry["name"]
        return CorruptChunk(f"latent store {self.url}: shard {shard}, rows {r0 + start}..{r0 + stop - 1} of array "
                            f"{name} cannot be decoded ({type(error).__name__}: {error}); `reals encode --verify` "
                            "redoes the shard", shard=shard, rows=(r0 + start, r0 + stop), array=name)

    def markers(self) -> dict[str, dict]:
        """Every shard's committed done-marker (its latest commit), by source shard name; read afresh."""
        self._committed = committed_shards(commit_log(self.url))
        self._visible_cache = None
        return dict(self._committed)

    def marker_agrees(self, marker: dict | None, entry: dict, source_sha256: str | None = None) -> bool:
        """Whether a marker belongs to this version's row map entry (and to the same source shard bytes)."""
        if not marker:
            return False
        return (marker.get("vae_fingerprint") == self.group.attrs["vae_fingerprint"]
                and marker.get("row_start") == entry["row_start"]
                and 0 <= marker.get("count", -1) <= entry["capacity"]
                and marker.get("arrays") == self.array_names
                and (source_sha256 is None or marker.get("source_sha256") in (None, source_sha256)))

    def done_rows(self) -> np.ndarray:
        """Boolean mask over all rows: True where a valid marker covers the row (padding never is)."""
        mask = np.zeros(self.num_rows, dtype=bool)
        markers = self.markers()
        for e in self.shard_map:
            m = markers.get(e["name"])
            if self.marker_agrees(m, e):
                mask[e["row_start"]:e["row_start"] + m["count"]] = True
        return mask

    def stored_checksum(self, marker: dict) -> str:
        """Checksum of the rows a marker covers, as they are stored now."""
        start = marker["row_start"]
        return rows_checksum(self.read_rows(start, start + marker["count"]))


def commit_log_slots(group_url: str) -> list[str]:
    """The taken slots of a version's commit log (a prefix 0, 1, ...: each is claimed only after the one before)."""
    fs, path = filesystem(join(group_url, COMMITS))
    fs.invalidate_cache(path)
    if not fs.exists(path):
        return []
    return sorted(n for p in fs.ls(path, detail=False) if _SLOT.match(n := posixpath.basename(p)))


def _add_layout_groups(group: zarr.Group) -> None:
    """The two folders of a layout-2 version, as empty Zarr groups so plain zarr lists the hierarchy cleanly."""
    about = {SEGMENTS: "rows of source shards, one group per writer; read only those the commit log names",
             COMMITS: "commit log: <slot>.json, each shard's latest entry wins"}
    for name, description in about.items():
        if name not in group:
            group.create_group(name, attributes={"description": description})


def _add_version(root: str, name: str, provenance: dict) -> None:
    index = read_json(join(root, VERSIONS)) or {"versions": []}
    index["versions"] = [v for v in index["versions"] if v["name"] != name]
    index["versions"].append({"name": name, "created": utc_now(),
                              **{k: provenance[k] for k in ("vae_path", "teacher", "split") if k in provenance}})
    index["latest"] = name
    write_json(join(root, VERSIONS), index)


def set_latest(root: str, name: str) -> None:
    """Point versions.json's ``latest`` at an existing version (after an encode run completes)."""
    index = read_json(join(root, VERSIONS))
    if index is not None and index.get("latest") != name:
        index["latest"] = name
        write_json(join(root, VERSIONS), index)


# ---------------------------------------------------------------------------------------------------
# Layout 1 -> 2
# ---------------------------------------------------------------------------------------------------

def migrate_layout(url: str, owner: str = "migrate-store", fence=None) -> dict:
    """Convert every layout-1 version under a store root in place; ``{"versions", "shards", "left"}``.

    Each marked shard whose rows match its checksum is copied into a segment and committed; a shard whose
    rows do not is left for ``reals encode`` to redo. Then the old arrays and markers are removed and the
    version is marked layout 2. Interrupted, it resumes: shards already committed are not copied again.
    The caller holds the store's lease as ``owner``; ``fence()`` runs before each commit (see ``commit``).
    """
    root = to_url(url).rstrip("/")
    index = read_json(join(root, VERSIONS))
    if index is None:
        raise StorageError(f"no latent store at {root} (no {VERSIONS})")
    done = {"versions": [], "shards": 0, "left": []}
    for v in index["versions"]:
        group_url = child(root, v["name"], "version name")
        group = zarr.open_group(zarr_store(group_url), mode="r+", zarr_format=3)
        if group.attrs.get("layout") == LAYOUT:
            continue
        copied, left = _migrate_version(group, group_url, root, owner, fence)
        done["versions"].append(v["name"])
        done["shards"] += copied
        done["left"] += left
    return done


def _migrate_version(group: zarr.Group, group_url: str, root: str, owner: str, fence) -> tuple[int, list[str]]:
    attrs = dict(group.attrs)
    old_names = [n for n in (*POSTERIOR_ARRAYS, *FLIPPED_POSTERIOR_ARRAYS, "labels", "keys", "teacher_global",
                             "teacher_patch") if n in group.array_keys()]
    if attrs.get("teacher_patch") and not attrs.get("teacher_grid"):
        group.attrs["teacher_grid"] = list(group["teacher_patch"].shape[2:])
    _add_layout_groups(group)
    store = LatentStore(group, group_url, root)
    old_markers = {}
    for p in list_files(join(group_url, MARKERS), ".json"):
        m = read_json(p)
        if isinstance(m, dict) and "shard" in m:
            old_markers[m["shard"]] = m
    committed = store.markers()
    store.takeover(owner)
    copied, left = 0, []
    for e in store.shard_map:
        m = old_markers.get(e["name"])
        if store.marker_agrees(committed.get(e["name"]), e) or not store.marker_agrees(m, e):
            continue
        stop = e["row_start"] + m["count"]
        try:
            rows = {n: group[n][e["row_start"]:stop] for n in store.array_names}
        except DECODE_ERRORS:
            left.append(e["name"])
            continue
        rows["keys"] = rows["keys"].astype(object)
        if rows_checksum(rows) != m.get("checksum"):
            left.append(e["name"])
            continue
        store.write_rows(e["row_start"], rows)
        store.commit({k: v for k, v in m.items() if k != "segment"}, fence=fence)
        copied += 1
    for name in (*old_names, MARKERS):
        remove(join(group_url, name))
    group.attrs["layout"] = LAYOUT
    return copied, left
