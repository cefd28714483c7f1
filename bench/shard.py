"""Benchmark ``reals shard``: images/s on Ray with 1 and 2 workers against the bare single-process loop.

The bare loop (read -> decode -> ADM crop -> PNG encode, no tar, no Ray) is the limit one worker can reach;
the same shard units run in this process without Ray separate the cost of tars and markers from Ray's.
Prints one JSON document with the rates and their ratios. About a minute on 2 cores.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from pipelines.imaging import prepare
from pipelines.parallel import ensure_ray
from pipelines.stages.shard import ShardConfig, plan, process_unit, run
from pipelines.stages.synthetic import SyntheticConfig
from pipelines.stages.synthetic import run as synthesize

CLASSES, PER_CLASS, SOURCE_SIZE = 8, 48, 256
RESOLUTION, SHARD_SIZE, FORMAT = 128, 24, "png"


def bare_loop(root: Path) -> float:
    """Images/s of decode -> crop -> encode in this process."""
    files = sorted((root / "train").glob("*/*.JPEG"))
    start = time.perf_counter()
    for path in files:
        prepare(path.read_bytes(), RESOLUTION, FORMAT)
    return len(files) / (time.perf_counter() - start)


def units_in_process(root: Path, out: Path) -> float:
    """Images/s of the shard units (tars, markers) run one after another in this process, without Ray."""
    start = time.perf_counter()
    units = plan(ShardConfig(images=str(root), output=str(out), resolution=RESOLUTION,
                             shard_size=SHARD_SIZE, image_format=FORMAT)).units
    images = sum(process_unit(unit)["count"] for unit in units)
    return images / (time.perf_counter() - start)


def ray_rate(root: Path, out: Path, workers: int) -> float:
    """Images/s of a full ``reals shard`` run (listing, tasks, tars, markers, manifest) on Ray."""
    start = time.perf_counter()
    summary = run(ShardConfig(images=str(root), output=str(out), resolution=RESOLUTION, shard_size=SHARD_SIZE,
                              image_format=FORMAT, workers=workers, show_progress=False))
    return summary.images / (time.perf_counter() - start)


def main() -> None:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    with tempfile.TemporaryDirectory(prefix="bench-shard-") as tmp:
        tmp = Path(tmp)
        synthesize(SyntheticConfig(output=str(tmp / "data"), classes=CLASSES, per_class=PER_CLASS, size=SOURCE_SIZE))
        synthesize(SyntheticConfig(output=str(tmp / "warm"), classes=2, per_class=SHARD_SIZE, size=SOURCE_SIZE))
        ensure_ray(num_cpus=2)
        ray_rate(tmp / "warm", tmp / "warm-out", workers=2)  # start the worker processes before timing
        bare = bare_loop(tmp / "data")
        units = units_in_process(tmp / "data", tmp / "out-0")
        one = ray_rate(tmp / "data", tmp / "out-1", workers=1)
        two = ray_rate(tmp / "data", tmp / "out-2", workers=2)
    print(json.dumps({
        "images": CLASSES * PER_CLASS, "source_size": SOURCE_SIZE, "resolution": RESOLUTION, "format": FORMAT,
        "cpus": os.cpu_count(),
        "bare_images_per_s": round(bare, 1),
        "units_in_process_images_per_s": round(units, 1),
        "ray_1_worker_images_per_s": round(one, 1),
        "ray_2_workers_images_per_s": round(two, 1),
        "units_vs_bare": round(units / bare, 3),
        "ray_1_vs_bare": round(one / bare, 3),
        "ray_2_vs_bare": round(two / bare, 3),
        "ray_2_vs_1_speedup": round(two / one, 3),
    }, indent=2))


if __name__ == "__main__":
    main()
