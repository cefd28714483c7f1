"""The Zarr v3 latent store: normalised posteriors per image, one group per (dataset, VAE fingerprint).

Layout under an output URL::

    versions.json                  index of versions, newest last ("latest" names it)
    <vae_fingerprint>/             Zarr v3 group; attrs hold provenance and the row map
        mean, std                  normalised posterior mean / std, float16 [N, C, h, w]
        mean_flip, std_flip        the same for the horizontally flipped image (optional)
        labels (int32 [N]), keys (vlen utf-8 [N]), teacher_global (float16 [N, D])
        teacher_patch              float16 [N, D, gh, gw] (optional)
        markers/<shard>.json       done-marker of one source shard, written after its rows (an empty
                                   zarr group holds them, so plain zarr lists the hierarchy cleanly)

Each source shard owns a fixed range of whole row chunks (its row map entry), so every writer owns
whole chunks and padding rows are never marked done. Only the driver creates, resizes or edits attrs.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import posixpath
import warnings

import numpy as np
import zarr
import zarr.codecs as zc

from storage import StorageError
from storage.fs import check_name, child, filesystem, is_local_fs, join, resolved, storage_options, to_url, within
from storage.markers import DamagedRecord, read_json, write_json

VERSIONS = "versions.json"
MARKERS = "markers"
LATENT_ARRAYS = ("mean", "std")
FLIP_ARRAYS = ("mean_flip", "std_flip")


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

class LatentStore:
    """One version (Zarr group) of a latent store; open it with ``open``, ``create`` or ``open_for_vae``."""

    def __init__(self, group: zarr.Group, url: str, root_url: str):
        self.group = group
        self.url = url
        self.root_url = root_url
        self.version = posixpath.basename(url.rstrip("/"))

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
        store = cls(cls._read_group(group_url), group_url, root)
        markers = store.markers()
        missing = sum(e["count"] for e in store.shard_map if not store.marker_agrees(markers.get(e["name"]), e))
        if missing:
            warnings.warn(f"latent store {group_url}: {missing} of {store.num_samples} rows are not encoded "
                          f"yet; only done rows are readable", MissingRowsWarning, stacklevel=2)
        return store

    @staticmethod
    def _read_group(group_url: str) -> zarr.Group:
        try:
            return zarr.open_group(zarr_store(group_url, read_only=True), mode="r", zarr_format=3)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as e:
            raise StorageError(f"no latent store group at {group_url}") from e

    def reopened(self) -> "LatentStore":
        """This version opened again for reading, with fresh storage clients (e.g. in a forked process)."""
        return type(self)(self._read_group(self.url), self.url, self.root_url)

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
        return store

    @classmethod
    def create(cls, url: str, *, fingerprint: str, latent_shape, teacher_width: int, chunk_rows: int,
               provenance: dict, flip: bool = True, teacher_grid: tuple[int, int] | None = None) -> "LatentStore":
        """Create an empty version named by the VAE fingerprint under ``url`` and add it to versions.json."""
        root = to_url(url).rstrip("/")
        group_url = child(root, fingerprint, "version name")
        if read_json(join(group_url, "zarr.json")) is not None:
            raise StorageError(f"latent store version {group_url} already exists")
        c, h, w = (int(x) for x in latent_shape)
        attrs = {**provenance, "vae_fingerprint": fingerprint, "latent_shape": [c, h, w], "chunk_rows": chunk_rows,
                 "flip": flip, "teacher_width": teacher_width, "teacher_patch": teacher_grid is not None,
                 "shards": [], "created": utc_now()}
        group = zarr.open_group(zarr_store(group_url), mode="w", zarr_format=3, attributes=attrs)
        group.create_group(MARKERS, attributes={"description": "done-marker JSON of each source shard"})
        names = LATENT_ARRAYS + (FLIP_ARRAYS if flip else ())
        for name in names:
            group.create_array(name, shape=(0, c, h, w), chunks=(chunk_rows, c, h, w), dtype="float16",
                               compressors=_float_codec(), fill_value=0.0)
        group.create_array("labels", shape=(0,), chunks=(chunk_rows,), dtype="int32", fill_value=-1)
        group.create_array("keys", shape=(0,), chunks=(chunk_rows,), dtype=str)
        group.create_array("teacher_global", shape=(0, teacher_width), chunks=(chunk_rows, teacher_width),
                           dtype="float16", compressors=_float_codec(), fill_value=0.0)
        if teacher_grid is not None:
            gh, gw = teacher_grid
            group.create_array("teacher_patch", shape=(0, teacher_width, gh, gw),
                               chunks=(chunk_rows, teacher_width, gh, gw), dtype="float16",
                               compressors=_float_codec(), fill_value=0.0)
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
        names = list(LATENT_ARRAYS) + (list(FLIP_ARRAYS) if self.has_flip else []) + ["labels", "keys",
                                                                                      "teacher_global"]
        return names + (["teacher_patch"] if self.group.attrs.get("teacher_patch") else [])

    @property
    def num_rows(self) -> int:
        """Rows of the arrays, padding included (a multiple of ``chunk_rows``)."""
        return int(self.group["labels"].shape[0])

    @property
    def shard_map(self) -> list[dict]:
        """Row map: ``{"name", "row_start", "capacity", "count"}`` per source shard, in row order."""
        return list(self.group.attrs.get("shards", []))

    @property
    def num_samples(self) -> int:
        """Rows the source shards should fill (manifest counts, padding excluded)."""
        return sum(s["count"] for s in self.shard_map)

    def array(self, name: str) -> zarr.Array:
        return self.group[name]

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
        self.group.attrs["shards"] = entries
        if end > self.num_rows:
            self.extend(end)
        return [by_name[name] for name, _ in shards]

    def extend(self, n_rows: int) -> None:
        """Resize every row array to ``n_rows`` (a multiple of ``chunk_rows``); never while workers write."""
        if n_rows % self.chunk_rows or n_rows < self.num_rows:
            raise StorageError(f"cannot resize {self.url} from {self.num_rows} to {n_rows} rows")
        for name in self.array_names:
            a = self.group[name]
            a.resize((n_rows,) + a.shape[1:])

    # -- rows and markers -------------------------------------------------------------------------

    def write_rows(self, row_start: int, rows: dict[str, np.ndarray]) -> None:
        """Write whole chunks starting at ``row_start`` (the caller pads to its shard's capacity)."""
        for name, values in rows.items():
            self.group[name][row_start:row_start + len(values)] = values

    def read_rows(self, start: int, stop: int, names=None) -> dict[str, np.ndarray]:
        """Arrays of rows ``[start, stop)`` (keys as an object array of str)."""
        out = {}
        for name in names or self.array_names:
            a = self.read(name, slice(start, stop))
            out[name] = a.astype(object) if name == "keys" else a
        return out

    def read(self, name: str, rows: slice | np.ndarray) -> np.ndarray:
        """Rows of one array (a slice or sorted row indices); an undecodable chunk raises ``CorruptChunk``."""
        a = self.group[name]
        try:
            return a[rows] if isinstance(rows, slice) else a.oindex[rows]
        except DECODE_ERRORS as e:
            raise self._corrupt(name, rows, e) from e

    def _corrupt(self, name: str, rows: slice | np.ndarray, error: Exception) -> CorruptChunk:
        """The first chunk of ``rows`` that does not decode, named by its source shard, rows and array."""
        idx = np.arange(self.num_rows)[rows] if isinstance(rows, slice) else np.asarray(rows)
        start, stop = int(idx.min()), int(idx.max()) + 1
        for c in np.unique(idx // self.chunk_rows):
            lo, hi = int(c) * self.chunk_rows, min(int(c + 1) * self.chunk_rows, self.num_rows)
            try:
                self.group[name][lo:hi]
            except DECODE_ERRORS as e:
                start, stop, error = lo, hi, e
                break
        shard = next((x["name"] for x in self.shard_map if x["row_start"] <= start < x["row_start"] + x["capacity"]),
                     "(no shard)")
        return CorruptChunk(f"latent store {self.url}: shard {shard}, rows {start}..{stop - 1} of array {name} "
                            f"cannot be decoded ({type(error).__name__}: {error}); `reals encode --verify` redoes "
                            "the shard", shard=shard, rows=(start, stop), array=name)

    def marker_url(self, shard_name: str) -> str:
        name = check_name(shard_name, "shard name")
        return join(self.url, MARKERS, posixpath.splitext(name)[0] + ".json")

    def write_marker(self, marker: dict) -> None:
        write_json(within(self.url, self.marker_url(marker["shard"])), marker)

    def markers(self) -> dict[str, dict]:
        """Every done-marker of this version, by source shard name (fetched concurrently)."""
        fs, path = filesystem(join(self.url, MARKERS))
        fs.invalidate_cache(path)  # workers in other processes add markers
        if not fs.exists(path):
            return {}
        paths = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".json"))
        blobs = fs.cat(paths, on_error="omit") if paths else {}
        out = {}
        for p, blob in blobs.items():
            try:
                m = json.loads(blob)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DamagedRecord(f"done-marker {p} of latent store {self.url} is damaged (not valid JSON): "
                                    "delete it, and the next `reals encode` re-encodes its shard") from e
            if isinstance(m, dict) and "shard" in m:
                out[m["shard"]] = m
        return out

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
