"""The alignment sweep (``reals experiment --sweep FILE``, issue 18): overrides of the ReaLS arm, one point each,
all paired with the experiment's one baseline arm and its seeds.

A sweep file holds ``points`` (a list of overrides, each optionally ``name``d) and/or ``grid`` (knob -> values:
every combination). A knob is an ExperimentConfig field (``align_weight``, ``teacher_layer``,
``teacher_input_size``) or ``section.field`` (``train_vae.kl_weight``, ``generator.sample_posterior``). The shared
inputs (data, shards, reference, evaluator, pretraining, seeds) cannot be overridden, so every point is measured
against the same baseline runs. A point whose stage configs equal the experiment's own ReaLS arm is that arm; one
that changes only the generator shares that arm's VAE side (``pipelines.experiment_plan.VAE_SIDE``).

Here: reading and expanding a sweep, a point's config, which stage settings a knob may change (the check), and the
results table. The plan is ``pipelines.experiment_plan``, running it ``flows.experiment``; the plots
``pipelines.render``.
"""
from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass

import numpy as np

from pipelines import StageError
from pipelines.config import build, load_yaml, override, section_names

SHARED = ("output", "seeds", "images", "synthetic", "shard", "reference", "evaluator", "pretrain_vae",
          "show_progress", "points", "grid")
TRAIN_VAE_KNOBS = ("align_weight", "teacher", "teacher_input_size", "teacher_weights_dir", "teacher_layer")


@dataclass(frozen=True)
class Point:
    """One sweep point: its name (a folder name) and its overrides (dotted knob -> value)."""

    name: str
    overrides: dict

    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.overrides.items())


def _flatten(values: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in values.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and not prefix:
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def point_name(overrides: dict) -> str:
    """A folder name from the overrides: ``teacher_layer-6_kl_weight-1e-05``."""
    raw = "_".join(f"{k.rsplit('.', 1)[-1]}-{v}" for k, v in overrides.items())
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", raw)[:100]


def load_sweep(path: str) -> dict:
    """``{"points": [...], "grid": {...}}`` from a sweep YAML."""
    values = load_yaml(path)
    unknown = sorted(set(values) - {"points", "grid"})
    if unknown:
        raise StageError(f"sweep file {path}: unknown key(s) {', '.join(unknown)}; a sweep has `points` (a list of "
                         "overrides) and/or `grid` (knob: [values])")
    return {"points": values.get("points") or [], "grid": values.get("grid") or {}}


def expand(points: list[dict], grid: dict[str, list]) -> list[Point]:
    """The sweep's points: the listed ones, then every combination of the grid."""
    out = []
    for given in points:
        given = dict(given)
        name = given.pop("name", None)
        overrides = _flatten(given)
        out.append(Point(str(name) if name is not None else point_name(overrides), overrides))
    for knob, values in grid.items():
        if not isinstance(values, list) or not values:
            raise StageError(f"sweep grid: {knob} needs a non-empty list of values, got {values!r}")
    knobs = list(grid)
    for values in itertools.product(*(grid[k] for k in knobs)) if knobs else ():
        overrides = dict(zip(knobs, values))
        out.append(Point(point_name(overrides), overrides))
    seen = set()
    for p in out:
        if not p.overrides:
            raise StageError(f"sweep point {p.name}: no overrides (the experiment's own ReaLS arm is always run)")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", p.name) or p.name in seen:
            raise StageError(f"sweep point name {p.name!r} must be a unique folder name (letters, digits, _ . -)")
        seen.add(p.name)
        shared = sorted({k.split(".")[0] for k in p.overrides} & set(SHARED))
        if shared:
            raise StageError(f"sweep point {p.name}: {', '.join(shared)} is shared by every point and the baseline; "
                             "a sweep may not override it")
    return out


def apply(config, point: Point):
    """The ExperimentConfig of ``point``: ``config`` with the point's overrides."""
    values = config.model_dump(exclude={"points", "grid"})
    for key, value in point.overrides.items():
        values = override(values, key, value, f"sweep point {point.name}")
    return build(type(config), values, f"sweep point {point.name}: experiment config ")


def targets(knob: str) -> str:
    """The stage setting (``section.field`` of the recorded configs) a knob sets."""
    head, _, field = knob.partition(".")
    if not field:
        return f"train_vae.{head}" if head in TRAIN_VAE_KNOBS else ("generator.model" if head == "model" else head)
    return f"sample.{field}" if head == "sample_dit" else f"{section_names(head)[0]}.{field}"


# ---------------------------------------------------------------------------------------------------
# Results: a row per point, paired against the baseline seed by seed
# ---------------------------------------------------------------------------------------------------

COLUMNS = (  # (key in a point's row, header, how it reads)
    ("FD_domain", "FD_domain↓", "abs"), ("FD_domain_change", "ΔFD_domain vs VAE", "pct"),
    ("FD_domain_z", "paired z", "z"), ("cond_accuracy", "cond_acc↑", "abs"), ("FD_effnet", "FD_effnet↓", "abs"),
    ("PSNR", "PSNR↑", "abs"), ("patch_cos", "patch_cos↑", "abs"), ("global_cos", "global_cos↑", "abs"),
    ("mIoU_fraction", "mIoU / teacher↑", "abs"), ("mIoU_probe_fraction", "raw-latent probe mIoU / teacher", "abs"),
    ("delta1_fraction", "δ<1.25 / teacher↑", "abs"), ("minutes", "min per seed", "abs"),
)


def mean_std(values: list[float]) -> dict:
    """Mean, sample standard deviation and the values (a sweep's and the experiment's spread over seeds)."""
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "values": a.tolist()}


def point_row(runs: dict[int, dict], baseline: dict[int, dict]) -> dict:
    """Mean and spread over seeds of a point's metrics; ``FD_domain_change`` is the paired relative change (%)
    against the baseline, ``FD_domain_z`` its mean over its standard deviation."""
    seeds = sorted(runs)
    row = {}
    for key, _, _ in COLUMNS:
        values = [runs[s]["row"].get(key) for s in seeds]
        if all(v is not None and math.isfinite(v) for v in values):
            row[key] = mean_std(values)
    change = [100 * (runs[s]["row"]["FD_domain"] / baseline[s]["row"]["FD_domain"] - 1) for s in seeds]
    row["FD_domain_change"] = mean_std(change)
    diffs = [runs[s]["row"]["FD_domain"] - baseline[s]["row"]["FD_domain"] for s in seeds]
    d = mean_std(diffs)
    row["FD_domain_z"] = {"mean": d["mean"] / d["std"] if d["std"] > 0 else float("nan"), "std": 0.0,
                          "values": [], "paired_differences": diffs}
    return row


def _cell(stat: dict | None, kind: str) -> str:
    if stat is None:
        return "n/a"
    m, s = stat["mean"], stat["std"]
    if kind == "z":
        return f"{m:.1f}" if math.isfinite(m) else "n/a"
    if kind == "pct":
        return f"{m:+.1f}% ± {s:.1f}"
    fmt = (lambda x: f"{x:.3f}") if abs(m) < 100 else (lambda x: f"{x:.1f}")
    return f"{fmt(m)} ± {fmt(s)}"


def markdown(rows: list[dict], baseline: dict, seeds: int, family: str) -> str:
    """The sweep table: the baseline, then a row per point (mean ± std over seeds)."""
    head = ["point", "overrides"] + [h for _, h, _ in COLUMNS]
    lines = [f"## Alignment sweep: {family} on each point's ReaLS latents vs the shared plain-VAE baseline "
             f"({seeds} seeds, mean ± std)", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines.append("| VAE baseline | align_weight 0 | " + " | ".join(
        _cell(baseline.get(k), kind) if kind == "abs" else "" for k, _, kind in COLUMNS) + " |")
    for r in rows:
        lines.append(f"| {r['name']} | {r['label'] or '(the experiment config)'} | "
                     + " | ".join(_cell(r["stats"].get(k), kind) for k, _, kind in COLUMNS) + " |")
    lines += ["", "- ΔFD_domain: the paired relative change against the baseline run of the same seed; paired z: the "
              "mean paired difference over its standard deviation (below −2: ahead beyond 2 standard deviations).",
              "- mIoU and δ<1.25 are the training-free heads on each run's latents (`reals downstream`), as a "
              "fraction of the same heads on the teacher's features; the raw-latent probe is a ridge head fitted on "
              "the same run's latents without the alignment network.",
              "- patch_cos/global_cos: the heads' cosine to the teacher (last logging interval of the VAE training).",
              "- min per seed: the point's own steps (VAE fine-tuning to assessment), summed, per seed; shared steps "
              "are not counted."]
    return "\n".join(lines) + "\n"


def collect(points: list[tuple[str, Point]], runs: list[dict], seeds: int, base_values: dict) -> dict:
    """The sweep's rows: the experiment's own ReaLS arm (``base``) and every point with runs of its own, each paired
    seed by seed with the one baseline; ``base_values``: each knob's value in the experiment config."""
    by = {(r["arm"], r["seed"]): r for r in runs}
    baseline = {s: by[("vae", s)] for s in range(seeds)}
    keys = [k for k, _, _ in COLUMNS if all(k in r["row"] for r in baseline.values())]
    rows = [{"name": "base", "label": "", "arm": "reals", "overrides": {},
             "stats": point_row({s: by[("reals", s)] for s in range(seeds)}, baseline)}]
    for arm, p in points:
        if arm != "reals":
            rows.append({"name": p.name, "label": p.label(), "arm": arm, "overrides": p.overrides,
                         "stats": point_row({s: by[(arm, s)] for s in range(seeds)}, baseline)})
    same_as_base = [p.name for arm, p in points if arm == "reals"]
    return {"rows": rows, "baseline": {k: mean_std([r["row"][k] for r in baseline.values()]) for k in keys},
            "same_as_base": same_as_base, "base_values": base_values, "seeds": seeds}


def knob_series(sweep: dict) -> dict[str, dict[str, list]]:
    """Per knob: its plot's series (the points' other overrides -> (value, FD_domain change, mIoU fraction)); the
    base row sits at the knob's value in the experiment config."""
    out = {}
    for knob, base_value in sweep["base_values"].items():
        series: dict[str, list] = {}
        for row in sweep["rows"]:
            if row["name"] != "base" and knob not in row["overrides"]:
                continue
            others = ", ".join(f"{k}={v}" for k, v in row["overrides"].items() if k != knob)
            value = row["overrides"].get(knob, base_value)
            series.setdefault(others, []).append((value, row["stats"]["FD_domain_change"],
                                                  row["stats"].get("mIoU_fraction")))
        out[knob] = series
    return out
