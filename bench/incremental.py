"""Benchmark incremental sharding: rows re-encoded, shards written and seconds when one image arrives in the
first class of a sharded, encoded training split.

"resliced" is the behaviour before shard assignments were recorded: shards were slices of the sorted
listing, so after the arrival they are exactly what a first ``reals shard`` run of the new listing writes
(done here into a fresh folder), and ``reals encode`` then re-encodes every shard whose bytes changed (into
a copy of the store). "recorded" re-runs ``reals shard`` and ``reals encode`` on the same folders: the
arrival goes to a new shard and only its row is encoded. Demo-size VAE with random weights (f4, 4x8x8
latents at 32 px), EfficientNet-Lite0 teacher, encode in this process. Prints one JSON document; about
half a minute on 2 cores.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from encode import CPU_CASE, random_vae  # bench/encode.py: the demo-size VAE dir with random weights

from pipelines.stages.encode import EncodeConfig
from pipelines.stages.encode import run as encode
from pipelines.parallel import ensure_ray
from pipelines.stages.shard import ShardConfig
from pipelines.stages.shard import run as shard
from pipelines.stages.synthetic import SyntheticConfig
from pipelines.stages.synthetic import run as synthesize

CLASSES, PER_CLASS, SHARD_SIZE, RESOLUTION = 4, 48, 32, 32


def shard_and_encode(images: Path, shards: Path, vae: str, store: Path) -> dict:
    """Shards written, rows encoded and seconds of one ``shard`` + ``encode`` pass."""
    start = time.perf_counter()
    s = shard(ShardConfig(images=str(images), output=str(shards), resolution=RESOLUTION, shard_size=SHARD_SIZE,
                          workers=2, show_progress=False))
    e = encode(EncodeConfig(shards=str(shards), vae_path=vae, output=str(store), workers=0,
                            batch_size=CPU_CASE["batch"], show_progress=False))
    return {"shards_written": s.shards_written + s.shards_redone, "rows_encoded": e.rows_encoded,
            "seconds": round(time.perf_counter() - start, 2)}


def main() -> None:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench-incremental-") as tmp:
        tmp = Path(tmp)
        images, vae = tmp / "images", str(tmp / "vae")
        synthesize(SyntheticConfig(output=str(images), classes=CLASSES, per_class=PER_CLASS, size=48))
        random_vae(vae, CPU_CASE)
        ensure_ray(num_cpus=2)
        first = shard_and_encode(images, tmp / "shards", vae, tmp / "store")
        shutil.copytree(tmp / "store", tmp / "store-resliced")
        first_class = sorted((images / "train").iterdir())[0]
        shutil.copy(sorted(first_class.iterdir())[-1], first_class / "aaa_arrival.JPEG")
        recorded = shard_and_encode(images, tmp / "shards", vae, tmp / "store")
        resliced = shard_and_encode(images, tmp / "shards-resliced", vae, tmp / "store-resliced")
    print(json.dumps({
        "images": CLASSES * PER_CLASS, "shard_size": SHARD_SIZE, "shards": -(-CLASSES * PER_CLASS // SHARD_SIZE),
        "arrivals": 1, "where": "first class, sorting first", "cpus": os.cpu_count(), "first_run": first,
        "resliced": resliced, "recorded": recorded,
        "ratios": {"rows_encoded_resliced_vs_recorded": round(resliced["rows_encoded"] / recorded["rows_encoded"], 1),
                   "seconds_resliced_vs_recorded": round(resliced["seconds"] / recorded["seconds"], 2)},
    }, indent=2))


if __name__ == "__main__":
    main()
