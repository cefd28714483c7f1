"""Stage `sample-stats`: per-channel pixel statistics of a samples .npz (a stage of your own, in one module).

Registered by naming this module in ``$REALS_STAGE_MODULES`` (or in ``pipelines.registry.STAGE_MODULES``), it gets
a ``reals sample-stats`` command, a Prefect flow and deployment, a section of the pipeline form, a step in
``reals pipeline`` after ``sample`` (it reads the ``samples`` role) and a part of the run report.
"""
from __future__ import annotations

import numpy as np
from pydantic import BaseModel, Field

from pipelines.config import StageConfig
from pipelines.npz import npz_head
from pipelines.registry import Chain, Output, Stage
from pipelines.report_parts import ReportPart, table_lines
from storage.fs import exists
from storage.markers import read_json, write_json


class SampleStatsConfig(StageConfig):
    samples: str = Field(description="samples .npz (ADM layout: arr_0 uint8 images)")
    output: str = Field(description="statistics .json to write")
    num_images: int = Field(1000, ge=1, description="images to read (the first N)")


class SampleStatsSummary(BaseModel):
    output: str
    images: int
    mean: list[float]
    std: list[float]


def run(config: SampleStatsConfig) -> SampleStatsSummary:
    images = npz_head(config.samples, "arr_0", config.num_images).astype(np.float64) / 255
    stats = {"images": len(images), "mean": images.mean(axis=(0, 1, 2)).tolist(),
             "std": images.std(axis=(0, 1, 2)).tolist(), "samples": config.samples}
    write_json(config.output, stats)
    return SampleStatsSummary(output=config.output, images=stats["images"], mean=stats["mean"], std=stats["std"])


def report(config: SampleStatsConfig, save) -> ReportPart | None:
    stats = read_json(config.output)
    if not stats:
        return None
    rows = [[c, m, s] for c, m, s in zip("RGB", stats["mean"], stats["std"])]
    return ReportPart(["## Sample statistics", "", f"Over the first {stats['images']} samples:", "",
                       *table_lines(["channel", "mean", "std"], rows)])


STAGES = [Stage("sample-stats", SampleStatsConfig, SampleStatsSummary, run, report=report,
                missing=lambda c: None if exists(c.output) else f"{c.output} is missing",
                reads={"samples": "samples"}, writes={"output": Output("sample_stats", "sample_stats.json")},
                chain=Chain("sample_stats", "per-channel pixel statistics of the samples", target=True),
                help="per-channel pixel statistics of a samples .npz")]
