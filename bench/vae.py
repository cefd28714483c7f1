"""Benchmark ``reals train-vae`` steps on the CPU: steps/s for the tiny, demo and sd-f8c4 VAEs, teacher share.

Each case trains on a few random-image shards written to a temporary folder, with the offline teacher
(EfficientNet-Lite0), a random-backbone LPIPS of the LPIPS compute cost, and the GAN on, so one step costs
what a real step costs. ``teacher_share`` is the teacher's forward CPU time over the whole step's CPU time.
Times are wall-clock and process CPU seconds; torch uses ``--threads`` intra-op threads (default 1: on a
shared 2-core machine more threads spin and slow every step down). ``cached_step_s`` is a step on teacher
features computed beforehand (``--cache-teacher``), ``cache_speedup`` its ratio to a live-teacher step.
Prints one JSON document; a few minutes on 2 cores (the sd-f8c4 steps dominate).
"""
from __future__ import annotations

import argparse
import io
import json
import tempfile
import time

import numpy as np
import torch

from pipelines.distributed import Dist
from pipelines.stages.train_vae import Trainer, TrainVAEConfig
from reals.images import to_model_images
from storage.markers import write_json
from storage.shards import write_shard

# name -> (image size, batch size, timed steps, teacher input size)
CASES = {"tiny": (32, 8, 5, 128), "demo": (32, 8, 5, 128), "sd-f8c4": (256, 1, 1, 256)}


def random_shards(root: str, size: int, count: int) -> None:
    """One shard of ``count`` random RGB PNGs at ``size`` px, with its manifest."""
    from PIL import Image

    rng = np.random.default_rng(0)

    def png() -> bytes:
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
        return buf.getvalue()

    write_shard(f"{root}/train-000000.tar", ({"__key__": f"img{i:04d}", "png": png(), "cls": 0}
                                            for i in range(count)))
    write_json(f"{root}/manifest.json", {"classes": ["n0"], "resolution": size, "image_format": "png",
                                         "fingerprint": "bench", "splits": {"train": {
                                             "count": count, "shards": ["train-000000.tar"], "shard_size": count}}})


def bench_case(name: str, tmp: str) -> dict:
    size, batch, steps, teacher_size = CASES[name]
    data = f"{tmp}/{name}-data"
    random_shards(data, size, batch)
    cfg = TrainVAEConfig(shards=data, output=f"{tmp}/{name}-run", vae_config=name,
                         teacher="efficientnet_lite0", teacher_input_size=teacher_size, perceptual="random",
                         perceptual_net="vgg", align_hidden_dim=256, disc_start=0, batch_size=batch,
                         max_steps=steps, show_progress=False)
    trainer = Trainer(cfg, Dist())
    images = np.stack([np.random.default_rng(i).integers(0, 256, (size, size, 3), dtype=np.uint8)
                       for i in range(batch)])
    x = to_model_images(images, torch.device("cpu"))
    trainer.train_step(x)  # warm-up
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        trainer.train_step(x)
    step_s, step_cpu = (time.perf_counter() - start) / steps, (time.process_time() - cpu) / steps
    start, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        for _ in range(steps):
            targets = trainer.teacher((x + 1) / 2)
    teacher_s, teacher_cpu = (time.perf_counter() - start) / steps, (time.process_time() - cpu) / steps
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(x, targets)
    cached_s = (time.perf_counter() - start) / steps
    params = sum(p.numel() for p in trainer.model.vae.parameters())
    return {"image_size": size, "batch_size": batch, "latent_shape": trainer.latent_shape,
            "vae_params_m": round(params / 1e6, 2), "step_s": round(step_s, 4), "step_cpu_s": round(step_cpu, 4),
            "steps_per_s": round(1 / step_s, 3), "images_per_s": round(batch / step_s, 2),
            "teacher": trainer.teacher.description, "teacher_s": round(teacher_s, 4),
            "teacher_cpu_s": round(teacher_cpu, 4), "teacher_share": round(teacher_cpu / step_cpu, 3),
            "cached_step_s": round(cached_s, 4), "cache_speedup": round(step_s / cached_s, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES), help="VAE configs to time")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-vae-") as tmp:
        results = {name: bench_case(name, tmp) for name in args.cases}
    print(json.dumps({"device": "cpu", "torch_threads": torch.get_num_threads(),
                      "perceptual": "random-backbone vgg LPIPS (same compute as LPIPS)", "gan": "on",
                      "cases": results}, indent=2))


if __name__ == "__main__":
    main()
