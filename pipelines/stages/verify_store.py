"""Check a latent store against its sources (``reals verify-store``): provenance, checksums, re-encoded rows.

Three checks, each reported: the store's provenance matches the VAE dir (fingerprint, latent statistics,
latent shape, teacher); every committed done-marker's checksum matches the rows of the segment it names
(a segment that is gone or does not decode is reported by shard and rows); and a seeded random
sample of done rows, re-encoded from the source shards, matches the stored values within float16
tolerance (labels and keys exactly). Prints a verdict; the exit code is 1 when any check fails.
"""
from __future__ import annotations

import numpy as np
from typing import Annotated

from pydantic import BaseModel, Field

from pipelines import StageError
from pipelines.config import Cli, Shards, StageConfig
from pipelines.encoding import TeacherSpec, batched, encode_images, load_models, source_shards, teacher_spec
from pipelines.registry import Stage
from reals.vae import CHANNEL_STATISTICS, read_channel_statistics
from storage.latent_store import CorruptChunk, LatentStore
from storage.shards import iter_shard


class VerifyStoreConfig(StageConfig):
    """Settings of ``reals verify-store``."""

    store: Annotated[str, Cli(positional=True)] = Field(description="latent store URL (its newest version, or a version's own URL)")
    shards: Shards = Field(description="URL of the shards the store was encoded from")
    vae_path: str = Field(description="ReaLS VAE directory the store should have been encoded with")
    num_samples: int = Field(16, ge=0, description="random done rows to re-encode and compare")
    seed: int = Field(0, description="seed of the row sample")
    version: str | None = Field(None, description="version (VAE fingerprint) to check; default the newest")
    atol: float = Field(2e-2, gt=0, description="absolute tolerance of the re-encoded comparison")
    rtol: float = Field(1e-2, ge=0, description="relative tolerance of the re-encoded comparison")


class VerifyStoreSummary(BaseModel):
    """The verdict of ``reals verify-store`` and what it found."""

    store: str
    version: str
    ok: bool
    markers_checked: int
    rows_compared: int
    problems: list[str]


def check_provenance(store: LatentStore, vae, resolution: int) -> list[str]:
    """Differences between the store's provenance and the VAE dir."""
    a = store.attrs
    problems = []
    if a.get("vae_fingerprint") != vae.fingerprint:
        problems.append(f"store was made by VAE {a.get('vae_fingerprint')}, the VAE dir is {vae.fingerprint}")
    for key, stored, value in zip(CHANNEL_STATISTICS, read_channel_statistics(a),
                                  (vae.latents_mean, vae.latents_std)):
        if not np.allclose(stored, value.tolist(), rtol=1e-6, atol=1e-7):
            problems.append(f"{key} {stored} differs from the VAE dir's {value.tolist()}")
    f = vae.downsample_factor
    shape = [vae.latent_channels, resolution // f, resolution // f]
    if list(a.get("latent_shape", [])) != shape:
        problems.append(f"latent shape {a.get('latent_shape')} differs from the VAE's {shape}")
    stored = a.get("teacher") or {}
    if not store.has_teacher:
        return problems  # encoded with --no-teacher: latents only
    try:
        name, size, layer = teacher_spec(vae.provenance)
    except StageError:
        return problems  # the VAE names no teacher: the store's (from --dino-model) cannot be checked
    if (stored.get("name") != name or (size and stored.get("input_size") != size)
            or (layer and stored.get("layer") != layer)):
        problems.append(f"teacher {stored.get('name')} at {stored.get('input_size')}px (layer {stored.get('layer')}) "
                        f"differs from the VAE's {name} at {size}px (layer {layer})")
    return problems


def check_markers(store: LatentStore) -> tuple[int, list[str]]:
    """``(markers checked, problems)``: every marker's checksum against the rows stored now."""
    markers = store.markers()
    problems = []
    entries = {e["name"]: e for e in store.shard_map}
    for name, marker in sorted(markers.items()):
        entry = entries.get(name)
        if entry is None or not store.marker_agrees(marker, entry):
            problems.append(f"marker {name} does not fit the store's row map")
            continue
        try:
            checksum = store.stored_checksum(marker)
        except CorruptChunk as e:
            problems.append(_corrupt_line(e))
            continue
        if checksum != marker.get("checksum"):
            problems.append(f"rows {marker['row_start']}..{marker['row_start'] + marker['count'] - 1} of {name} "
                            "do not match their marker's checksum")
    return len(markers), problems


def _corrupt_line(e: CorruptChunk) -> str:
    return f"shard {e.shard}, rows {e.rows[0]}..{e.rows[1] - 1} of array {e.array}: a chunk that cannot be decoded"


def check_rows(store: LatentStore, shard_urls: dict[str, str], vae, teacher_model, n: int, seed: int,
               atol: float, rtol: float, batch_size: int = 32) -> tuple[int, list[str]]:
    """``(rows compared, problems)``: re-encode a random sample of done rows from their source shards."""
    done = np.flatnonzero(store.done_rows())
    rows = np.random.default_rng(seed).choice(done, size=min(n, len(done)), replace=False)
    names = store.array_names
    problems, compared = [], 0
    for entry in store.shard_map:
        mine = sorted(int(r) for r in rows if entry["row_start"] <= r < entry["row_start"] + entry["capacity"])
        if not mine:
            continue
        if entry["name"] not in shard_urls:
            problems.append(f"source shard {entry['name']} is not in the dataset's manifest")
            continue
        try:
            block = store.read_rows(mine[0], mine[-1] + 1)
        except CorruptChunk as e:
            problems.append(_corrupt_line(e))
            continue
        stored = {r: {k: v[r - mine[0]:r - mine[0] + 1] for k, v in block.items()} for r in mine}
        wanted = {str(s["keys"][0]): r for r, s in stored.items()}
        matches = [(wanted[s["__key__"]], s) for s in iter_shard(shard_urls[entry["name"]]) if s["__key__"] in wanted]
        for batch in batched(matches, batch_size):
            fresh = encode_images(vae, teacher_model, np.stack([s["image"] for _, s in batch]),
                                  "mean_flip" in names, "teacher_patch" in names)
            for i, (r, sample) in enumerate(batch):
                problems += _compare(entry["name"], r, stored[r], {k: v[i:i + 1] for k, v in fresh.items()},
                                     sample["cls"], atol, rtol)
        compared += len(matches)
        for r in sorted(set(mine) - {r for r, _ in matches}):
            problems.append(f"row {r} ({entry['name']}): no sample with key {stored[r]['keys'][0]!r} "
                            "in the source shard")
    return compared, problems


def _compare(shard: str, row: int, stored: dict, fresh: dict, label: int, atol: float, rtol: float) -> list[str]:
    problems = []
    if int(stored["labels"][0]) != label:
        problems.append(f"row {row} ({shard}): label {int(stored['labels'][0])} != source class {label}")
    for name, value in fresh.items():
        a, b = stored[name].astype(np.float32), value.astype(np.float32)
        if not np.allclose(a, b, atol=atol, rtol=rtol):
            problems.append(f"row {row} ({shard}): {name} differs from a fresh encode "
                            f"(max abs diff {float(np.abs(a - b).max()):.3g})")
    return problems


def run(config: VerifyStoreConfig) -> VerifyStoreSummary:
    """Run the three checks and collect every problem."""
    store = LatentStore.open(config.store, config.version)
    resolution = int(store.attrs["resolution"])
    _, shards = source_shards(config.shards, store.attrs.get("split", "train"))
    teacher = store.attrs.get("teacher") or {}
    spec = (TeacherSpec(teacher.get("name"), teacher.get("input_size"), teacher.get("layer")) if store.has_teacher
            else None)
    vae, teacher_model = load_models(config.vae_path, spec, "cpu")
    problems = check_provenance(store, vae, resolution)
    markers_checked, marker_problems = check_markers(store)
    compared, row_problems = check_rows(store, {s["name"]: s["url"] for s in shards}, vae, teacher_model,
                                        config.num_samples, config.seed, config.atol, config.rtol)
    problems += marker_problems + [p for p in row_problems if p not in marker_problems]
    return VerifyStoreSummary(store=store.url, version=store.version, ok=not problems,
                              markers_checked=markers_checked, rows_compared=compared, problems=problems)


def show(summary: VerifyStoreSummary, shown: int = 20) -> int:
    """The verdict line, then the first problems; exit status 1 when the store disagrees."""
    verdict = "OK" if summary.ok else f"FAILED ({len(summary.problems)} problems)"
    print(f"verify-store {summary.store}: {verdict}; {summary.markers_checked} markers checked, "
          f"{summary.rows_compared} rows re-encoded and compared")
    for p in summary.problems[:shown]:
        print(f"  - {p}")
    if len(summary.problems) > shown:
        print(f"  ... and {len(summary.problems) - shown} more")
    return 0 if summary.ok else 1


STAGES = [Stage("verify-store", VerifyStoreConfig, VerifyStoreSummary, run, show=show,
                help="check a latent store against its shards and VAE", description=__doc__.splitlines()[0])]
