"""Benchmark ``LatentLoader``: samples/s of a random-order epoch against what a SiT-B/2 step consumes.

A local store of random ImageNet-256-shaped latents (4x32x32, with flips) grows shard by shard; at each
size the loader is built (``in_memory="auto"`` loads it into RAM) and reads one epoch, and the process
RSS is recorded before and after. The largest store is also read chunk-wise from disk
(``in_memory=False``). The consumer rate is a SiT-B/2 training step (flow-matching loss, backward, AdamW)
at a small batch on this CPU. Prints one JSON document. About a minute on 2 cores.
"""
from __future__ import annotations

import json
import os
import tempfile
import time

import numpy as np
import torch

from storage.latent_loader import LatentLoader
from storage.latent_store import LatentStore, rows_checksum

SHAPE, SHARD_ROWS, SIZES = (4, 32, 32), 1024, (1024, 4096, 8192)
BATCH, SIT_BATCH, SIT_STEPS = 256, 4, 2


def rss_mib() -> float:
    """Resident memory of this process in MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def add_shard(store: LatentStore, name: str, seed: int) -> None:
    """Append one source shard of random rows (a segment and its commit), as ``reals encode`` would."""
    (entry,) = [e for e in store.plan_shards([(name, SHARD_ROWS)]) if e["name"] == name]
    rng = np.random.default_rng(seed)
    rows = {n: rng.standard_normal((SHARD_ROWS, *SHAPE), dtype=np.float32).astype(np.float16)
            for n in ("mean", "mean_flip")}
    std = np.full((SHARD_ROWS, *SHAPE), 0.05, np.float16)
    rows.update(std=std, std_flip=std, labels=rng.integers(0, 1000, SHARD_ROWS).astype(np.int32),
                keys=np.array([f"{name}-{i}" for i in range(SHARD_ROWS)], dtype=object),
                teacher_global=np.zeros((SHARD_ROWS, 8), np.float16))
    store.write_rows(entry["row_start"], rows)
    store.write_marker({"shard": name, "row_start": entry["row_start"], "count": SHARD_ROWS,
                        "vae_fingerprint": "bench", "arrays": store.array_names, "checksum": rows_checksum(rows)})


def epoch_rate(url: str, in_memory) -> dict:
    """Samples/s of one random-order epoch, and the RSS the loader added."""
    before = rss_mib()
    start = time.perf_counter()
    loader = LatentLoader(url, batch_size=BATCH, in_memory=in_memory)
    built = time.perf_counter() - start
    after_build = rss_mib()
    loader.set_epoch(1)
    start = time.perf_counter()
    samples = sum(len(y) for _, y in loader)
    rate = samples / (time.perf_counter() - start)
    out = {"rows": loader.rows_done, "in_memory": loader.in_memory, "build_s": round(built, 3),
           "samples_per_s": round(rate, 1), "rss_before_mib": round(before), "rss_after_build_mib": round(after_build),
           "rss_after_epoch_mib": round(rss_mib())}
    del loader
    return out


def sit_rate() -> dict:
    """Samples/s a SiT-B/2 training step consumes at ``SIT_BATCH`` on this CPU."""
    from reals.sit import create_sit
    from reals.transport import create_transport

    model = create_sit("SiT-B/2", input_size=SHAPE[1], in_channels=SHAPE[0], num_classes=1000)
    transport = create_transport()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    x, y = torch.randn(SIT_BATCH, *SHAPE), torch.randint(0, 1000, (SIT_BATCH,))

    def step():
        loss = transport.training_losses(model, x, {"y": y})["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(SIT_STEPS):
        step()
    step_s = (time.perf_counter() - start) / SIT_STEPS
    return {"batch_size": SIT_BATCH, "step_s": round(step_s, 3), "samples_per_s": round(SIT_BATCH / step_s, 2)}


def main() -> None:
    torch.set_num_threads(1)  # as one DDP rank per core would; more threads thrash a shared 2-core machine
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        url = f"{tmp}/store"
        store = LatentStore.create(url, fingerprint="bench", latent_shape=SHAPE, teacher_width=8, chunk_rows=256,
                                   provenance={"num_classes": 1000, "split": "train"})
        growth = []
        for i in range(SIZES[-1] // SHARD_ROWS):
            add_shard(store, f"train-{i:06d}.tar", i)
            if (i + 1) * SHARD_ROWS in SIZES:
                growth.append(epoch_rate(url, "auto"))
        from_disk = epoch_rate(url, False)
    sit = sit_rate()
    best = max(g["samples_per_s"] for g in growth)
    print(json.dumps({
        "latent_shape": list(SHAPE), "batch_size": BATCH, "flip": True, "sample_posterior": True,
        "torch_threads": torch.get_num_threads(), "growth_in_memory_auto": growth, "from_disk_largest": from_disk,
        "sit_b2_step": sit,
        "ratios": {"loader_in_memory_vs_sit_b2": round(best / sit["samples_per_s"], 1),
                   "loader_from_disk_vs_sit_b2": round(from_disk["samples_per_s"] / sit["samples_per_s"], 1)},
    }, indent=2))


if __name__ == "__main__":
    main()
