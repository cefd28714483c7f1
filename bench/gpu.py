"""``make gpu-check``: one GPU's figures at the paper's 256 px shapes, in one process, as one JSON document.

- ``train``: SiT-B/2, SiT-XL/2 and DiT-XL/2 (4x32x32 latents, 1000 classes, bf16 autocast): steps/s of the
  ``train-sit``/``train-dit`` step (``Trainer.train_step``: loss, backward, clipping, AdamW, EMA) fed from a
  latent store read chunk-wise from disk (``store_stream``), from the same store held in RAM (``store_ram``), and
  from batches already on the GPU (``in_memory_tensors``, the limit);
- ``encode``: the sd-f8c4 VAE at 256 px (random weights from its config: no downloads) with the
  EfficientNet-Lite0 teacher, images/s of a ``reals encode`` run in this process against the bare forward
  (``bench/encode.py``'s measurement);
- ``sample``: SiT-XL/2 through the sd-f8c4 VAE (Heun ODE, CFG on the guidance interval), samples/s of the sampling
  worker against its bare model forward (``bench/sample.py``'s measurement).

Each part reports its peak GPU memory and is time-boxed (steps stop at a per-source time limit; a part that
would start past ``--budget-s`` is skipped and says so), so the whole run fits in 8 minutes on one H100. A part
that runs out of GPU memory is retried at half the batch, recorded. A part that fails is recorded with its error
and the others still run; the exit status is then 1. Without CUDA the same code runs at tiny sizes on the CPU
(SiT-T/2 and DiT-T/2 on 4x8x8 latents, the tiny VAE at 32 px), for tests; ``--tiny`` picks those sizes anywhere.
"""
from __future__ import annotations

import argparse
import gc
import itertools
import json
import sys
import tempfile
import time
from contextlib import contextmanager

import numpy as np
import torch

from bench.encode import CUDA_CASE
from bench.train_sit import device_note

GPU = {
    "train": [{"model": "SiT-B/2", "batch": 256}, {"model": "SiT-XL/2", "batch": 64},
              {"model": "DiT-XL/2", "batch": 64}],
    "latent_shape": (4, 32, 32), "classes": 1000, "store_rows": 8192, "chunk_rows": 256,
    "steps": 50, "warmup": 3, "source_s": 15.0,
    "encode": CUDA_CASE,  # sd-f8c4 at 256 px, 4 shards of 256 images, batch 64
    "sample": {"model": "SiT-XL/2", "vae": "sd-f8c4", "resolution": 256, "batch": 64, "batches": 2,
               "num_sampling_steps": 50},
}
TINY = {
    "train": [{"model": "SiT-T/2", "batch": 8}, {"model": "DiT-T/2", "batch": 8}],
    "latent_shape": (4, 8, 8), "classes": 10, "store_rows": 64, "chunk_rows": 32,
    "steps": 2, "warmup": 1, "source_s": 5.0,
    "encode": {"vae": "tiny", "size": 32, "teacher_size": 128, "shards": 1, "per_shard": 16, "batch": 8},
    "sample": {"model": "SiT-T/2", "vae": "tiny", "resolution": 32, "batch": 4, "batches": 1,
               "num_sampling_steps": 3},
}


# ---------------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------------

def free_gpu() -> None:
    """Return freed GPU memory to the allocator's pool (no-op on the CPU)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def peak_gib() -> float | None:
    """Peak GPU memory allocated since the last reset, in GiB (None on the CPU)."""
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


@contextmanager
def part(results: dict, name: str, deadline: float):
    """Run one part into ``results[name]``: skipped past ``deadline``, its error recorded, its peak memory added."""
    out: dict = {}
    results[name] = out
    if time.perf_counter() > deadline:
        out["skipped"] = "time budget spent"
        yield None
        return
    free_gpu()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        yield out
    except Exception as e:  # noqa: BLE001 - one part's failure is recorded; the others still run
        out["error"] = f"{type(e).__name__}: {e}"
    out["peak_gpu_gib"] = peak_gib()
    out["seconds"] = round(time.perf_counter() - start, 1)


def halving_batch(measure, batch: int):
    """``measure(batch)``, retried at half the batch while the GPU runs out of memory; (result, batch)."""
    while True:
        try:
            return measure(batch), batch
        except torch.OutOfMemoryError:
            if batch == 1:
                raise
        batch //= 2  # out of the except block: the failed attempt's tensors are free now
        free_gpu()


def timed_rate(step, steps: int, warmup: int, limit_s: float) -> tuple[float, int]:
    """``(steps/s, steps timed)`` of ``step()`` after ``warmup`` calls, for ``steps`` calls or ``limit_s`` seconds."""
    for _ in range(warmup):
        step()
    sync()
    start, done = time.perf_counter(), 0
    while done < steps and (done == 0 or time.perf_counter() - start < limit_s):
        step()
        done += 1
    sync()
    return done / (time.perf_counter() - start), done


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------------
# Training: store vs tensors in memory
# ---------------------------------------------------------------------------------------------------

def random_store(url: str, sizes: dict) -> None:
    """A latent store of random normalised latents and labels, as ``reals encode`` lays it out (with flips)."""
    from storage.latent_store import LatentStore, rows_checksum

    shape, chunk = sizes["latent_shape"], sizes["chunk_rows"]
    store = LatentStore.create(url, fingerprint="gpu-check", latent_shape=shape, teacher_width=8, chunk_rows=chunk,
                               provenance={"num_classes": sizes["classes"], "split": "train"})
    rows_per_shard = min(1024, sizes["store_rows"])
    for s in range(sizes["store_rows"] // rows_per_shard):
        name = f"train-{s:06d}.tar"
        (entry,) = store.plan_shards([(name, rows_per_shard)])
        rng = np.random.default_rng(s)
        rows = {n: rng.standard_normal((rows_per_shard, *shape), dtype=np.float32).astype(np.float16)
                for n in ("mean", "mean_flip")}
        std = np.full((rows_per_shard, *shape), 0.05, np.float16)
        rows.update(std=std, std_flip=std, labels=rng.integers(0, sizes["classes"], rows_per_shard).astype(np.int32),
                    keys=np.array([f"{s}-{i}" for i in range(rows_per_shard)], dtype=object),
                    teacher_global=np.zeros((rows_per_shard, 8), np.float16))
        store.write_rows(entry["row_start"], rows)
        store.write_marker({"shard": name, "row_start": entry["row_start"], "count": rows_per_shard,
                            "vae_fingerprint": "gpu-check", "arrays": store.array_names,
                            "checksum": rows_checksum(rows)})


def train_rates(case: dict, store: str, root: str, sizes: dict, batch: int) -> dict:
    """Steps/s of one model's training step fed three ways, at ``batch``."""
    from bench.train_sit import endless
    from pipelines.stages.train_sit import Dist, StoreSource, TrainDiTConfig, Trainer, TrainSiTConfig

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = Dist(device=device)
    model = case["model"]
    config_cls = TrainDiTConfig if model.startswith("DiT") else TrainSiTConfig

    def config(**kw):
        base = dict(store=store, output=f"{root}/run-{model.replace('/', '')}", model=model, global_batch_size=batch,
                    max_steps=1, sample_every=0, in_memory=False, show_progress=False)
        return config_cls(**{**base, **kw})

    trainer = Trainer(config(), d)
    try:
        ram = StoreSource(config(in_memory=True), batch, d)
        tensors = itertools.cycle([(x.to(device), y.to(device)) for x, y in itertools.islice(endless(ram), 4)])
        sources = {"in_memory_tensors": tensors, "store_ram": endless(ram), "store_stream": endless(trainer.source)}
        rates, timed = {}, {}
        for name, batches in sources.items():
            def step(batches=batches):
                x, y = next(batches)
                trainer.train_step(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
            rates[name], timed[name] = timed_rate(step, sizes["steps"], sizes["warmup"], sizes["source_s"])
        parameters = sum(p.numel() for p in trainer.model.parameters())
    finally:
        del trainer
    limit = rates["in_memory_tensors"]
    return {
        "parameters": parameters, "steps_timed": timed,
        "steps_per_s": {k: round(v, 3) for k, v in rates.items()},
        "samples_per_s": {k: round(v * batch, 1) for k, v in rates.items()},
        "ratios": {"store_stream_vs_in_memory": round(rates["store_stream"] / limit, 3),
                   "store_ram_vs_in_memory": round(rates["store_ram"] / limit, 3)},
    }


# ---------------------------------------------------------------------------------------------------
# Encode and sampling: the stage's worker vs its bare forward
# ---------------------------------------------------------------------------------------------------

def encode_rates(root: str, sizes: dict) -> dict:
    """``bench/encode.py``'s bare forward and in-process store run, at this run's sizes."""
    from bench.encode import gpu_case

    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = gpu_case(root, sizes["encode"], device)
    return {**{k: v for k, v in out.items() if k != "device"}, "vae": sizes["encode"]["vae"]}


def random_generator(root: str, spec: dict) -> dict:
    """A random ``spec["model"]`` state_dict and a random ReaLS VAE dir of ``spec["vae"]``: timings only."""
    from reals.align import AlignNet
    from reals.models import create_model
    from reals.vae import ReaLSVAE, build_vae

    torch.manual_seed(0)
    vae = build_vae(spec["vae"])
    channels = vae.config.latent_channels
    vae = ReaLSVAE(vae, AlignNet(channels, 8, 8, 1), provenance={"resolution": spec["resolution"]})
    vae.save_pretrained(f"{root}/vae-sample")
    side = spec["resolution"] // vae.downsample_factor
    model = create_model(spec["model"], input_size=side, in_channels=channels, num_classes=1000)
    torch.save(model.state_dict(), f"{root}/generator.pt")
    return {"ckpt": f"{root}/generator.pt", "vae": f"{root}/vae-sample", "model": spec["model"]}


def sample_rates(root: str, sizes: dict, batch: int) -> dict:
    """Samples/s of the sampling worker (sampler, guidance, VAE decode) against its bare model forward."""
    from bench.sample import TIMING, Timed, make_worker

    spec = sizes["sample"]
    setup = random_generator(root, spec)
    settings = {**TIMING, "per_proc_batch_size": batch, "num_sampling_steps": spec["num_sampling_steps"]}
    worker, _ = make_worker(setup, f"{root}/samples.npz", **settings)
    timed = worker.model = Timed(worker.model)
    worker.sample(np.arange(batch))  # warm-up
    timed.seconds = 0.0
    start = time.perf_counter()
    for i in range(1, spec["batches"] + 1):
        worker.sample(np.arange(i * batch, (i + 1) * batch))
    total = time.perf_counter() - start
    n = spec["batches"] * batch
    return {"model": spec["model"], "vae": spec["vae"], "resolution": spec["resolution"],
            "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()},
            "nfe_per_batch": worker.sampler.nfe, "samples": n,
            "samples_per_s": {"bare_forward": round(n / timed.seconds, 2), "worker": round(n / total, 2)},
            "ratios": {"worker_vs_bare_forward": round(timed.seconds / total, 3)}}


# ---------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------

def run(tiny: bool = False, budget_s: float = 390.0) -> dict:
    """Every part at the GPU sizes (or ``tiny`` ones on the CPU); the JSON-ready results."""
    sizes = TINY if tiny or not torch.cuda.is_available() else GPU
    deadline = time.perf_counter() + budget_s
    started = time.perf_counter()
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    results: dict = {"benchmark": "gpu_check", **device_note(), "torch": torch.__version__,
                     "sizes": "tiny (CPU)" if sizes is TINY else "paper (256 px)",
                     "latent_shape": list(sizes["latent_shape"]), "classes": sizes["classes"]}
    parts: dict = {}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as root:
        t0 = time.perf_counter()
        random_store(f"{root}/store", sizes)
        results["store"] = {"rows": sizes["store_rows"], "chunk_rows": sizes["chunk_rows"],
                            "build_s": round(time.perf_counter() - t0, 1)}
        for case in sizes["train"]:
            with part(parts, f"train {case['model']}", deadline) as out:
                if out is not None:
                    rates, batch = halving_batch(
                        lambda b, case=case: train_rates(case, f"{root}/store", root, sizes, b), case["batch"])
                    out.update({"model": case["model"], "batch": batch, "batch_asked": case["batch"], **rates})
        with part(parts, "encode", deadline) as out:
            if out is not None:
                out.update(encode_rates(f"{root}/encode", sizes))
        with part(parts, "sample", deadline) as out:
            if out is not None:
                rates, batch = halving_batch(lambda b: sample_rates(root, sizes, b), sizes["sample"]["batch"])
                out.update({"batch": batch, "batch_asked": sizes["sample"]["batch"], **rates})
    results["parts"] = parts
    results["total_s"] = round(time.perf_counter() - started, 1)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="the tiny sizes even where CUDA is available (a smoke run)")
    p.add_argument("--budget-s", type=float, default=390.0,
                   help="parts that would start after this many seconds are skipped (default 390: no part runs "
                        "much over 90 s, so the whole run ends within 8 minutes)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        torch.set_num_threads(1)  # as the other CPU benchmarks: more threads thrash a shared machine
    results = run(args.tiny, args.budget_s)
    print(json.dumps(results, indent=2))
    return int(any("error" in r for r in results["parts"].values()))


if __name__ == "__main__":
    sys.exit(main())
