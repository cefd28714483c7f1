"""Benchmark ``reals encode``: images/s into the latent store against the bare VAE + teacher forward.

The bare forward (``encode_images`` on decoded images in memory: VAE posterior of the image and its flip,
teacher global token) at the same batch size is the limit one worker can reach. Store rates are whole
runs (shard decode, Zarr writes, markers, lease) in this process (``workers=0``) and on Ray with 1 and 2
actors; the Ray rates include the actors' start (imports, model load). Everything runs on one torch
thread per worker, as a Ray actor with ``num_cpus=1`` does (more threads thrash a shared 2-core machine).
Demo-size VAE (f4, 4x8x8 latents at 32 px), EfficientNet-Lite0 teacher at 128 px.
Prints one JSON document. About a minute on 2 cores.
"""
from __future__ import annotations

import io
import json
import tempfile
import time

import numpy as np
import torch

from pipelines.encode import EncodeConfig, encode_images, load_models, run
from pipelines.parallel import ensure_ray
from storage.markers import write_json
from storage.shards import iter_shard, write_shard

SIZE, SHARDS, PER_SHARD, BATCH = 32, 4, 96, 32
TEACHER, TEACHER_SIZE = "efficientnet_lite0", 128


def random_shards(root: str) -> None:
    """``SHARDS`` shards of random RGB PNGs with their markers and manifest."""
    from PIL import Image

    rng = np.random.default_rng(0)

    def png() -> bytes:
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(buf, format="PNG")
        return buf.getvalue()

    names = []
    for s in range(SHARDS):
        name = f"train-{s:06d}.tar"
        info = write_shard(f"{root}/{name}", ({"__key__": f"img{s}_{i:04d}", "png": png(), "cls": i % 10}
                                              for i in range(PER_SHARD)))
        write_json(f"{root}/{name[:-4]}.json", {"count": info["count"], "sha256": info["sha256"]})
        names.append(name)
    write_json(f"{root}/manifest.json", {
        "classes": [f"n{i}" for i in range(10)], "resolution": SIZE, "image_format": "png", "fingerprint": "bench",
        "splits": {"train": {"count": SHARDS * PER_SHARD, "shards": names, "shard_size": PER_SHARD}}})


def demo_vae(path: str) -> None:
    """A demo-size ReaLS VAE dir (random weights) aligned to EfficientNet-Lite0."""
    from reals.align import AlignNet
    from reals.vae import ReaLSVAE, build_vae

    torch.manual_seed(0)
    vae = ReaLSVAE(build_vae("demo"), AlignNet(4, 1280, hidden_dim=256, num_layers=2),
                   provenance={"teacher": {"name": TEACHER, "input_size": TEACHER_SIZE}})
    vae.save_pretrained(path)


def bare_rate(data: str, vae_path: str) -> float:
    """Images/s of ``encode_images`` alone on one torch thread, images already decoded."""
    vae, teacher = load_models(vae_path, TEACHER, TEACHER_SIZE, "cpu")
    images = np.stack([s["image"] for s in iter_shard(f"{data}/train-000000.tar")])
    encode_images(vae, teacher, images[:BATCH], True, False)  # warm-up
    start = time.perf_counter()
    for b in range(0, len(images), BATCH):
        encode_images(vae, teacher, images[b:b + BATCH], True, False)
    return len(images) / (time.perf_counter() - start)


def store_rate(data: str, vae_path: str, out: str, workers: int) -> float:
    """Images/s of a whole ``reals encode`` run into a fresh store."""
    start = time.perf_counter()
    summary = run(EncodeConfig(data_path=data, vae_path=vae_path, output=out, workers=workers, batch_size=BATCH,
                               show_progress=False))
    return summary.rows_encoded / (time.perf_counter() - start)


def main() -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench-encode-") as tmp:
        data, vae_path = f"{tmp}/shards", f"{tmp}/vae"
        random_shards(data)
        demo_vae(vae_path)
        bare = bare_rate(data, vae_path)
        in_process = store_rate(data, vae_path, f"{tmp}/store-0", 0)
        ensure_ray(num_cpus=2)
        ray_1 = store_rate(data, vae_path, f"{tmp}/store-1", 1)
        ray_2 = store_rate(data, vae_path, f"{tmp}/store-2", 2)
    print(json.dumps({
        "images": SHARDS * PER_SHARD, "image_size": SIZE, "batch_size": BATCH, "vae": "demo (f4, 4x8x8)",
        "teacher": f"{TEACHER}@{TEACHER_SIZE}", "flip": True,
        "torch_threads_per_worker": 1,
        "images_per_s": {"bare_forward": round(bare, 1), "store_in_process": round(in_process, 1),
                         "store_ray_1_worker": round(ray_1, 1), "store_ray_2_workers": round(ray_2, 1)},
        "ratios": {"ray_1_worker_vs_bare": round(ray_1 / bare, 3), "ray_2_vs_1_workers": round(ray_2 / ray_1, 3),
                   "in_process_vs_bare": round(in_process / bare, 3)},
        "note": "Ray rates include actor start (imports + model load), a fixed cost a small run cannot amortise",
    }, indent=2))


if __name__ == "__main__":
    main()
