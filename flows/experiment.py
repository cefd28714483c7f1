"""The controlled experiment (``reals experiment``): its plan's steps run as Ray tasks, then its results.

What is compared, and how, is in ``pipelines.experiment``; its steps in ``pipelines.experiment_plan`` (the
chain's plan for every arm and seed). Here the ``RayTasks`` executor runs them phase by phase, each phase's
steps in parallel with one torch thread (a Ray-driver stage's task reserves no CPU: its own tasks or actors take
them). A finished step writes its record to ``records/<step>.json`` last; a re-run reuses the steps recorded with
the same config, refuses to start when a step was recorded with other settings, and every stage skips its own
finished work.
"""
from __future__ import annotations

import copy
import time

from prefect import flow
from pydantic import BaseModel, ConfigDict, Field, create_model

from flows import artifacts
from flows.executors import RayTasks
from pipelines.checkpoints import read_log
from pipelines.config import build
from pipelines.experiment import (ARMS, FORM_SECTIONS, ExperimentConfig, ExperimentSummary, check_arms, collect,
                                  config_differences, markdown)
from pipelines.experiment_plan import Plan, phase_namer, plan
from pipelines.registry import stage
from pipelines.render import ARM_COLOURS, experiment_curves, sweep_plot
from pipelines.sections import OptionalSection, optional_section
from pipelines.sweep import collect as sweep_results, knob_series, markdown as sweep_markdown, point_name, targets
from storage.fs import join, write_bytes_atomic
from storage.markers import write_json


def loss_curves_png(results: dict) -> bytes:
    """The two arms' VAE and generator curves, one line per run (the shared pretraining in grey, the arms'
    fine-tuning steps counted after it); a sweep's points are in sweep.md."""
    runs = [r for r in results["runs"] if r["arm"] in ARMS]
    pre = results["pretrain"]
    offset = pre["steps"] if pre else 0
    vae = [("pretrain", "grey", read_log(join(pre["run"], "log.jsonl")), 0)] if pre else []
    vae += [(f"{r['arm']} seed {r['seed']}", ARM_COLOURS[r["arm"]], read_log(join(r["vae_run"], "log.jsonl")),
             offset) for r in runs]
    generator = [(f"{r['arm']} seed {r['seed']}", ARM_COLOURS[r["arm"]],
                  read_log(join(r["generator_run"], "log.jsonl"))) for r in runs]
    return experiment_curves(vae, generator, results["runs"][0].get("family", "SiT"))


def run(config: ExperimentConfig) -> ExperimentSummary:
    """Run (or resume) the whole experiment and write results.json, results.md, loss_curves.png."""
    t0 = time.perf_counter()
    p = plan(config)
    executor = RayTasks(p.root, config.show_progress, describe=phase_namer(p))
    executor.refuse_changed(p.steps())
    for arm, seed in p.runs:
        root = p.run_root(arm, seed)
        write_json(join(root, "configs.json"), {"arm": arm, "seed": seed, "run": root,
                                                "vae_side": p.borrowed.get((arm, seed), root),
                                                "stages": p.recorded(arm, seed)})
    check = check_arms(p.root, config.seeds, p.points)
    write_json(join(p.root, "config_check.json"), check)
    records = executor.run(p.steps())
    counts, phase_seconds = executor.counts, executor.phase_seconds

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
        loss_curves=join(p.root, "loss_curves.png"), markdown=md, seeds=config.seeds, steps_run=counts["run"],
        steps_reused=counts["reused"], wall_seconds=results["wall_seconds"], phase_seconds=phase_seconds,
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
