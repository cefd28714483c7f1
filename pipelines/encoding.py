"""What `encode` writes and `verify-store` re-checks: the source shards of a split, the models, and the
rows one batch of images becomes (normalised posterior moments of the images and their flips, teacher
features)."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from pipelines import StageError
from storage.fs import child, to_url
from storage.latent_store import FLIPPED_POSTERIOR_ARRAYS, POSTERIOR_ARRAYS
from storage.markers import read_json
from storage.shards import read_manifest


def source_shards(source: str, split: str) -> tuple[dict, list[dict]]:
    """``(manifest, shards)``; a shard is ``{"name", "url", "count", "sha256"}`` from its shard marker."""
    manifest = read_manifest(source)
    if split not in manifest.get("splits", {}):
        raise StageError(f"split {split!r} not in {source} (has {sorted(manifest.get('splits', {}))})")
    if not manifest.get("resolution"):
        raise StageError(f"{source} was sharded with --resolution 0 (original sizes); encode needs "
                         "fixed-size images: re-shard with --resolution N")
    info = manifest["splits"][split]
    if not info.get("shards"):
        raise StageError(f"split {split!r} of {source} has no shards")
    shards = []
    for name in info["shards"]:
        url = child(to_url(source), name, "manifest.json shard name")
        marker = read_json(url.removesuffix(".tar") + ".json") or {}
        shards.append({"name": name, "url": url, "count": int(marker.get("count", info["shard_size"])),
                       "sha256": marker.get("sha256")})
    return manifest, shards


class TeacherSpec(NamedTuple):
    """Which teacher, at which input size, from which layer (None: its default)."""

    name: str
    input_size: int | None
    layer: int | None


def teacher_spec(provenance: dict, name: str | None = None, input_size: int | None = None) -> TeacherSpec:
    """The teacher: flags first, then the VAE provenance (``teacher`` str or dict); the provenance's layer holds
    unless the flags name another teacher."""
    teacher, layer = provenance.get("teacher"), None
    if isinstance(teacher, dict):
        layer = teacher.get("layer") if name in (None, teacher.get("name")) else None
        name = name or teacher.get("name")
        input_size = input_size or teacher.get("input_size")
    elif isinstance(teacher, str):
        name = name or teacher
    name = name or provenance.get("dino_model")
    input_size = input_size or provenance.get("dino_input_size") or provenance.get("teacher_input_size")
    if not name:
        raise StageError("the VAE dir's provenance.json names no teacher; pass --dino-model NAME")
    return TeacherSpec(name, int(input_size) if input_size else None, int(layer) if layer else None)


def load_models(vae_path: str, teacher: TeacherSpec | None, device: str):
    """The ReaLS VAE and its frozen teacher (None without one), in eval mode on ``device``."""
    from reals.teachers import build_teacher
    from reals.vae import ReaLSVAE

    vae = ReaLSVAE.from_pretrained(vae_path).to(device).eval()
    if teacher is None:
        return vae, None
    return vae, build_teacher(teacher.name, input_size=teacher.input_size, layer=teacher.layer).to(device)


def encode_images(vae, teacher, images: np.ndarray, flip: bool, teacher_patch: bool) -> dict[str, np.ndarray]:
    """uint8 ``[B, H, W, 3]`` -> float16 rows: the posterior moments (mean, std) normalised by the VAE's channel
    statistics (+ flip), teacher features (none when ``teacher`` is None)."""
    import torch

    from reals.images import to_unit_images

    device = vae.latents_mean.device
    with torch.no_grad():
        x = to_unit_images(np.asarray(images), device)
        pixels = torch.cat([x, x.flip(-1)]) if flip else x
        post_mean, post_std = vae.encode(pixels * 2 - 1)
        moments = vae.normalize(post_mean), post_std / vae.latents_std.to(post_std).view(1, -1, 1, 1)
        patch, global_token = teacher(x) if teacher is not None else (None, None)
    b = len(x)
    rows = {name: m[:b] for name, m in zip(POSTERIOR_ARRAYS, moments)}
    if teacher is not None:
        rows["teacher_global"] = global_token
    if flip:
        rows.update({name: m[b:] for name, m in zip(FLIPPED_POSTERIOR_ARRAYS, moments)})
    if teacher_patch:
        rows["teacher_patch"] = patch
    return {k: v.float().cpu().numpy().astype(np.float16) for k, v in rows.items()}


def batched(samples, size: int):
    """Lists of up to ``size`` consecutive items."""
    batch = []
    for s in samples:
        batch.append(s)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
