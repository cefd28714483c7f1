"""Benchmark ``reals encode``: images/s into the latent store against the bare VAE + teacher forward.

The bare forward (``encode_images`` on decoded images in memory: VAE posterior of the image and its flip,
teacher global token) at the same batch size is the limit one worker can reach. Store rates are whole
runs (shard decode, Zarr writes into segments, commits, lease) in this process (``workers=0``) and on Ray with 1 and 2
actors; the Ray rates include the actors' start (imports, model load). Everything runs on one torch
thread per worker, as a Ray actor with ``num_cpus=1`` does (more threads thrash a shared 2-core machine).
CPU case: demo-size VAE (f4, 4x8x8 latents at 32 px), EfficientNet-Lite0 teacher at 128 px. With CUDA, also
the paper's shape: the SD-shaped f8 VAE at 256 px (4x32x32 latents), teacher at 256 px, bare forward and an
in-process store run on the GPU (fp32, as ``reals encode`` runs). Prints one JSON document. About a minute on
2 cores.
"""
from __future__ import annotations

import io
import json
import tempfile
import time

import numpy as np
import torch

from pipelines.encoding import TeacherSpec, encode_images, load_models
from pipelines.stages.encode import EncodeConfig, EncodeWorker, run
from pipelines.parallel import ensure_ray
from storage.markers import write_json
from storage.shards import iter_shard, write_shard

TEACHER = "efficientnet_lite0"
CPU_CASE = {"vae": "demo", "size": 32, "teacher_size": 128, "shards": 4, "per_shard": 96, "batch": 32}
CUDA_CASE = {"vae": "sd-f8c4", "size": 256, "teacher_size": 256, "shards": 4, "per_shard": 256, "batch": 64}


def random_shards(root: str, case: dict) -> None:
    """``case["shards"]`` shards of random RGB PNGs with their markers and manifest."""
    from PIL import Image

    rng = np.random.default_rng(0)
    size, per_shard = case["size"], case["per_shard"]

    def png() -> bytes:
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
        return buf.getvalue()

    names = []
    for s in range(case["shards"]):
        name = f"train-{s:06d}.tar"
        info = write_shard(f"{root}/{name}", ({"__key__": f"img{s}_{i:04d}", "png": png(), "cls": i % 10}
                                              for i in range(per_shard)))
        write_json(f"{root}/{name[:-4]}.json", {"count": info["count"], "sha256": info["sha256"]})
        names.append(name)
    write_json(f"{root}/manifest.json", {
        "classes": [f"n{i}" for i in range(10)], "resolution": size, "image_format": "png", "fingerprint": "bench",
        "splits": {"train": {"count": len(names) * per_shard, "shards": names, "shard_size": per_shard}}})


def random_vae(path: str, case: dict) -> None:
    """A ReaLS VAE dir of ``case["vae"]`` (random weights: speed does not depend on them) for EfficientNet-Lite0."""
    from reals.align import AlignNet
    from reals.vae import ReaLSVAE, build_vae

    torch.manual_seed(0)
    vae = ReaLSVAE(build_vae(case["vae"]), AlignNet(4, 1280, hidden_dim=256, num_layers=2),
                   provenance={"teacher": {"name": TEACHER, "input_size": case["teacher_size"]}})
    vae.save_pretrained(path)


def bare_rate(data: str, vae_path: str, case: dict, device: str) -> float:
    """Images/s of ``encode_images`` alone (one torch thread on CPU), images already decoded."""
    vae, teacher = load_models(vae_path, TeacherSpec(TEACHER, case["teacher_size"], None), device)
    images = np.stack([s["image"] for s in iter_shard(f"{data}/train-000000.tar")])
    batch = case["batch"]
    encode_images(vae, teacher, images[:batch], True, False)  # warm-up
    start = time.perf_counter()
    for b in range(0, len(images), batch):
        encode_images(vae, teacher, images[b:b + batch], True, False)  # returns host arrays: synchronised
    return len(images) / (time.perf_counter() - start)


def store_run(data: str, vae_path: str, out: str, workers: int, batch: int,
              device: str = "cpu") -> tuple[int, float]:
    """``(images, seconds)`` of a whole ``reals encode`` run into a fresh store."""
    start = time.perf_counter()
    summary = run(EncodeConfig(shards=data, vae_path=vae_path, output=out, workers=workers, batch_size=batch,
                               device=device, show_progress=False))
    return summary.rows_encoded, time.perf_counter() - start


def actor_start_s(vae_path: str, n: int, case: dict) -> float:
    """Seconds until ``n`` fresh encode actors have loaded their VAE and teacher."""
    import ray

    start = time.perf_counter()
    actors = [ray.remote(EncodeWorker).options(num_cpus=1).remote(
        vae_path, TeacherSpec(TEACHER, case["teacher_size"], None), "cpu", case["batch"])
              for _ in range(n)]
    ray.get([a.describe.remote() for a in actors])
    seconds = time.perf_counter() - start
    for a in actors:
        ray.kill(a)
    return seconds


def prepare(tmp: str, case: dict) -> tuple[str, str]:
    """``(shards, VAE dir)`` of ``case`` under ``tmp``."""
    data, vae_path = f"{tmp}/shards-{case['size']}", f"{tmp}/vae-{case['size']}"
    random_shards(data, case)
    random_vae(vae_path, case)
    return data, vae_path


def cpu_case(tmp: str) -> dict:
    """Bare forward, in-process run and Ray runs (1 and 2 actors) of the demo-size case on CPU."""
    case, batch = CPU_CASE, CPU_CASE["batch"]
    data, vae_path = prepare(tmp, case)
    bare = bare_rate(data, vae_path, case, "cpu")
    n, t0 = store_run(data, vae_path, f"{tmp}/store-0", 0, batch)
    ensure_ray(num_cpus=2)
    start = {w: actor_start_s(vae_path, w, case) for w in (1, 2)}
    runs = {w: store_run(data, vae_path, f"{tmp}/store-{w}", w, batch) for w in (1, 2)}
    rate = {w: n_w / t for w, (n_w, t) in runs.items()}
    steady = {w: n_w / max(t - start[w], 1e-9) for w, (n_w, t) in runs.items()}
    return {
        "device": "cpu", "images": n, "image_size": case["size"], "batch_size": batch, "vae": "demo (f4, 4x8x8)",
        "teacher": f"{TEACHER}@{case['teacher_size']}", "flip": True, "torch_threads_per_worker": 1,
        "images_per_s": {"bare_forward": round(bare, 1), "store_in_process": round(n / t0, 1),
                         "store_ray_1_worker": round(rate[1], 1), "store_ray_2_workers": round(rate[2], 1),
                         "store_ray_1_worker_after_start": round(steady[1], 1),
                         "store_ray_2_workers_after_start": round(steady[2], 1)},
        "actor_start_s": {str(w): round(s, 1) for w, s in start.items()},
        "ratios": {"in_process_vs_bare": round(n / t0 / bare, 3),
                   "ray_1_worker_after_start_vs_bare": round(steady[1] / bare, 3),
                   "ray_2_vs_1_workers_after_start": round(steady[2] / steady[1], 3),
                   "ray_2_vs_1_workers": round(rate[2] / rate[1], 3)},
        "note": "whole-run Ray rates include actor start (imports + model load); '_after_start' subtracts the "
                "separately measured start time",
    }


def gpu_case(tmp: str, case: dict, device: str) -> dict:
    """Bare forward and an in-process store run of ``case`` on ``device`` (the paper's shape on CUDA)."""
    data, vae_path = prepare(tmp, case)
    bare = bare_rate(data, vae_path, case, device)
    n, t = store_run(data, vae_path, f"{tmp}/store-{case['size']}", 0, case["batch"], device)
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    return {"device": name, "images": n, "image_size": case["size"], "batch_size": case["batch"],
            "vae": f"{case['vae']} (4x{case['size'] // 8}x{case['size'] // 8})", "dtype": "float32",
            "teacher": f"{TEACHER}@{case['teacher_size']}", "flip": True,
            "images_per_s": {"bare_forward": round(bare, 1), "store_in_process": round(n / t, 1)},
            "ratios": {"in_process_vs_bare": round(n / t / bare, 3)}}


def main() -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench-encode-") as tmp:
        cases = [cpu_case(tmp)]
        if torch.cuda.is_available():
            cases.append(gpu_case(tmp, CUDA_CASE, "cuda"))
    print(json.dumps({"torch": torch.__version__, "cases": cases}, indent=2))


if __name__ == "__main__":
    main()
