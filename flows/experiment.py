"""The controlled experiment (``reals experiment``, issue 9): its plan of ordinary stage steps, run on Ray.

What is compared, and how, is in ``pipelines.experiment``. Here: every stage run of the experiment as a
``Step`` (the pipeline's step type), with its config under one output folder; the steps run in phases,
each phase's steps in parallel as Ray tasks with one torch thread (a Ray-driver stage's task reserves no CPU:
its own tasks or actors take them). A finished step writes its record (the pipeline's record format, with
its summary) to ``records/<step>.json`` last; a re-run skips the steps recorded with the same config,
refuses to start when a step was recorded with other settings, and every stage skips its own finished work.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from prefect import flow
from pydantic import BaseModel, ConfigDict, Field, create_model

from flows import artifacts
from flows.records import record_url, recorded, same_config, write_record
from pipelines.chain import Step
from pipelines.sections import OptionalSection, optional_section
from pipelines import StageError
from pipelines.config import build
from pipelines.experiment import (ARMS, ExperimentConfig, ExperimentSummary, check_arms, collect, config_differences,
                                  markdown, recorded_configs)
from pipelines.registry import stage
from pipelines.checkpoints import read_log
from pipelines.generator import generator_sections
from pipelines.render import ARM_COLOURS, experiment_curves, sweep_plot
from pipelines.sweep import Point, apply, expand, knob_series, point_name, targets
from pipelines.sweep import collect as sweep_results, markdown as sweep_markdown
from storage.fs import join, local_path, write_bytes_atomic
from storage.markers import read_json, write_json

RECORDS = "records"
# A run's units up to its latents and its semantic measures: everything its generator reads.
VAE_SIDE = ("train-vae", "convert", "encode", "downstream")


# ---------------------------------------------------------------------------------------------------
# The plan: every unit of the experiment with its config
# ---------------------------------------------------------------------------------------------------

def cpus(step: Step) -> int:
    """CPUs a step's Ray task reserves: none for a Ray driver (its own tasks or actors take them), else one."""
    return 0 if stage(step.stage).runs_on == "ray" else 1


@dataclass(frozen=True)
class Plan:
    root: str
    shared: dict[str, Step]
    runs: dict[tuple[str, int], dict[str, Step]]  # (arm, seed) -> stage -> unit
    points: list[tuple[str, Point]] = ()  # sweep points and their arms ("reals" where a point is the ReaLS arm)
    borrowed: dict[tuple[str, int], str] = field(default_factory=dict)  # (arm, seed) -> whose VAE side it uses

    def run_root(self, arm: str, seed: int) -> str:
        return join(self.root, arm, f"seed{seed}")

    def recorded(self, arm: str, seed: int) -> dict:
        """The run's stage configs with its own folder, and the one it borrows its VAE side from, as ``<run>``."""
        roots = [self.run_root(arm, seed)] + [r for r in [self.borrowed.get((arm, seed))] if r]
        return recorded_configs(self.runs[(arm, seed)], *roots)


def _section(stage_name: str, name: str, given: dict, fixed: dict, defaults: dict | None = None):
    """The config of ``stage_name`` from defaults, the experiment section ``given`` and the values the experiment
    fixes."""
    clash = sorted(set(given) & set(fixed))
    if clash:
        raise StageError(f"experiment section {name} may not set {', '.join(clash)}: the experiment sets them")
    return build(stage(stage_name).config, {**(defaults or {}), **given, **fixed}, f"experiment section {name}.")


def unit_stage(kind: str, train_stage: str) -> str:
    """The registry stage of a run's unit ``kind``: the generator's training stage for ``train-sit``."""
    return train_stage if kind == "train-sit" else kind


def plan(config: ExperimentConfig) -> Plan:
    """Every unit of the experiment; paths follow the layout under ``config.output``."""
    root = local_path(config.output)
    if root is None:
        raise StageError(f"--output must be a local folder (VAE dirs and the evaluator are local), got {config.output}")
    quiet = {"show_progress": False}
    shards, reference, evaluator = join(root, "shards"), join(root, "reference", "val.npz"), join(root, "evaluator")
    shared: dict[str, Step] = {}
    data = config.images
    if data is None:
        data = join(root, "data")
        shared["synthetic"] = Step("synthetic", "synthetic", _section(
            "synthetic", "synthetic", config.synthetic, {"output": data}, {"val_per_class": 50}))
    elif not Path(data, "val").is_dir():
        raise StageError(f"{data} has no val/ folder: the experiment measures against held-out val images")
    for split in ("train", "val"):
        shared[f"shard-{split}"] = Step(f"shard-{split}", "shard", _section(
            "shard", "shard", config.shard, {"images": data, "output": shards, "split": split, **quiet}))
    shared["make-reference"] = Step("make-reference", "make-reference", _section(
        "make-reference", "reference", config.reference,
        {"shards": shards, "split": "val", "output": reference, **quiet}))
    shared["train-evaluator"] = Step("train-evaluator", "train-evaluator", _section(
        "train-evaluator", "evaluator", config.evaluator, {"shards": shards, "output": evaluator, **quiet}))

    init = {}
    if config.pretrain_vae is not None:
        pre_run, init["vae_ckpt"] = join(root, "pretrain", "vae"), join(root, "pretrain", "vae-ema.safetensors")
        shared["pretrain-vae"] = Step("pretrain-vae", "train-vae", _section(
            "train-vae", "pretrain_vae", {**config.train_vae, **config.pretrain_vae},
            {"shards": shards, "output": pre_run, "align_weight": 0.0, "resume": True, **_teacher(config), **quiet}))
        shared["pretrain-extract"] = Step("pretrain-extract", "extract-ema", stage("extract-ema").config(
            ckpt=pre_run, output=init["vae_ckpt"]))

    inputs = {"shards": shards, "reference": reference, "evaluator": evaluator, "data": data, "init": init}
    truth = config.downstream.get("ground_truth") or (data if "synthetic" in shared else None)
    runs: dict[tuple[str, int], dict[str, Step]] = {}
    for seed in range(config.seeds):
        for arm in ARMS:
            runs[(arm, seed)] = run_steps(config, arm, seed, join(root, arm, f"seed{seed}"), inputs, truth)
    points, borrowed = [], {}
    for point in expand(config.points, config.grid):
        point_config, arm = apply(config, point), f"reals-{point.name}"
        try:
            steps = {seed: run_steps(point_config, arm, seed, join(root, arm, f"seed{seed}"), inputs, truth)
                     for seed in range(config.seeds)}
        except StageError as e:
            raise StageError(f"sweep point {point.name}: {e}") from None
        base, base_root = runs[("reals", 0)], join(root, "reals", "seed0")
        if recorded_configs(steps[0], join(root, arm, "seed0")) == recorded_configs(base, base_root):
            points.append(("reals", point))  # the experiment's own ReaLS arm
            continue
        points.append((arm, point))
        if recorded_configs(_vae_side(steps[0]), join(root, arm, "seed0")) == recorded_configs(_vae_side(base),
                                                                                               base_root):
            for seed in range(config.seeds):  # a generator-only point: the ReaLS arm's VAE side is its own
                borrowed[(arm, seed)] = join(root, "reals", f"seed{seed}")
                steps[seed] = {**run_steps(point_config, arm, seed, join(root, arm, f"seed{seed}"), inputs, truth,
                                           vae_root=borrowed[(arm, seed)]),
                               **_vae_side(runs[("reals", seed)])}
        runs.update({(arm, seed): units for seed, units in steps.items()})
    return Plan(root, shared, runs, points, borrowed)


def _vae_side(units: dict[str, Step]) -> dict[str, Step]:
    return {k: u for k, u in units.items() if k in VAE_SIDE}


def _teacher(config: ExperimentConfig) -> dict:
    return {"teacher": config.teacher, "teacher_input_size": config.teacher_input_size,
            "teacher_weights_dir": config.teacher_weights_dir, "teacher_layer": config.teacher_layer}


def run_steps(config: ExperimentConfig, arm: str, seed: int, r: str, inputs: dict,
              truth: str | None, vae_root: str | None = None) -> dict[str, Step]:
    """The steps of one run (arm ``vae``: align_weight 0) under its folder ``r``: VAE fine-tuning to measurement;
    downstream segmentation and depth when ``truth`` names a folder with ground truth. With ``vae_root``, the
    VAE side (``VAE_SIDE``) lives in that folder instead."""
    quiet = {"show_progress": False}
    train_stage, train_sit, sample = generator_sections(config.train_sit, config.sample, config.sample_dit,
                                                        model=config.model)
    v = vae_root or r
    vae_run, vae_dir, store, sit_run = join(v, "vae"), join(v, "vae-dir"), join(v, "latents"), join(r, "sit")
    samples, shards = join(r, "samples.npz"), inputs["shards"]
    configs = {
        "train-vae": _section("train-vae", "train_vae", config.train_vae, {
            "shards": shards, "output": vae_run, "seed": seed, "resume": True,
            "align_weight": 0.0 if arm == "vae" else config.align_weight, **_teacher(config), **inputs["init"],
            **quiet}),
        "convert": _section("convert", "convert", config.convert, {
            "ckpt": vae_run, "output_dir": vae_dir, "shards": shards, **quiet}),
        "encode": _section("encode", "encode", config.encode, {
            "shards": shards, "vae_path": vae_dir, "output": store, **quiet}, {"workers": 1}),
        "train-sit": _section(train_stage, "train_sit", train_sit, {
            "store": store, "output": sit_run, "seed": seed, "resume": True, **quiet}),
        "sample": _section("sample", "sample", sample, {
            "ckpt": sit_run, "vae_path": vae_dir, "output": samples, "global_seed": seed, **quiet},
            {"mode": "ODE" if train_stage == "train-sit" else "DDPM", "labels": "balanced", "workers": 1}),
        "evaluate": _section("evaluate", "evaluate", config.evaluate, {
            "ref_batch": inputs["reference"], "sample_batch": samples, "output": join(r, "metrics.json"), **quiet}),
        "assess": _section("assess", "assess", config.assess, {
            "evaluator": inputs["evaluator"], "ref_batch": inputs["reference"], "sample_batch": samples,
            "vae_path": vae_dir, "output": join(r, "assessment.json")}),
    }
    if truth:
        configs["downstream"] = _section("downstream", "downstream", config.downstream, {
            "images": inputs["data"], "vae_path": vae_dir, "output": join(v, "downstream"), **quiet},
            {"tasks": ["seg", "depth"], "ground_truth": truth})
    return {kind: Step(f"{arm}-seed{seed}-{kind}", unit_stage(kind, train_stage), c) for kind, c in configs.items()}


# ---------------------------------------------------------------------------------------------------
# Running units on Ray, with records
# ---------------------------------------------------------------------------------------------------

def refuse_changed(units: list[Step], root: str) -> None:
    """Raise when a unit was recorded with other settings: its outputs would not match its config."""
    for u in units:
        rec = read_json(record_url(root, u, RECORDS))
        if rec is not None and not same_config(rec["config"], u):
            diffs = config_differences(rec["config"], u.config.model_dump(mode="json"))
            raise StageError(f"{u.name} under {root} was run with other settings ({', '.join(diffs)}); use another "
                             f"--output, or delete its outputs and records/{u.name}.json")


def run_unit(unit: Step, root: str) -> dict:
    """Run one unit in this process (one torch thread) and write its record last; errors come back as text."""
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    try:
        summary = stage(unit.stage).run(unit.config)
    except Exception as e:  # noqa: BLE001 - reported per unit by the driver, the other units go on
        return {"name": unit.name, "error": f"{type(e).__name__}: {e}"}
    return write_record(root, unit, time.perf_counter() - t0, summary, RECORDS)


class _Submitter:
    """``remote(unit)`` starts the unit's Ray task with the unit's CPUs (what ``map_units`` calls)."""

    def __init__(self, root: str):
        import ray

        self.root, self.fn = root, ray.remote(max_retries=0)(run_unit)  # map_units re-submits lost units

    def remote(self, unit: Step):
        return self.fn.options(num_cpus=cpus(unit)).remote(unit, self.root)


def run_phase(units: list[Step], root: str, description: str, show_progress: bool, counts: dict) -> dict[str, dict]:
    """Run the units not yet recorded with the same config (in parallel on Ray); their records by name."""
    from pipelines.parallel import map_units

    records, todo = {}, []
    for u in units:
        rec = recorded(root, u, RECORDS)
        if rec is not None:
            records[u.name] = rec
        else:
            todo.append(u)
    counts["reused"] += len(records)
    if todo:
        import ray

        drivers = sum(cpus(u) == 0 for u in todo)
        limit = int(ray.cluster_resources().get("CPU", 1)) if drivers else None
        results = map_units(_Submitter(root), todo, f"{description} ({len(todo)})", max_in_flight=limit,
                            show_progress=show_progress)
        failed = [r for r in results if "error" in r]
        if failed:
            raise StageError(f"{len(failed)} of {len(todo)} {description} units failed (first: {failed[0]['name']}: "
                             f"{failed[0]['error']}); fix it and re-run: finished units are kept")
        records.update({r["name"]: r for r in results})
        counts["run"] += len(todo)
    return records


def phases(p: Plan) -> list[tuple[str, list[Step]]]:
    """The units in dependency order, in phases whose units run in parallel (downstream right after convert: it
    needs only the VAE dir, so a sweep's semantic measures arrive before its generators train)."""
    def per_run(stage: str) -> list[Step]:  # once each: a generator-only point's VAE side is the ReaLS arm's
        return list({units[stage].name: units[stage] for units in p.runs.values() if stage in units}.values())

    def shared(*names: str) -> list[Step]:
        return [p.shared[n] for n in names if n in p.shared]

    first = shared("make-reference", "train-evaluator", "pretrain-vae")
    out = [("data", shared("synthetic")), ("shard train", shared("shard-train")), ("shard val", shared("shard-val"))]
    if "pretrain-vae" in p.shared:
        out += [("reference, evaluator, pretrain-vae", first), ("extract-ema", shared("pretrain-extract")),
                ("train-vae", per_run("train-vae"))]
    else:
        out += [("reference, evaluator, train-vae", first + per_run("train-vae"))]
    return out + [("convert", per_run("convert")), ("downstream", per_run("downstream")), ("encode", per_run("encode")),
                  ("train-sit", per_run("train-sit")), ("sample", per_run("sample")),
                  ("evaluate", per_run("evaluate") + per_run("assess"))]


def loss_curves_png(results: dict) -> bytes:
    """The two arms' VAE and generator curves, one line per run (the shared pretraining in grey, the arms'
    fine-tuning steps counted after it); a sweep's points are in sweep.md."""
    runs = [r for r in results["runs"] if r["arm"] in ARMS]
    pre = results["pretrain"]
    offset = pre["steps"] if pre else 0
    vae = [("pretrain", "grey", read_log(join(pre["run"], "log.jsonl")), 0)] if pre else []
    vae += [(f"{r['arm']} seed {r['seed']}", ARM_COLOURS[r["arm"]], read_log(join(r["root"], "vae", "log.jsonl")),
             offset) for r in runs]
    generator = [(f"{r['arm']} seed {r['seed']}", ARM_COLOURS[r["arm"]], read_log(join(r["root"], "sit", "log.jsonl")))
                 for r in runs]
    return experiment_curves(vae, generator, results["runs"][0].get("family", "SiT"))


def run(config: ExperimentConfig) -> ExperimentSummary:
    """Run (or resume) the whole experiment and write results.json, results.md, loss_curves.png."""
    from pipelines.parallel import ensure_ray

    t0 = time.perf_counter()
    p = plan(config)
    refuse_changed(list(p.shared.values()) + [u for units in p.runs.values() for u in units.values()], p.root)
    for arm, seed in p.runs:
        root = p.run_root(arm, seed)
        write_json(join(root, "configs.json"), {"arm": arm, "seed": seed, "run": root,
                                                "vae_side": p.borrowed.get((arm, seed), root),
                                                "stages": p.recorded(arm, seed)})
    check = check_arms(p.root, config.seeds, p.points)
    write_json(join(p.root, "config_check.json"), check)

    ensure_ray()
    counts, records, phase_seconds = {"run": 0, "reused": 0}, {}, {}
    for name, units in phases(p):
        t = time.perf_counter()
        records.update(run_phase(units, p.root, name, config.show_progress, counts))
        phase_seconds[name] = round(time.perf_counter() - t, 2)

    results = collect(p, records, config)
    md = markdown(results, check)
    results.update(config_check=check, phase_seconds=phase_seconds, wall_seconds=round(time.perf_counter() - t0, 2),
                   config=config.model_dump(mode="json"))
    write_json(join(p.root, "results.json"), results)
    write_bytes_atomic(join(p.root, "results.md"), md.encode())
    write_bytes_atomic(join(p.root, "loss_curves.png"), loss_curves_png(results))
    sweep_table, plots = write_sweep(p, results) if p.points else (None, [])
    return ExperimentSummary(
        output=p.root, results=join(p.root, "results.json"), table=join(p.root, "results.md"),
        loss_curves=join(p.root, "loss_curves.png"), markdown=md, seeds=config.seeds, units_run=counts["run"],
        units_reused=counts["reused"], wall_seconds=results["wall_seconds"], phase_seconds=phase_seconds,
        evaluator_val_accuracy=results["evaluator"]["val_accuracy"], paired=results["paired_differences"],
        sweep_table=sweep_table, sweep_plots=plots)


def write_sweep(p: Plan, results: dict) -> tuple[str, list[str]]:
    """sweep.json, sweep.md and one plot per knob (``sweep-<knob>.png``) under the experiment's folder."""
    recorded = config_differences({}, p.recorded("reals", 0))  # dotted key -> [None, value]
    knobs = dict.fromkeys(k for _, point in p.points for k in point.overrides)
    sweep = sweep_results(p.points, results["runs"], results["seeds"],
                          {k: recorded.get(targets(k), [None, None])[1] for k in knobs})
    write_json(join(p.root, "sweep.json"), sweep)
    table = join(p.root, "sweep.md")
    write_bytes_atomic(table, sweep_markdown(sweep["rows"], sweep["baseline"], sweep["seeds"],
                                             results["runs"][0]["family"]).encode())
    plots = []
    for knob, series in knob_series(sweep).items():
        plots.append(join(p.root, f"sweep-{point_name({knob: ''}).rstrip('-')}.png"))
        write_bytes_atomic(plots[-1], sweep_plot(knob, series))
    return table, plots


# ---------------------------------------------------------------------------------------------------
# The Run form: the experiment config with typed sections
# ---------------------------------------------------------------------------------------------------

# Each section of the experiment config and the stages whose fields it holds.
FORM_SECTIONS = {"synthetic": ("synthetic",), "shard": ("shard",), "reference": ("make-reference",),
                 "evaluator": ("train-evaluator",), "train_vae": ("train-vae",), "pretrain_vae": ("train-vae",),
                 "convert": ("convert",), "encode": ("encode",), "train_sit": ("train-sit", "train-dit"),
                 "sample": ("sample",), "sample_dit": ("sample",), "evaluate": ("evaluate",), "assess": ("assess",),
                 "downstream": ("downstream",)}


def _form_model() -> type[BaseModel]:
    """ExperimentConfig with each dict section a typed model of its stage's fields, all optional."""
    fields = {}
    for name, info in ExperimentConfig.model_fields.items():
        if name not in FORM_SECTIONS:
            fields[name] = (info.annotation, copy.copy(info))
            continue
        section = optional_section(f"Experiment{name.title().replace('_', '')}Section",
                                   *(stage(n) for n in FORM_SECTIONS[name]))
        default = info.get_default(call_default_factory=True)
        annotation = section | None if default is None else section
        fields[name] = (annotation, Field(None, description=info.description) if default is None else
                        Field(default_factory=lambda s=section, d=default: s(**d), description=info.description))
    return create_model("ExperimentForm", __base__=BaseModel, __doc__=ExperimentConfig.__doc__,
                        __config__=ConfigDict(extra="forbid", protected_namespaces=()), **fields)


ExperimentForm = _form_model()


def from_form(form: BaseModel) -> ExperimentConfig:
    """The experiment config of a filled form: each section holds the fields given."""
    values = {name: getattr(form, name) for name in type(form).model_fields}
    values = {name: v.given() if isinstance(v, OptionalSection) else v for name, v in values.items()}
    return build(ExperimentConfig, values, "experiment config ")


@flow(name="experiment", log_prints=True)
def experiment_flow(config: ExperimentForm) -> ExperimentSummary:
    """SiT on ReaLS latents vs on a plain VAE's latents over seeds (the driver here; its steps on Ray)."""
    summary = run(from_form(config) if isinstance(config, ExperimentForm) else config)
    artifacts.experiment_artifacts(summary)
    return summary
