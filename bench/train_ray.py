"""Benchmark `train-sit` on Ray Train: samples/s with 1 and 2 Ray Train workers against the bare loop in one process.

The data is made by the stages (synthetic images -> ``reals shard`` -> a tiny ReaLS VAE with random weights ->
``reals encode``); every case then trains the same SiT at the same global batch for the same steps: the bare loop
is ``train_sit.run`` in this process (all its torch threads), a Ray Train case is ``pipelines.ray_train.fit`` on a
local Ray with ``--num-workers`` 1 (given every CPU) or 2 (a CPU each, DDP over gloo). samples/s is read from each
run's ``log.jsonl`` (steady state: the first logging interval, which holds start-up and warm-up, is left out), so
Ray's and the workers' start-up are not counted; ``wall_s`` says what a whole run took. Prints one JSON document
with the ratios to the bare loop (goal on a 2-core machine: >= 0.9 with 1 worker, >= 1.7 with 2).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time

import torch


def build_store(root: str, images: int) -> str:
    """A latent store of ``images`` synthetic 32 px images (10 classes), encoded by a tiny random VAE."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from helpers import make_vae_dir

    from pipelines.stages.encode import EncodeConfig, run as encode
    from pipelines.stages.shard import ShardConfig, run as shard
    from pipelines.stages.synthetic import SyntheticConfig, run as synthetic

    synthetic(SyntheticConfig(output=f"{root}/images", classes=10, per_class=images // 10, size=32, seed=0))
    shard(ShardConfig(images=f"{root}/images", output=f"{root}/shards", resolution=32, shard_size=256,
                      show_progress=False))
    vae = make_vae_dir(f"{root}/vae")
    encode(EncodeConfig(shards=f"{root}/shards", vae_path=vae, output=f"{root}/store", workers=0, show_progress=False))
    return f"{root}/store"


def steady_samples_per_sec(run: str) -> float:
    """Mean samples/s of a run's logging intervals after the first."""
    from pipelines.checkpoints import read_log

    rates = [e["samples_per_sec"] for e in read_log(f"{run}/log.jsonl")][1:]
    return sum(rates) / len(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="SiT-S/2")
    parser.add_argument("--global-batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--images", type=int, default=640)
    args = parser.parse_args()

    from pipelines import ray_train
    from pipelines.parallel import ensure_ray
    from pipelines.stages.train_sit import TrainSiTConfig, run

    cpus = os.cpu_count() or 2
    ensure_ray(num_cpus=cpus)
    with tempfile.TemporaryDirectory(prefix="bench-train-ray-") as root:
        store = build_store(root, args.images)
        base = dict(store=store, model=args.model, global_batch_size=args.global_batch_size, max_steps=args.steps,
                    log_every=args.log_every, ckpt_every=10 ** 6, sample_every=0, show_progress=False, device="cpu",
                    use_gpu=False)
        cases = {"bare": None, "ray_1_worker": {"num_workers": 1, "cpus_per_worker": cpus},
                 "ray_2_workers": {"num_workers": 2, "cpus_per_worker": cpus / 2}}
        results = {}
        for name, ray_settings in cases.items():
            config = TrainSiTConfig(output=f"{root}/{name}", launcher="local" if ray_settings is None else "ray",
                                    **base, **(ray_settings or {}))
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(sys.stderr):  # stdout is the JSON document alone
                summary = run(config) if ray_settings is None else ray_train.fit("train-sit", config)
            results[name] = {"samples_per_sec": round(steady_samples_per_sec(config.output), 2),
                             "wall_s": round(time.perf_counter() - t0, 1), "world_size": summary.world_size,
                             **(ray_settings or {"torch_threads": torch.get_num_threads()})}
    bare = results["bare"]["samples_per_sec"]
    print(json.dumps({
        "machine": f"cpu ({cpus} cores, {platform.processor() or platform.machine()}), shared with other jobs",
        "torch": torch.__version__, "model": args.model, "global_batch_size": args.global_batch_size,
        "steps": args.steps, "cases": results,
        "ratio_to_bare": {k: round(v["samples_per_sec"] / bare, 3) for k, v in results.items() if k != "bare"},
        "goal": {"ray_1_worker": 0.9, "ray_2_workers": 1.7}}, indent=2))


if __name__ == "__main__":
    main()
