"""The experiment's plan: the chain's plan (``pipelines.chain``) for every (arm, seed), plus the steps they share.

The shared steps (data, shards of both splits, the reference batch, the domain evaluator, an optional shared
VAE pretraining) are planned under the experiment's folder; each run's steps (VAE to measurement) under
``<arm>/seed<N>``, at the same relative paths as ``reals pipeline`` writes them, reading the shared outputs. A
sweep point that changes only the generator borrows the ReaLS arm's VAE side (its VAE, latents and semantic
measures) instead of repeating it. ``phases`` orders every step by what it reads; how they run is the executor's.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from pipelines import StageError
from pipelines.chain import (Layout, Step, chain_records, defaults, outputs, phases as chain_phases,
                             plan as chain_plan, produced, read_roles)
from pipelines.experiment import ExperimentConfig, recorded_configs
from pipelines.generator import generator_sections
from pipelines.registry import stage
from pipelines.sweep import Point, apply, expand
from storage.fs import join, local_path

QUIET = {"show_progress": False}
SHARED = ("synthetic", "shard", "make-reference", "train-evaluator")
# A run's steps up to its latents and its semantic measures: everything its generator reads.
VAE_SIDE = ("train-vae", "convert", "encode", "downstream")


@dataclass(frozen=True)
class Plan:
    root: str
    shared: dict[str, Step]
    runs: dict[tuple[str, int], dict[str, Step]]  # (arm, seed) -> kind (the stage; generator for SiT/DiT) -> step
    points: list[tuple[str, Point]] = ()  # sweep points and their arms ("reals" where a point is the ReaLS arm)
    borrowed: dict[tuple[str, int], str] = field(default_factory=dict)  # (arm, seed) -> whose VAE side it uses

    def run_root(self, arm: str, seed: int) -> str:
        return join(self.root, arm, f"seed{seed}")

    def recorded(self, arm: str, seed: int) -> dict:
        """The run's stage configs with its own folder, and the one it borrows its VAE side from, as ``<run>``."""
        roots = [self.run_root(arm, seed)] + [r for r in [self.borrowed.get((arm, seed))] if r]
        return recorded_configs(self.runs[(arm, seed)], *roots)

    def steps(self) -> list[Step]:
        """Every step once (a borrowed VAE side is the ReaLS arm's own)."""
        every = list(self.shared.values()) + [s for steps in self.runs.values() for s in steps.values()]
        return list({s.name: s for s in every}.values())


@cache
def _chain_roles() -> frozenset[str]:
    """The roles the chain's stages write (``shards/{split}`` as a template)."""
    return frozenset(o.role for r in chain_records() for f in r.writes for o in outputs(r, f))


def _filled(role: str, provided: Iterable[str]) -> bool:
    """Whether the plan fills a field that reads ``role``: a chain stage writes it, or it is ``provided``."""
    return role in provided or any(role == w or ("{" in w and role.startswith(w.split("{")[0]))
                                   for w in _chain_roles())


def _refuse_fixed(name: str, given: dict, fixed: dict, record, provided: Iterable[str] = ()) -> None:
    """An experiment section may not set what the experiment sets: the values of ``fixed``, where the stage writes,
    and what it reads that the plan fills (a stage's own input, such as ``train_vae.vae_ckpt`` without a
    pretraining, may be given)."""
    values = {**defaults(record), **given}
    reads = {f for f in record.reads if any(_filled(r, provided) for r in read_roles(record, f, values))}
    clash = sorted(set(given) & (set(fixed) | reads | set(record.writes)))
    if clash:
        raise StageError(f"experiment section {name} may not set {', '.join(clash)}: the experiment sets them")


def _sections(config: ExperimentConfig, names: dict[str, str], fixed: dict[str, dict],
              provided: Iterable[str] = ()) -> dict[str, dict]:
    """The chain sections from the experiment's (``names``: chain section -> experiment section), checked."""
    out = {}
    for chain_section, name in names.items():
        given = getattr(config, name)
        record = next(r for r in chain_records() if r.chain.section == chain_section)
        _refuse_fixed(name, given, fixed.get(chain_section, {}), record, provided)
        out[chain_section] = given
    return out


def _teacher(config: ExperimentConfig) -> dict:
    return {"teacher": config.teacher, "teacher_input_size": config.teacher_input_size,
            "teacher_weights_dir": config.teacher_weights_dir, "teacher_layer": config.teacher_layer}


def shared_steps(config: ExperimentConfig, root: str) -> tuple[dict[str, Step], dict[str, str]]:
    """The steps every run reads from, by name, and what they provide (role -> URL)."""
    data = config.images
    if data is not None and not Path(data, "val").is_dir():
        raise StageError(f"{data} has no val/ folder: the experiment measures against held-out val images")
    names = {"shard": "shard", "make_reference": "reference", "train_evaluator": "evaluator"}
    fixed = {section: dict(QUIET) for section in ("shard", "make_reference", "train_evaluator")}
    sections = _sections(config, names, fixed)
    sections["synthetic"] = {"val_per_class": 50, **config.synthetic} if data is None else None
    steps = chain_plan(Layout(root, root), sections, provided={"images": data} if data else {}, only=SHARED,
                       targets={"make-reference", "train-evaluator"}, fixed=fixed, what="experiment section")
    shared = {s.name: s for s in steps}
    provides = {role: url for s in steps for role, url in produced(s).items()}
    if config.pretrain_vae is not None:
        shared.update(_pretrain(config, root, provides))
        provides["vae_weights"] = shared["pretrain-extract"].config.output  # what every run's VAE starts from
    return shared, provides


def _pretrain(config: ExperimentConfig, root: str, provides: dict[str, str]) -> dict[str, Step]:
    """One VAE trained without alignment, and its EMA weights, which every run's VAE starts from."""
    where = Layout(join(root, "pretrain"), None)
    values = {**config.train_vae, **config.pretrain_vae}
    _refuse_fixed("pretrain_vae", values, {"align_weight": 0}, stage("train-vae"))
    vae, = chain_plan(where, {"train_vae": values}, provided=provides, only={"train-vae"}, targets={"train-vae"},
                      what="experiment section",
                      fixed={"train_vae": {"align_weight": 0.0, "resume": True, **_teacher(config), **QUIET}})
    run = vae.config.output
    extract = stage("extract-ema")
    weights = extract.config(ckpt=run, output=where.path(extract.writes["output"], {}))
    return {"pretrain-vae": Step("pretrain-vae", vae.stage, vae.config, ("shard-train",)),
            "pretrain-extract": Step("pretrain-extract", "extract-ema", weights, ("pretrain-vae",))}


def kind(step: Step) -> str:
    """A run's step by the stage it runs; ``generator`` for the generator, whichever family trains it."""
    return "generator" if stage(step.stage).chain.section == "generator" else step.stage


def run_steps(config: ExperimentConfig, arm: str, seed: int, root: str, provides: dict[str, str],
              shared: dict[str, Step], truth: str | None, vae_side: dict[str, Step] | None = None) -> dict[str, Step]:
    """The steps of one run (arm ``vae``: align_weight 0) under its folder ``root``, by kind: VAE fine-tuning to
    measurement; downstream segmentation and depth when ``truth`` names a folder with ground truth. With
    ``vae_side`` (another run's VAE side), its outputs are read and its steps are this run's."""
    train_stage, generator, sample = generator_sections(config.generator, config.sample, config.sample_dit,
                                                        model=config.model)
    fixed = {"train_vae": {"seed": seed, "resume": True, **_teacher(config), **QUIET,
                           "align_weight": 0.0 if arm == "vae" else config.align_weight},
             "convert": dict(QUIET), "encode": dict(QUIET), "generator": {"seed": seed, "resume": True, **QUIET},
             "sample": {"global_seed": seed, **QUIET}, "evaluate": dict(QUIET), "assess": {},
             "downstream": {"samples": None, **QUIET}}
    names = {"train_vae": "train_vae", "convert": "convert", "encode": "encode", "evaluate": "evaluate",
             "assess": "assess", "downstream": "downstream"}
    sections = _sections(config, names, fixed, provides)
    _refuse_fixed("generator", generator, fixed["generator"], stage(train_stage))
    _refuse_fixed("sample", sample, fixed["sample"], stage("sample"))
    sections["encode"] = {"workers": 1, **sections["encode"]}
    sections["generator"] = generator
    sections["sample"] = {"mode": "ODE" if train_stage == "train-sit" else "DDPM", "labels": "balanced", "workers": 1,
                          **sample}
    sections["downstream"] = {"tasks": ["seg", "depth"], "ground_truth": truth, **sections["downstream"]}
    targets = {"evaluate", "assess"} | ({"downstream"} if truth and vae_side is None else set())
    inputs = dict(provides)
    if vae_side is not None:
        inputs.update({r: u for s in vae_side.values() for r, u in produced(s).items()})
    steps = chain_plan(Layout(root, root), sections, provided=inputs, choose={"generator": train_stage},
                       only=(*VAE_SIDE, train_stage, "sample", "evaluate", "assess"), targets=targets, fixed=fixed,
                       what="experiment section")
    named = {s.name: f"{arm}-seed{seed}-{kind(s)}" for s in steps}
    sources = {role: name for name, s in shared.items() for role in produced(s)}
    if vae_side is not None:
        sources.update({role: s.name for s in vae_side.values() for role in produced(s)})
    out = {}
    for s in steps:
        record, values = stage(s.stage), s.config.model_dump()
        read = {r for f in record.reads for r in read_roles(record, f, values)}
        after = [named[a] for a in s.after] + sorted({sources[r] for r in read if r in sources and r in inputs})
        out[kind(s)] = Step(named[s.name], s.stage, s.config, tuple(after))
    return {**out, **(vae_side or {})}


def plan(config: ExperimentConfig) -> Plan:
    """Every step of the experiment; paths follow the pipeline's layout under ``config.output``."""
    root = local_path(config.output)
    if root is None:
        raise StageError(f"--output must be a local folder (VAE dirs and the evaluator are local), got {config.output}")
    shared, provides = shared_steps(config, root)
    truth = config.downstream.get("ground_truth") or (provides["images"] if "synthetic" in shared else None)
    runs: dict[tuple[str, int], dict[str, Step]] = {}
    for seed in range(config.seeds):
        for arm in ("vae", "reals"):
            runs[(arm, seed)] = run_steps(config, arm, seed, join(root, arm, f"seed{seed}"), provides, shared, truth)
    points, borrowed = [], {}
    for point in expand(config.points, config.grid):
        point_config, arm = apply(config, point), f"reals-{point.name}"
        try:
            steps = {seed: run_steps(point_config, arm, seed, join(root, arm, f"seed{seed}"), provides, shared,
                                     truth) for seed in range(config.seeds)}
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
                steps[seed] = run_steps(point_config, arm, seed, join(root, arm, f"seed{seed}"), provides, shared,
                                        truth, vae_side=_vae_side(runs[("reals", seed)]))
        runs.update({(arm, seed): s for seed, s in steps.items()})
    return Plan(root, shared, runs, points, borrowed)


def _vae_side(steps: dict[str, Step]) -> dict[str, Step]:
    return {k: s for k, s in steps.items() if k in VAE_SIDE}


def phase_namer(p: Plan):
    """A phase's name: the kinds of its steps (a shared step by its name)."""
    kinds = {s.name: k for steps in p.runs.values() for k, s in steps.items()}
    return lambda phase: ", ".join(dict.fromkeys(kinds.get(s.name, s.name) for s in phase))


def phases(p: Plan) -> list[tuple[str, list[Step]]]:
    """Every step in phases whose steps read only from earlier phases (downstream right after convert: it reads
    only the VAE dir, so a sweep's semantic measures arrive before its generators train), each with its name."""
    name = phase_namer(p)
    return [(name(phase), phase) for phase in chain_phases(p.steps())]
