"""Stage `experiment`: SiT (or DiT) on ReaLS latents vs on a plain VAE's latents, a controlled experiment (issue 9).

``--model`` picks the generator: a SiT (train-sit, sampled by the ``sample`` section) or a DiT (train-dit on the
``train_sit`` section's settings, sampled by DDPM with the ``sample_dit`` settings in place of the SiT sampler's).

Two arms on the same shards, VAE architecture, VAE steps and seeds, whose configs differ ONLY in the
alignment weight (checked in code from the recorded configs, and written to ``config_check.json``):
``vae``, the baseline (``align_weight 0``: no alignment gradient reaches the latents; the heads still train,
as a probe on detached latents, so the teacher cost and the measured cosine alignment are the same), and
``reals`` (latents aligned to the teacher with ``align_weight``).

VAE initialisation: with a ``pretrain_vae`` section, one plain autoencoder is first trained without
alignment (as the paper starts from SD-VAE) and both arms fine-tune from its EMA weights; without it each
arm trains from scratch. Seeds: for every seed ``s`` each arm trains its own VAE (seed ``s``: data order,
alignment-head init, posterior noise, and the VAE init when there is no pretraining), converts it with its
own latent mean/std, encodes its own latent store, trains the same SiT with seed ``s`` and samples it with
the same sampler, NFE, guidance, labels and noise (``global_seed s``). So a seed is one paired replicate of
the chain, and the difference between arms is shown against the spread over seeds (mean +- std, and the
per-seed paired differences).

Every run is measured against the same held-out reference (the val split): in the domain evaluator's space
(``FD_domain``, ``Precision_domain``/``Recall_domain`` with k=3, ``cond_accuracy``; `reals train-evaluator`,
trained once on the training split), by the evaluate stage (``FD_effnet`` ...; FID/sFID/IS only with the
Inception weights), and for reconstruction (``PSNR``, ``rFD_domain`` of reconstructions vs originals;
``LPIPS`` only when its backbone weights exist).

Units run as Ray tasks with one torch thread each: training units take one CPU; the batch stages (shard,
encode, sample) run their drivers as zero-CPU tasks whose actors take the CPUs. A finished unit writes
``records/<unit>.json`` (its config and summary) last; a re-run skips units whose record holds the same
config, refuses to start when a unit was recorded with other settings, and every stage skips its own
finished work.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, Field

from pipelines import StageError
from pipelines.config import ShowProgress, StageConfig, build, load_yaml
from pipelines.registry import stage
from storage.fs import join, local_path, write_bytes_atomic
from storage.markers import read_json, write_json

PRESETS = Path(__file__).resolve().parents[1] / "configs"
ARMS = ("vae", "reals")
ARM_COLOURS = {"vae": "tab:blue", "reals": "tab:red"}
ALLOWED_DIFFERENCE = "train_vae.align_weight"
METRIC_KEYS = ("FD_domain", "Precision_domain", "Recall_domain", "cond_accuracy", "FD_effnet", "Precision_effnet",
               "Recall_effnet", "PSNR", "rFD_domain")
OPTIONAL_KEYS = ("FID", "sFID", "IS", "Precision", "Recall", "FD_dinov2", "Precision_dinov2", "Recall_dinov2",
                 "LPIPS")
LOWER_IS_BETTER = {"FD_domain", "FD_effnet", "FD_dinov2", "rFD_domain", "FID", "sFID", "LPIPS"}



# ---------------------------------------------------------------------------------------------------
# Configs and summaries
# ---------------------------------------------------------------------------------------------------

class ExperimentConfig(StageConfig):
    """Inputs of `reals experiment`; each stage section holds fields of that stage's config."""

    output: str = Field("runs/experiment", description="local folder for every artifact of the experiment")
    seeds: int = Field(3, ge=1, description="paired replicates: seeds 0..N-1 (one VAE and one SiT per arm and seed)")
    teacher: str = Field("efficientnet_lite0", description="teacher of the ReaLS arm: efficientnet_lite0 (offline), "
                                                           "dinov2_vitb14 (needs its weights), ...")
    teacher_input_size: int | None = Field(None, gt=0, description="teacher input size in px (its grid must fit the "
                                                                   "latent grid; default: the teacher's own)")
    teacher_weights_dir: str | None = Field(None, description="folder holding DINOv2 teacher weights")
    align_weight: float = Field(0.5, gt=0, description="alignment weight of the ReaLS arm (the baseline has 0)")
    data_path: str | None = Field(None, description="ImageNet-layout folder with train/ and val/ (default: a "
                                                    "synthetic dataset written to <output>/data)")
    synthetic: dict = Field(default_factory=dict, description="SyntheticConfig fields")
    shard: dict = Field(default_factory=dict, description="ShardConfig fields (both splits)")
    reference: dict = Field(default_factory=dict, description="MakeReferenceConfig fields (val split)")
    evaluator: dict = Field(default_factory=dict, description="TrainEvaluatorConfig fields")
    train_vae: dict = Field(default_factory=dict, description="TrainVAEConfig fields, the same for both arms")
    pretrain_vae: dict | None = Field(None, description="TrainVAEConfig fields overriding train_vae for one shared "
                                                        "pretraining without alignment that both arms fine-tune "
                                                        "from (None: each arm trains its VAE from scratch)")
    convert: dict = Field(default_factory=dict, description="ConvertConfig fields")
    encode: dict = Field(default_factory=dict, description="EncodeConfig fields")
    model: str | None = Field(None, description="generator, overriding train_sit.model: SiT-* (flow matching) or "
                                                "DiT-* (DDPM, learned variance), e.g. DiT-T/2")
    train_sit: dict = Field(default_factory=dict, description="TrainSiTConfig fields (a DiT: TrainDiTConfig's)")
    sample: dict = Field(default_factory=dict, description="SampleConfig fields")
    sample_dit: dict = Field(default_factory=lambda: {"mode": "DDPM", "num_sampling_steps": 50},
                             description="SampleConfig fields that replace the sample section's sampler settings "
                                         "when the generator is a DiT")
    evaluate: dict = Field(default_factory=dict, description="EvaluateConfig fields")
    assess: dict = Field(default_factory=dict, description="AssessConfig fields (domain space, reconstruction)")
    show_progress: ShowProgress = Field(True, description="show a progress bar per phase")


class ExperimentSummary(BaseModel):
    """What `reals experiment` produced."""

    output: str
    results: str = Field(description="results.json")
    table: str = Field(description="results.md")
    loss_curves: str
    markdown: str
    seeds: int
    units_run: int
    units_reused: int
    wall_seconds: float
    phase_seconds: dict[str, float]
    evaluator_val_accuracy: float
    paired: dict[str, dict] = Field(description="metric -> paired differences (reals - vae) over seeds")


# ---------------------------------------------------------------------------------------------------
# The plan: every unit of the experiment with its config
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Unit:
    """One stage run: its name (and record), stage, config, and the CPUs its Ray task reserves."""

    name: str
    stage: str
    config: StageConfig

    @property
    def cpus(self) -> int:
        """Ray-driver stages reserve no CPU (their own tasks or actors take them); the others one."""
        return 0 if stage(self.stage).runs_on == "ray" else 1


@dataclass(frozen=True)
class Plan:
    root: str
    shared: dict[str, Unit]
    runs: dict[tuple[str, int], dict[str, Unit]]  # (arm, seed) -> stage -> unit

    def run_root(self, arm: str, seed: int) -> str:
        return join(self.root, arm, f"seed{seed}")


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
    shared: dict[str, Unit] = {}
    data = config.data_path
    if data is None:
        data = join(root, "data")
        shared["synthetic"] = Unit("synthetic", "synthetic", _section(
            "synthetic", "synthetic", config.synthetic, {"output": data}, {"val_per_class": 50}))
    elif not Path(data, "val").is_dir():
        raise StageError(f"{data} has no val/ folder: the experiment measures against held-out val images")
    for split in ("train", "val"):
        shared[f"shard-{split}"] = Unit(f"shard-{split}", "shard", _section(
            "shard", "shard", config.shard, {"data_path": data, "output": shards, "split": split, **quiet}))
    shared["make-reference"] = Unit("make-reference", "make-reference", _section(
        "make-reference", "reference", config.reference,
        {"data_path": shards, "split": "val", "output": reference, **quiet}))
    shared["train-evaluator"] = Unit("train-evaluator", "train-evaluator", _section(
        "train-evaluator", "evaluator", config.evaluator, {"data_path": shards, "output": evaluator, **quiet}))

    teacher = {"dino_model": config.teacher, "dino_input_size": config.teacher_input_size,
               "teacher_weights_dir": config.teacher_weights_dir}
    init = {}
    if config.pretrain_vae is not None:
        pre_run, init["vae_ckpt"] = join(root, "pretrain", "vae"), join(root, "pretrain", "vae-ema.safetensors")
        shared["pretrain-vae"] = Unit("pretrain-vae", "train-vae", _section(
            "train-vae", "pretrain_vae", {**config.train_vae, **config.pretrain_vae},
            {"data_path": shards, "output": pre_run, "align_weight": 0.0, "resume": True, **teacher, **quiet}))
        shared["pretrain-extract"] = Unit("pretrain-extract", "extract-ema", stage("extract-ema").config(
            ckpt=pre_run, output=init["vae_ckpt"]))

    from pipelines.generator import generator_sections

    train_stage, train_sit, sample = generator_sections(config.train_sit, config.sample, config.sample_dit,
                                                        model=config.model)
    runs: dict[tuple[str, int], dict[str, Unit]] = {}
    for seed in range(config.seeds):
        for arm in ARMS:
            r = join(root, arm, f"seed{seed}")
            vae_run, vae_dir, store, sit_run = join(r, "vae"), join(r, "vae-dir"), join(r, "latents"), join(r, "sit")
            samples, name = join(r, "samples.npz"), f"{arm}-seed{seed}"
            configs = {
                "train-vae": _section("train-vae", "train_vae", config.train_vae, {
                    "data_path": shards, "output": vae_run, "seed": seed, "resume": True,
                    "align_weight": 0.0 if arm == "vae" else config.align_weight, **teacher, **init, **quiet}),
                "convert": _section("convert", "convert", config.convert, {
                    "ckpt": vae_run, "output_dir": vae_dir, "data_path": shards, **quiet}),
                "encode": _section("encode", "encode", config.encode, {
                    "data_path": shards, "vae_path": vae_dir, "output": store, **quiet}, {"workers": 1}),
                "train-sit": _section(train_stage, "train_sit", train_sit, {
                    "data_path": store, "output": sit_run, "seed": seed, "resume": True, **quiet}),
                "sample": _section("sample", "sample", sample, {
                    "ckpt": sit_run, "vae_path": vae_dir, "output": samples, "global_seed": seed, **quiet},
                    {"mode": "ODE" if train_stage == "train-sit" else "DDPM", "labels": "balanced", "workers": 1}),
                "evaluate": _section("evaluate", "evaluate", config.evaluate, {
                    "ref_batch": reference, "sample_batch": samples, "output": join(r, "metrics.json"), **quiet}),
                "assess": _section("assess", "assess", config.assess, {
                    "evaluator": evaluator, "ref_batch": reference, "sample_batch": samples, "vae_path": vae_dir,
                    "output": join(r, "assessment.json")}),
            }
            runs[(arm, seed)] = {kind: Unit(f"{name}-{kind}", unit_stage(kind, train_stage), c)
                                 for kind, c in configs.items()}
    return Plan(root, shared, runs)


# ---------------------------------------------------------------------------------------------------
# The one permitted difference between the arms
# ---------------------------------------------------------------------------------------------------

def _flatten(obj, prefix: str = "") -> dict:
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: obj}


def config_differences(a: dict, b: dict) -> dict[str, list]:
    """``{dotted key: [value in a, value in b]}`` for every leaf where two nested configs differ."""
    fa, fb = _flatten(a), _flatten(b)
    return {k: [fa.get(k), fb.get(k)] for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)}


def recorded_configs(units: dict[str, Unit], run_root: str) -> dict:
    """A run's stage configs as JSON, its own folder written ``<run>`` (section names as in ExperimentConfig)."""
    configs = {u.stage.replace("-", "_"): u.config.model_dump(mode="json") for u in units.values()}
    return json.loads(json.dumps(configs, sort_keys=True).replace(run_root, "<run>"))


def check_arms(root: str, seeds: int) -> dict:
    """Compare the two arms' recorded configs seed by seed; raise unless they differ only in the alignment weight."""
    report = {"allowed": ALLOWED_DIFFERENCE, "seeds": {}}
    for seed in range(seeds):
        base, aligned = (read_json(join(root, arm, f"seed{seed}", "configs.json")) for arm in ARMS)
        if base is None or aligned is None:
            raise StageError(f"recorded configs of seed {seed} are missing under {root}")
        diffs = config_differences(base["stages"], aligned["stages"])
        baseline, aligned_weight = diffs.get(ALLOWED_DIFFERENCE, [None, None])
        if set(diffs) != {ALLOWED_DIFFERENCE} or baseline != 0 or not aligned_weight > 0:
            raise StageError(f"the arms of seed {seed} must differ only in {ALLOWED_DIFFERENCE} (0 vs > 0); they "
                             f"differ in {json.dumps(diffs)}")
        report["seeds"][str(seed)] = diffs
    report["ok"] = True
    return report


# ---------------------------------------------------------------------------------------------------
# Running units on Ray, with records
# ---------------------------------------------------------------------------------------------------

def _record_url(root: str, unit: Unit) -> str:
    return join(root, "records", f"{unit.name}.json")


def refuse_changed(units: list[Unit], root: str) -> None:
    """Raise when a unit was recorded with other settings: its outputs would not match its config."""
    for u in units:
        rec = read_json(_record_url(root, u))
        if rec is not None and rec["config"] != u.config.model_dump(mode="json"):
            diffs = config_differences(rec["config"], u.config.model_dump(mode="json"))
            raise StageError(f"{u.name} under {root} was run with other settings ({', '.join(diffs)}); use another "
                             f"--output, or delete its outputs and records/{u.name}.json")


def run_unit(unit: Unit, root: str) -> dict:
    """Run one unit in this process (one torch thread) and write its record last; errors come back as text."""
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    try:
        summary = stage(unit.stage).run(unit.config)
    except Exception as e:  # noqa: BLE001 - reported per unit by the driver, the other units go on
        return {"name": unit.name, "error": f"{type(e).__name__}: {e}"}
    record = {"name": unit.name, "stage": unit.stage, "config": unit.config.model_dump(mode="json"),
              "summary": summary.model_dump(mode="json"), "seconds": round(time.perf_counter() - t0, 2),
              "finished": time.time()}
    write_json(_record_url(root, unit), record)
    return record


class _Submitter:
    """``remote(unit)`` starts the unit's Ray task with the unit's CPUs (what ``map_units`` calls)."""

    def __init__(self, root: str):
        import ray

        self.root, self.fn = root, ray.remote(max_retries=0)(run_unit)  # map_units re-submits lost units

    def remote(self, unit: Unit):
        return self.fn.options(num_cpus=unit.cpus).remote(unit, self.root)


def run_phase(units: list[Unit], root: str, description: str, show_progress: bool, counts: dict) -> dict[str, dict]:
    """Run the units not yet recorded with the same config (in parallel on Ray); their records by name."""
    from pipelines.parallel import map_units

    records, todo = {}, []
    for u in units:
        rec = read_json(_record_url(root, u))
        if rec is not None and rec["config"] == u.config.model_dump(mode="json"):
            records[u.name] = rec
        else:
            todo.append(u)
    counts["reused"] += len(records)
    if todo:
        import ray

        drivers = sum(u.cpus == 0 for u in todo)
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


# ---------------------------------------------------------------------------------------------------
# Results: table, paired differences, loss curves
# ---------------------------------------------------------------------------------------------------

def _stats(values: list[float]) -> dict:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "values": a.tolist()}


def _fmt(x: float) -> str:
    if x == 0 or not math.isfinite(x):
        return f"{x:g}"
    return f"{x:.3f}" if abs(x) < 100 else f"{x:.1f}"


def _params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"


def collect(plan_: Plan, records: dict[str, dict], config: ExperimentConfig) -> dict:
    """results.json: per-run metrics, per-arm mean/std, paired differences (reals - vae) per seed."""
    runs = []
    for (arm, seed), units in plan_.runs.items():
        rec = {stage: records[u.name]["summary"] for stage, u in units.items()}
        metrics = {k: float(v["value"]) for k, v in rec["evaluate"]["metrics"].items()}
        metrics.update(rec["assess"]["metrics"])
        runs.append({
            "arm": arm, "seed": seed, "root": plan_.run_root(arm, seed), "metrics": metrics,
            "model": rec["train-sit"]["model"], "family": rec["train-sit"]["family"], "sit_parameters": rec["train-sit"]["parameters"],
            "vae_parameters": rec["assess"]["vae_parameters"], "vae_steps": rec["train-vae"]["steps"],
            "sit_steps": rec["train-sit"]["steps"], "nfe": rec["sample"]["nfe"], "samples": rec["sample"]["num_samples"],
            "vae_final": rec["train-vae"]["final"], "sit_final_loss": rec["train-sit"]["final_loss"],
            "teacher": rec["train-vae"]["teacher"], "alignment": rec["train-vae"]["alignment"],
            "latent_shape": rec["train-vae"]["latent_shape"], "noise_to_signal": rec["assess"]["noise_to_signal"],
            "notes": rec["assess"]["notes"] + rec["evaluate"]["notes"],
        })
    keys = [k for k in METRIC_KEYS + OPTIONAL_KEYS if all(k in r["metrics"] for r in runs)]
    arms = {}
    for arm in ARMS:
        mine = sorted((r for r in runs if r["arm"] == arm), key=lambda r: r["seed"])
        arms[arm] = {"metrics": {k: _stats([r["metrics"][k] for r in mine]) for k in keys},
                     "vae_final": {k: _stats([r["vae_final"][k] for r in mine]) for k in ("rec", "patch_cos", "global_cos")
                                   if all(k in r["vae_final"] for r in mine)},
                     "max_noise_to_signal": _stats([max(r["noise_to_signal"]) for r in mine])}
    by = {(r["arm"], r["seed"]): r["metrics"] for r in runs}
    paired = {}
    for k in keys:
        diffs = [by[("reals", s)][k] - by[("vae", s)][k] for s in range(config.seeds)]
        lower = k in LOWER_IS_BETTER
        paired[k] = {**_stats(diffs), "better": "lower" if lower else "higher",
                     "reals_better_in": sum((d < 0) if lower else (d > 0) for d in diffs), "of": len(diffs)}
    evaluator = records["train-evaluator"]["summary"]
    notes = sorted({n for r in runs for n in r["notes"] if n})
    pretrain = records["pretrain-vae"]["summary"] if "pretrain-vae" in records else None
    return {"runs": runs, "arms": arms, "paired_differences": paired, "metric_keys": keys, "seeds": config.seeds,
            "evaluator": evaluator, "teacher": config.teacher, "align_weight": config.align_weight,
            "pretrain": pretrain and {"steps": pretrain["steps"], "final": pretrain["final"], "run": pretrain["output"]},
            "notes": notes}


def markdown(results: dict, check: dict) -> str:
    """The paper-shaped table (model, VAE, params, steps, metrics as mean +- std), paired differences, notes."""
    keys, runs = results["metric_keys"], results["runs"]
    first = {arm: next(r for r in runs if r["arm"] == arm) for arm in ARMS}
    label = {"vae": "VAE (align_weight 0)",
             "reals": f"ReaLS ({results['teacher']}, align_weight {results['align_weight']:g})"}
    arrows = {k: "↓" if k in LOWER_IS_BETTER else "↑" for k in keys}
    pre = results["pretrain"]
    vae_steps = (lambda n: f"{pre['steps']}+{n}") if pre else str
    family = first["vae"]["family"]
    head = ["Model", "VAE", f"Params ({family} / VAE)", f"Steps (VAE / {family})", "NFE"] + [k + arrows[k] for k in keys]
    lines = [f"## {family} on ReaLS latents vs on plain VAE latents ({results['seeds']} seeds, mean ± std)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm in ARMS:
        r, m = first[arm], results["arms"][arm]["metrics"]
        cells = [r["model"], label[arm], f"{_params(r['sit_parameters'])} / {_params(r['vae_parameters'])}",
                 f"{vae_steps(r['vae_steps'])} / {r['sit_steps']}", str(r["nfe"])]
        cells += [f"{_fmt(m[k]['mean'])} ± {_fmt(m[k]['std'])}" for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    seeds = range(results["seeds"])
    lines += ["", f"### Paired differences, ReaLS − VAE (same seed: same data order, init seed, {family} seed, "
              "noise)", "",
              "| metric | mean ± std | " + " | ".join(f"seed {s}" for s in seeds) + " | ReaLS better in |",
              "|" + "---|" * (results["seeds"] + 3)]
    for k in keys:
        p = results["paired_differences"][k]
        lines.append(f"| {k}{arrows[k]} | {_fmt(p['mean'])} ± {_fmt(p['std'])} | "
                     + " | ".join(_fmt(v) for v in p["values"]) + f" | {p['reals_better_in']} of {p['of']} |")
    ev, key = results["evaluator"], check["allowed"]
    per_seed = ", ".join(f"seed {s}: {d[key][0]:g} vs {d[key][1]:g}" for s, d in check["seeds"].items())
    lines += ["", "### VAE training (last logging interval, mean ± std over seeds)", "",
              "| arm | rec (L1) | patch_cos | global_cos | posterior noise/signal (worst channel) |", "|---|---|---|---|---|"]
    for arm in ARMS:
        f, n = results["arms"][arm]["vae_final"], results["arms"][arm]["max_noise_to_signal"]
        lines.append(f"| {arm} | " + " | ".join(f"{_fmt(f[k]['mean'])} ± {_fmt(f[k]['std'])}" if k in f else "n/a"
                                               for k in ("rec", "patch_cos", "global_cos"))
                     + f" | {_fmt(n['mean'])} ± {_fmt(n['std'])} |")
    init = (f"both arms fine-tune from one shared autoencoder pretrained {pre['steps']} steps without alignment "
            "(VAE steps read pretraining+fine-tuning)" if pre else "each arm trains its VAE from scratch (init seed = "
            "run seed)")
    lines += ["", "### Notes", "",
              f"- Domain evaluator: {ev['num_classes']}-class CNN trained on the training split ({ev['steps']} steps); "
              f"held-out val accuracy {ev['val_accuracy']:.3f} on {ev['val_images']} images (chance {ev['chance']:.3f}). "
              "FD_domain is a Frechet distance in its penultimate features; cond_accuracy is the share of samples it "
              "assigns to their conditioning class.",
              "- FD_* are Frechet distances in the named feature space, not FID, and not comparable with published FID.",
              f"- VAE init: {init}.",
              f"- patch_cos/global_cos of the VAE arm come from its probe heads (trained on detached latents). {family} "
              "losses (loss_curves.png) are in each arm's own normalised latent space: not comparable across arms.",
              "- Posterior noise/signal = E[posterior var] / Var(posterior mean) of a latent channel on the reference "
              f"images: {family} trains on posterior samples, so a channel above 1 is mostly noise in its latents.",
              f"- Config check: the arms' recorded configs differ only in `{key}` ({per_seed})."]
    lines += [f"- {n}" for n in results["notes"]]
    return "\n".join(lines) + "\n"


def loss_curves_png(results: dict) -> bytes:
    """VAE reconstruction loss, VAE patch cosine to the teacher and SiT loss per step, one line per run
    (the shared pretraining in grey, the arms' fine-tuning steps counted after it)."""
    import io

    from matplotlib.figure import Figure

    from pipelines.checkpoints import read_log

    pre = results["pretrain"]
    offset = pre["steps"] if pre else 0
    curves = [("pretrain", "grey", pre["run"], 0)] if pre else []
    curves += [(f"{r['arm']} seed {r['seed']}", ARM_COLOURS[r["arm"]], join(r["root"], "vae"), offset)
               for r in results["runs"]]
    panels = (("rec", "VAE reconstruction loss (L1)"), ("patch_cos", "VAE patch cosine to the teacher"))
    fig = Figure(figsize=(16, 4))
    axes = fig.subplots(1, 3)
    for ax, (key, title) in zip(axes, panels):
        for label, colour, run, start in curves:
            pts = [(start + e["step"], e[key]) for e in read_log(join(run, "log.jsonl")) if key in e]
            if pts:
                ax.plot(*zip(*pts), color=colour, alpha=0.8, linewidth=1.1, label=label)
        ax.set(xlabel="VAE step", title=title)
    for r in results["runs"]:
        pts = [(e["step"], e["loss"]) for e in read_log(join(r["root"], "sit", "log.jsonl")) if "loss" in e]
        if pts:
            axes[2].plot(*zip(*pts), color=ARM_COLOURS[r["arm"]], alpha=0.8, linewidth=1.1,
                         label=f"{r['arm']} seed {r['seed']}")
    family = results["runs"][0].get("family", "SiT")
    axes[2].set(xlabel=f"{family} step", title="DiT loss (MSE + VLB)" if family == "DiT" else "SiT flow-matching loss")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------
# Stage
# ---------------------------------------------------------------------------------------------------

def phases(p: Plan) -> list[tuple[str, list[Unit]]]:
    """The units in dependency order, in phases whose units run in parallel."""
    def per_run(stage: str) -> list[Unit]:
        return [units[stage] for units in p.runs.values()]

    def shared(*names: str) -> list[Unit]:
        return [p.shared[n] for n in names if n in p.shared]

    first = shared("make-reference", "train-evaluator", "pretrain-vae")
    out = [("data", shared("synthetic")), ("shard train", shared("shard-train")), ("shard val", shared("shard-val"))]
    if "pretrain-vae" in p.shared:
        out += [("reference, evaluator, pretrain-vae", first), ("extract-ema", shared("pretrain-extract")),
                ("train-vae", per_run("train-vae"))]
    else:
        out += [("reference, evaluator, train-vae", first + per_run("train-vae"))]
    return out + [("convert", per_run("convert")), ("encode", per_run("encode")), ("train-sit", per_run("train-sit")),
                  ("sample", per_run("sample")), ("evaluate", per_run("evaluate") + per_run("assess"))]


def run(config: ExperimentConfig) -> ExperimentSummary:
    """Run (or resume) the whole experiment and write results.json, results.md, loss_curves.png."""
    from pipelines.parallel import ensure_ray

    t0 = time.perf_counter()
    p = plan(config)
    refuse_changed(list(p.shared.values()) + [u for units in p.runs.values() for u in units.values()], p.root)
    for (arm, seed), units in p.runs.items():
        root = p.run_root(arm, seed)
        write_json(join(root, "configs.json"), {"arm": arm, "seed": seed, "run": root,
                                                "stages": recorded_configs(units, root)})
    check = check_arms(p.root, config.seeds)
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
    return ExperimentSummary(
        output=p.root, results=join(p.root, "results.json"), table=join(p.root, "results.md"),
        loss_curves=join(p.root, "loss_curves.png"), markdown=md, seeds=config.seeds, units_run=counts["run"],
        units_reused=counts["reused"], wall_seconds=results["wall_seconds"], phase_seconds=phase_seconds,
        evaluator_val_accuracy=results["evaluator"]["val_accuracy"], paired=results["paired_differences"])


def preset(quick: bool = False) -> str:
    """The YAML of the default run, or of ``--quick``."""
    return str(PRESETS / ("experiment-quick.yaml" if quick else "experiment.yaml"))


def load_experiment_config(path: str | None = None, quick: bool = False, **overrides) -> ExperimentConfig:
    """An ExperimentConfig from YAML (default: the preset), with top-level overrides (None ones ignored)."""
    values = {**load_yaml(path or preset(quick)), **{k: v for k, v in overrides.items() if v is not None}}
    return build(ExperimentConfig, values, "experiment config ")
