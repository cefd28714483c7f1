"""Shards + ReaLS VAE dir -> Zarr latent store (``reals encode``), one Ray actor per worker, a source shard per unit.

The driver takes the store's lease, reads the manifest, opens (or creates) the version named by the
VAE's fingerprint, and gives every source shard a fixed range of whole row chunks (the row map, extended
for new shards before any worker writes). Each actor loads the VAE and the teacher named in the VAE dir's
provenance once, then for a shard: decodes its images, encodes them and their horizontal flips to
posterior moments (mean, std), normalises them with the channel statistics of ``mean_std.json``
(``z_norm = (z - latents_mean) / latents_std``, so the posterior std becomes ``std / latents_std``), adds the
teacher's global token (``--no-teacher``: latents only, no teacher loaded; the version's ``teacher_width`` is
null), writes the shard's rows into a
segment of its own, and commits them last (its done-marker, in the store's commit log, checked against the
lease; the driver records its takeover there first, so no commit of a run that lost the lease can land).
A unit that fails (an S3 error, say) is retried into a fresh segment. A re-run encodes only shards without
a valid commit; a different VAE gets a new version beside the old ones.

The store's bits do not depend on how encode ran (in process, 1 actor, N actors): a shard's batches are cut
the same way in every mode, and every worker computes on ``ENCODE_THREADS`` torch intra-op threads (a CPU
convolution's float rounding depends on how many threads split it; a Ray actor gets one, and the driver
would otherwise use all its cores). The store's provenance records that number as ``torch_threads``.
"""
from __future__ import annotations

import time
from importlib import metadata
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, Field

from pipelines import StageError
from pipelines.config import Cli, OptionalTeacher, Shards, ShowProgress, StageConfig, TeacherInputSize
from pipelines.devices import ray_uses_gpu, torch_device
from pipelines.encoding import TeacherSpec, batched, encode_images, load_models, source_shards, teacher_spec
from pipelines.parallel import ActorPool, pool_size, progress_bar
from pipelines.registry import Chain, Output, Stage
from pipelines.report_parts import Card, ReportPart, Save, table
from storage.fs import child, join, to_url
from storage.latent_store import (LEASE_FILE, CorruptChunk, LatentStore, commit_log, committed_shards,
                                  rows_checksum, set_latest, utc_now)
from storage.lease import Lease, LeaseLost, fence
from storage.markers import read_json
from storage.shards import iter_shard

ENCODE_THREADS = 1  # torch intra-op threads of every encode worker, in process or a Ray actor (num_cpus=1)


class EncodeConfig(StageConfig):
    """Settings of ``reals encode``."""

    shards: Shards = Field(description="shards URL (a folder with manifest.json, from `reals shard`)")
    vae_path: str = Field(description="converted ReaLS VAE directory (local)")
    output: str = Field(description="latent store URL; each VAE gets its own version inside it")
    split: str = Field("train", pattern=r"^[A-Za-z0-9_-]+$", description="dataset split to encode")
    workers: int | None = Field(None, ge=0, description="Ray actors, each holding a VAE and a teacher "
                                                        "(default: one per CPU, at most one per shard; "
                                                        "0: encode in this process, without Ray)")
    batch_size: int = Field(32, ge=1, description="images per VAE forward pass")
    flip: bool = Field(True, description="also store the posterior of the horizontally flipped image")
    teacher_features: Annotated[bool, Cli(negative="--no-teacher")] = Field(
        True, description="store the teacher's global token (--no-teacher: latents only, no teacher is loaded, so a "
                          "VAE dir that names none needs no --dino-model)")
    teacher_patch: bool = Field(False, description="also store the teacher's patch tokens (large)")
    teacher: OptionalTeacher = Field(None, description="teacher name (default: the one in the VAE's provenance)")
    teacher_input_size: TeacherInputSize = Field(None, ge=1, description="teacher input size (default: from the provenance)")
    chunk_rows: int | None = Field(None, ge=1, description="rows per Zarr chunk for a new version "
                                                           "(default: min(256, shard size))")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where the actors run the models")
    verify: bool = Field(False, description="re-check the checksums of shards already marked done "
                                            "and re-encode those whose rows disagree")
    retries: int = Field(3, ge=1, description="attempts per shard before it is reported as failed")
    allow_resolution_mismatch: bool = Field(False, description="encode shards whose resolution differs from the "
                                                               "one the VAE was trained at")
    lease_wait: float = Field(0.0, ge=0, description="seconds to wait for another run's lease on the store")
    lease_ttl: float = Field(120.0, gt=0, description="lease lifetime in seconds; renewed every third of it")
    show_progress: ShowProgress = Field(True, description="show a progress bar")


class EncodeSummary(BaseModel):
    """What ``reals encode`` did."""

    store: str
    version: str
    vae_fingerprint: str
    split: str
    shards: int
    shards_encoded: int
    shards_skipped: int
    shards_redone: int
    rows_encoded: int
    rows_done: int
    rows_total: int
    samples_skipped: int
    skipped: list[str]


# ---------------------------------------------------------------------------------------------------
# One unit of work: one source shard (runs in a Ray actor)
# ---------------------------------------------------------------------------------------------------

class EncodeWorker:
    """Holds a VAE and a teacher; encodes whole source shards into their rows of the store."""

    def __init__(self, vae_path: str, teacher: TeacherSpec | None, device: str, batch_size: int, retries: int = 3,
                 retry_delay: float = 1.0):
        import torch

        torch.set_num_threads(ENCODE_THREADS)
        self.vae, self.teacher = load_models(vae_path, teacher, device)
        self.batch_size = batch_size
        self.retries = retries
        self.retry_delay = retry_delay
        self._stores: dict[str, LatentStore] = {}

    def describe(self) -> dict | None:
        """The teacher as the store's provenance records it (None without one)."""
        return self.teacher.describe() if self.teacher is not None else None

    @staticmethod
    def torch_threads() -> int:
        """The torch intra-op threads this worker computes on."""
        import torch

        return torch.get_num_threads()

    def _store(self, unit: dict) -> LatentStore:
        url = unit["group_url"]
        if url not in self._stores:
            self._stores[url] = LatentStore.open_for_vae(url, unit["vae_fingerprint"], unit["latent_shape"])
        return self._stores[url]

    def encode_shard(self, unit: dict) -> dict:
        """Encode (or, with ``verify``, check and keep) one source shard; retried on any error but a lost lease."""
        error = None
        for attempt in range(1, self.retries + 1):
            try:
                return {**self._encode_shard(unit), "attempts": attempt}
            except LeaseLost as e:
                return {"shard": unit["name"], "status": "failed", "error": str(e), "attempts": attempt}
            except Exception as e:  # noqa: BLE001 - retried, then reported per shard by the driver
                error = f"{type(e).__name__}: {e}"
                self._stores.pop(unit["group_url"], None)
                if attempt < self.retries:
                    time.sleep(self.retry_delay * attempt)
        return {"shard": unit["name"], "status": "failed", "error": error, "attempts": self.retries}

    def _encode_shard(self, unit: dict) -> dict:
        store = self._store(unit)
        status = "encoded"
        if unit.get("marker"):
            if self._intact(store, unit["marker"]):
                return {"shard": unit["name"], "status": "skipped", "count": 0, "skipped": []}
            status = "redone"
        names = store.array_names
        skipped: list = []
        parts: dict[str, list] = {n: [] for n in names}
        for batch in batched(iter_shard(unit["url"], skipped=skipped), self.batch_size):
            rows = encode_images(self.vae, self.teacher, np.stack([s["image"] for s in batch]),
                                 "mean_flip" in names, "teacher_patch" in names)
            rows["labels"] = np.array([s["cls"] for s in batch], dtype=np.int32)
            rows["keys"] = np.array([s["__key__"] for s in batch], dtype=object)
            for n in names:
                parts[n].append(rows[n])
        count = sum(len(p) for p in parts["labels"])
        if count > unit["capacity"]:
            raise StageError(f"source shard {unit['name']} has {count} samples, more than its "
                             f"{unit['capacity']} rows in the store")
        rows = {n: self._padded(store, n, parts[n], unit["capacity"]) for n in names}
        checksum = rows_checksum({n: a[:count] for n, a in rows.items()})
        self._fence(unit)
        segment = store.write_rows(unit["row_start"], rows)
        store.commit({
            "shard": unit["name"], "row_start": unit["row_start"], "count": count, "capacity": unit["capacity"],
            "source_sha256": unit["source_sha256"], "vae_fingerprint": store.attrs["vae_fingerprint"],
            "arrays": names, "checksum": checksum, "skipped": [list(s) for s in skipped], "created": utc_now(),
            "segment": segment, "writer": unit.get("lease_owner"),
        }, fence=lambda: self._fence(unit))
        return {"shard": unit["name"], "status": status, "count": count,
                "skipped": [f"{unit['name']}/{k}: {r}" for k, r in skipped]}

    @staticmethod
    def _intact(store: LatentStore, marker: dict) -> bool:
        """Whether a marked shard's rows still decode and match the marker's checksum."""
        try:
            return store.stored_checksum(marker) == marker["checksum"]
        except CorruptChunk:
            return False

    @staticmethod
    def _fence(unit: dict) -> None:
        """Write only while the driver's lease on the store holds (see ``storage.lease.fence``)."""
        if unit.get("lease_url"):
            fence(unit["lease_url"], unit["lease_owner"], unit["lease_margin"])

    @staticmethod
    def _padded(store: LatentStore, name: str, parts: list, capacity: int) -> np.ndarray:
        """The shard's rows of one array, padded to its whole chunks with the array's fill value."""
        spec = store.spec(name)
        if name == "keys":
            data = np.concatenate(parts) if parts else np.zeros(0, dtype=object)
            return np.concatenate([data, np.full(capacity - len(data), "", dtype=object)])
        out = np.full((capacity, *spec.row_shape), spec.fill, dtype=spec.dtype)
        if parts:
            data = np.concatenate(parts)
            out[:len(data)] = data
        return out


# ---------------------------------------------------------------------------------------------------
# Stage
# ---------------------------------------------------------------------------------------------------

def _code_version() -> str:
    try:
        return metadata.version("reals-pipeline")
    except metadata.PackageNotFoundError:
        return "unknown"


def _check_store_fits(store: LatentStore, manifest: dict, config: EncodeConfig) -> None:
    """Refuse to add to a version made from another split, class list or array layout."""
    a = store.attrs
    wanted = {"split": config.split, "classes": manifest["classes"], "flip": config.flip,
              "teacher_features": config.teacher_features, "teacher_patch": config.teacher_patch}
    have = {**a, "teacher_features": store.has_teacher}
    for key, value in wanted.items():
        if have.get(key) != value:
            raise StageError(f"latent store {store.url} has {key}={have.get(key)!r}, this run wants {value!r}; "
                             "use the same settings or another --output")


def _pending_units(store: LatentStore | None, shards: list[dict], shard_size: int, verify: bool) -> list[dict]:
    """Units for the shards without a valid marker (with ``verify``, the marked ones too, to re-check)."""
    if store is None:
        return [{"name": s["name"], "url": s["url"], "source_sha256": s["sha256"], "marker": None} for s in shards]
    entries = store.plan_shards([(s["name"], s["count"]) for s in shards], shard_size)
    markers = store.markers()
    units = []
    for s, entry in zip(shards, entries):
        marker = markers.get(s["name"])
        valid = store.marker_agrees(marker, entry, s["sha256"])
        if verify or not valid:
            units.append({"name": s["name"], "url": s["url"], "source_sha256": s["sha256"],
                          "marker": marker if valid else None})
    return units


class _Pool:
    """The encode workers of one run: Ray actors, or a single in-process worker when ``workers=0``."""

    def __init__(self, config: EncodeConfig, teacher: TeacherSpec | None, n_units: int):
        self.config = config
        self.actors: ActorPool | None = None
        self.local: EncodeWorker | None = None
        if config.workers == 0:
            import torch

            self.driver_threads = torch.get_num_threads()  # given back on close
            device = str(torch_device(config.device))
            self.local = EncodeWorker(to_url(config.vae_path), teacher, device, config.batch_size, config.retries)
            return
        count = pool_size(config.workers, n_units)
        gpu = ray_uses_gpu(config.device)
        args = (to_url(config.vae_path), teacher, "cuda" if gpu else "cpu", config.batch_size, config.retries)
        self.actors = ActorPool(EncodeWorker, args, count, gpu)

    def describe(self) -> dict | None:
        return self.local.describe() if self.local else self.actors.call("describe")

    def torch_threads(self) -> int:
        return self.local.torch_threads() if self.local else self.actors.call("torch_threads")

    def encode(self, units: list[dict], check=lambda: None) -> list[dict]:
        """Every unit's result, in unit order, with a progress bar; ``check()`` runs before each local unit."""
        description = f"encode {self.config.split}"
        if self.actors:
            return self.actors.map("encode_shard", units, description, show_progress=self.config.show_progress)
        results = []
        with progress_bar(disable=not self.config.show_progress) as bar:
            task = bar.add_task(description, total=len(units))
            for unit in units:
                check()
                results.append(self.local.encode_shard(unit))
                bar.advance(task)
        return results

    def close(self) -> None:
        if self.local:
            import torch

            torch.set_num_threads(self.driver_threads)
        if self.actors:
            self.actors.close()


def run(config: EncodeConfig) -> EncodeSummary:
    """Encode every source shard of the split that the store lacks; markers last; incremental."""
    from reals.vae import ReaLSVAE

    output = to_url(config.output).rstrip("/")
    LatentStore.check_root(output)
    manifest, shards = source_shards(config.shards, config.split)
    vae = ReaLSVAE.from_pretrained(config.vae_path)
    fp, f = vae.fingerprint, vae.downsample_factor
    if vae.resolution != manifest["resolution"] and not config.allow_resolution_mismatch:
        raise StageError(f"VAE {config.vae_path} was trained at {vae.resolution} px, the shards of {config.shards} "
                         f"are {manifest['resolution']} px: its latents would come from images of a size it never saw, "
                         "and the store's latent grid would not be the one its SiT and sampler use; re-shard at "
                         f"{vae.resolution} px, or pass --allow-resolution-mismatch")
    latent_shape = (vae.latent_channels, manifest["resolution"] // f, manifest["resolution"] // f)
    teacher = _teacher(config, vae.provenance)
    shard_size = int(manifest["splits"][config.split].get("shard_size") or max(s["count"] for s in shards))
    plan = [(s["name"], s["count"]) for s in shards]
    pool = None

    def stop_writers():
        if pool is not None:
            pool.close()

    lease = Lease(join(output, LEASE_FILE), ttl=config.lease_ttl)
    with lease.hold(wait=config.lease_wait, on_lost=stop_writers):
        try:
            store = None
            if LatentStore.has_version(output, fp):
                store = LatentStore.open_for_vae(output, fp, latent_shape)
                _check_store_fits(store, manifest, config)
            units = _pending_units(store, shards, shard_size, config.verify)
            if units:
                pool = _Pool(config, teacher, len(units))
            lease.check()
            if store is None:
                info = pool.describe()
                store = LatentStore.create(
                    output, fingerprint=fp, latent_shape=latent_shape, teacher_width=info and info["width"],
                    chunk_rows=config.chunk_rows or min(256, shard_size), flip=config.flip,
                    teacher_grid=tuple(info["grid"]) if config.teacher_patch else None,
                    provenance={**_provenance(config, vae, manifest, info, latent_shape),
                                "torch_threads": pool.torch_threads()})
            rows = {e["name"]: e for e in store.plan_shards(plan, shard_size)}
            if units:
                store.takeover(lease.owner)  # fails every commit still in flight from an earlier holder
            for u in units:
                u.update(group_url=store.url, vae_fingerprint=fp, latent_shape=list(latent_shape),
                         row_start=rows[u["name"]]["row_start"], capacity=rows[u["name"]]["capacity"],
                         lease_url=lease.url, lease_owner=lease.owner, lease_margin=lease.margin)
            skipped_now = len(shards) - len(units)
            if skipped_now:
                print(f"skipping {skipped_now} of {len(shards)} shards already encoded in {store.url}")
            results = pool.encode(units, lease.check) if units else []
            lease.check()
            store.group.attrs.update({"source_shards": [n for n, _ in plan],
                                      "source_fingerprint": manifest.get("fingerprint"), "updated": utc_now()})
            set_latest(output, fp)
        except Exception:
            lease.check()  # a lost lease is the cause of whatever failed after it
            raise
        finally:
            if pool is not None:
                pool.close()
    failed = [r for r in results if r["status"] == "failed"]
    if failed:
        raise StageError(f"{len(failed)} of {len(units)} shards failed after {config.retries} attempts (first: "
                         f"{failed[0]['shard']}: {failed[0]['error']}); re-run to retry them")
    statuses = [r["status"] for r in results]
    done = store.done_rows()
    return EncodeSummary(
        store=output, version=store.version, vae_fingerprint=fp, split=config.split, shards=len(shards),
        shards_encoded=statuses.count("encoded"), shards_skipped=skipped_now + statuses.count("skipped"),
        shards_redone=statuses.count("redone"), rows_encoded=sum(r["count"] for r in results),
        rows_done=int(done.sum()), rows_total=store.num_samples,
        samples_skipped=sum(len(r["skipped"]) for r in results), skipped=[x for r in results for x in r["skipped"]],
    )


def _teacher(config: EncodeConfig, provenance: dict) -> TeacherSpec | None:
    """The teacher whose features the store gets, or None with ``--no-teacher``."""
    if config.teacher_features:
        try:
            return teacher_spec(provenance, config.teacher, config.teacher_input_size)
        except StageError as e:
            raise StageError(f"{e}, or --no-teacher to store latents only") from None
    for flag, value in (("--dino-model", config.teacher), ("--dino-input-size", config.teacher_input_size),
                        ("--teacher-patch", config.teacher_patch)):
        if value:
            raise StageError(f"{flag} is for teacher features, and --no-teacher stores none: drop one of them")
    return None


def _provenance(config: EncodeConfig, vae, manifest: dict, teacher: dict | None, latent_shape) -> dict:
    return {
        "vae_path": to_url(config.vae_path), "vae_provenance": vae.provenance, "teacher": teacher,
        "latents_mean": vae.latents_mean.tolist(), "latents_std": vae.latents_std.tolist(),
        "normalisation": "z_norm = (z - latents_mean) / latents_std",
        "resolution": manifest["resolution"], "vae_resolution": vae.resolution, "latent_shape": list(latent_shape),
        "num_classes": len(manifest["classes"]), "classes": manifest["classes"], "split": config.split,
        "source_url": to_url(config.shards), "source_fingerprint": manifest.get("fingerprint"),
        "code_version": _code_version(),
    }


def _vae_fingerprint(config: EncodeConfig) -> str | None:
    return (read_json(join(to_url(config.vae_path), "provenance.json")) or {}).get("fingerprint")


def _store_version(config: EncodeConfig):
    """The store version of this config's VAE (None when the VAE or the version is not there yet)."""
    import warnings

    from storage.latent_store import MissingRowsWarning

    fp = _vae_fingerprint(config)
    if not fp or not LatentStore.has_version(config.output, fp):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MissingRowsWarning)
        return LatentStore.open(config.output, version=fp)


def missing_outputs(config: EncodeConfig) -> str | None:
    """The first source shard without an agreeing marker in this VAE's store version, or None."""
    store = _store_version(config)
    if store is None:
        return "no store version for this VAE"
    _, shards = source_shards(config.shards, config.split)
    entries = {e["name"]: e for e in store.shard_map}
    markers = store.markers()
    for s in shards:
        e = entries.get(s["name"])
        if e is None or not store.marker_agrees(markers.get(s["name"]), e, s["sha256"]):
            return f"shard {s['name']} not encoded"
    return None


def progress(config: EncodeConfig):
    """A function giving the fraction of source shards marked done in this VAE's store version (None: no VAE yet)."""
    fp = _vae_fingerprint(config)
    if not fp:
        return None
    total = max(1, len(source_shards(config.shards, config.split)[1]))
    version = child(to_url(config.output), fp, "version name")
    return lambda: len(committed_shards(commit_log(version))) / total


def show(summary: EncodeSummary, shown: int = 10) -> None:
    """One table of the run, then the first skipped samples."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"reals encode: {summary.split} -> {summary.store} (version {summary.version})")
    for col in ("shards", "encoded", "skipped", "redone", "rows encoded", "rows done", "rows total", "bad samples"):
        table.add_column(col, justify="right")
    table.add_row(*map(str, (summary.shards, summary.shards_encoded, summary.shards_skipped, summary.shards_redone,
                             summary.rows_encoded, summary.rows_done, summary.rows_total, summary.samples_skipped)))
    console = Console()
    console.print(table)
    for s in summary.skipped[:shown]:
        console.print(f"skipped sample {s}", markup=False, highlight=False)


def cards(summary: EncodeSummary) -> list[Card]:
    """Rows of the latent store version: done and total."""
    return [table(f"encode-{summary.split}-store", [{
        "store": summary.store, "version (VAE fingerprint)": summary.version, "shards": summary.shards,
        "encoded": summary.shards_encoded, "already done": summary.shards_skipped, "redone": summary.shards_redone,
        "rows encoded now": summary.rows_encoded, "rows done": summary.rows_done, "rows total": summary.rows_total,
        "undecodable samples": summary.samples_skipped,
    }], "latent store rows done")]


def report(config: EncodeConfig, save: Save) -> ReportPart | None:
    """The store's rows done and its latent shape."""
    try:
        s = LatentStore.open(config.output)
    except Exception:  # noqa: BLE001 - a missing or half-written store is left out of the report
        return None
    done = int(s.done_rows().sum())
    return ReportPart(["## Latent store", "", f"`{s.url}`: {done} of {s.num_samples} rows encoded, latents "
                       f"{'x'.join(map(str, s.latent_shape))}, horizontal flips "
                       f"{'stored' if s.has_flip else 'not stored'}.", ""])


STAGES = [Stage("encode", EncodeConfig, EncodeSummary, run, runs_on="ray", missing=missing_outputs, progress=progress,
                show=show, cards=cards, report=report, reads={"shards": "shards/{split}", "vae_path": "vae_dir"},
                writes={"output": Output("store", "latents")}, chain=Chain("encode", "latent store"),
                help="encode shards into a Zarr latent store with a ReaLS VAE", description=__doc__.splitlines()[0])]
