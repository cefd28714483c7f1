"""Benchmark the data paths of `train-sit`: steps/s of the same SiT at the same batch fed four ways.

- ``store_stream``: the latent store read chunk-wise from disk by ``LatentLoader`` (``in_memory=False``);
- ``store_ram``: the same store held in RAM by ``LatentLoader`` (``in_memory=True``);
- ``in_memory_tensors``: pre-made batches already on the device (the limit: no data path at all);
- ``on_the_fly``: the shards decoded and encoded by the ReaLS VAE at every step (what the store saves).

Each case builds its data with the stages themselves (synthetic images -> ``reals shard`` -> a ReaLS VAE dir
with random weights, whose speed does not depend on them -> ``reals encode``), then times ``Trainer.train_step``
(flow-matching loss, backward, clipping, AdamW, EMA) over batches drawn from each source, after a warm-up.
On CPU: a demo-size case (32 px, demo f4 VAE, 4x8x8 latents). With CUDA: also SiT-B/2 and SiT-XL/2 at 256 px
(SD-shaped f8 VAE, 4x32x32 latents) in bf16 at realistic per-GPU batches. Prints one JSON document.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import tempfile
import time

import torch

CPU_CASES = [{"model": "SiT-T/2", "vae": "demo", "resolution": 32, "batch": 64, "images": 640}]
CUDA_CASES = [{"model": "SiT-B/2", "vae": "sd-f8c4", "resolution": 256, "batch": 64, "images": 1024},
              {"model": "SiT-XL/2", "vae": "sd-f8c4", "resolution": 256, "batch": 32, "images": 1024}]


def device_note() -> dict:
    if torch.cuda.is_available():
        return {"device": torch.cuda.get_device_name(0), "cuda": torch.version.cuda, "dtype": "bf16 autocast"}
    return {"device": f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})",
            "dtype": "float32", "torch_threads": torch.get_num_threads()}


def build_data(case: dict, root: str) -> dict:
    """Shards, a ReaLS VAE dir and its latent store for ``case``, made by the stages."""
    from pipelines.stages.encode import EncodeConfig
    from pipelines.stages.encode import run as encode
    from pipelines.stages.shard import ShardConfig
    from pipelines.stages.shard import run as shard
    from pipelines.stages.synthetic import SyntheticConfig
    from pipelines.stages.synthetic import run as synthetic
    from reals.align import AlignNet
    from reals.vae import ReaLSVAE, build_vae

    classes = 10
    synthetic(SyntheticConfig(output=f"{root}/images", classes=classes, per_class=case["images"] // classes,
                              size=case["resolution"], seed=0))
    shard(ShardConfig(images=f"{root}/images", output=f"{root}/shards", resolution=case["resolution"],
                      shard_size=256, show_progress=False))
    torch.manual_seed(0)
    vae = build_vae(case["vae"])
    ReaLSVAE(vae, AlignNet(vae.config.latent_channels, 8, 8, 1), provenance={
        "teacher": {"name": "tiny-dinov2", "input_size": 28}, "resolution": case["resolution"]},
    ).save_pretrained(f"{root}/vae")
    encode(EncodeConfig(shards=f"{root}/shards", vae_path=f"{root}/vae", output=f"{root}/store", batch_size=32,
                        show_progress=False))
    return {"shards": f"{root}/shards", "vae": f"{root}/vae", "store": f"{root}/store"}


def endless(source):
    """A source's batches, epoch after epoch."""
    for epoch in itertools.count():
        yield from source.batches(epoch)


def steps_per_sec(trainer, batches, steps: int, warmup: int) -> float:
    """Training steps per second over ``steps`` steps after ``warmup`` steps, data fetching included."""
    dev = trainer.d.device
    for i in range(warmup + steps):
        if i == warmup:
            start = time.perf_counter()
        x, y = next(batches)
        trainer.train_step(x.to(dev, non_blocking=True), y.to(dev, non_blocking=True))
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - start)


def bench_case(case: dict, steps: int, warmup: int) -> dict:
    from pipelines.stages.train_sit import Dist, ShardSource, StoreSource, TrainSiTConfig, Trainer

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = Dist(device=dev)
    with tempfile.TemporaryDirectory(prefix="bench-train-sit-") as root:
        t0 = time.perf_counter()
        data = build_data(case, root)
        setup_s = time.perf_counter() - t0

        def config(**kw):
            base = dict(store=data["store"], output=f"{root}/run", model=case["model"],
                        global_batch_size=case["batch"], max_steps=1, sample_every=0, in_memory=False,
                        vae_path=data["vae"], show_progress=False)
            return TrainSiTConfig(**{**base, **kw})

        trainer = Trainer(config(), d)
        store_stream = trainer.source
        store_ram = StoreSource(config(in_memory=True), case["batch"], d)
        on_the_fly = ShardSource(config(store=data["shards"]), case["batch"], d)
        first = list(itertools.islice(endless(store_ram), 8))
        tensors = itertools.cycle([(x.to(dev), y.to(dev)) for x, y in first])
        rates = {name: round(steps_per_sec(trainer, it, steps, warmup), 3) for name, it in (
            ("in_memory_tensors", tensors), ("store_ram", endless(store_ram)),
            ("store_stream", endless(store_stream)), ("on_the_fly", endless(on_the_fly)))}
    return {
        **case, "latent_shape": list(trainer.latent_shape),
        "parameters": sum(p.numel() for p in trainer.model.parameters()),
        "rows": store_stream.rows_done, "steps_timed": steps, "warmup_steps": warmup, "setup_s": round(setup_s, 1),
        "steps_per_sec": rates,
        "samples_per_sec": {k: round(v * case["batch"], 1) for k, v in rates.items()},
        "ratios": {
            "store_stream_vs_in_memory": round(rates["store_stream"] / rates["in_memory_tensors"], 3),
            "store_ram_vs_in_memory": round(rates["store_ram"] / rates["in_memory_tensors"], 3),
            "store_stream_vs_on_the_fly": round(rates["store_stream"] / rates["on_the_fly"], 3),
            "store_ram_vs_on_the_fly": round(rates["store_ram"] / rates["on_the_fly"], 3),
        },
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20, help="timed steps per source (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before timing (default 3)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: steadier on a shared 2-core machine)")
    p.add_argument("--cpu-only", action="store_true", help="skip the CUDA cases even when CUDA is available")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from pipelines.parallel import ensure_ray

    ensure_ray()
    cases = CPU_CASES + (CUDA_CASES if torch.cuda.is_available() and not args.cpu_only else [])
    results = [bench_case(c, args.steps, args.warmup) for c in cases]
    print(json.dumps({**device_note(), "torch": torch.__version__, "cases": results}, indent=2))


if __name__ == "__main__":
    main()
