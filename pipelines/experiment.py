"""Stage `experiment`: SiT (or DiT) on ReaLS latents vs on a plain VAE's latents, a controlled experiment (issue 9).

``--model`` picks the generator: a SiT (train-sit, sampled by the ``sample`` section) or a DiT (train-dit on the
``generator`` section's settings, sampled by DDPM with the ``sample_dit`` settings in place of the SiT sampler's).

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

The plan of stage steps and running them is ``flows.experiment``; here: the config, the check that the arms
differ only in the alignment weight, and the results (paired differences, the table).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from pydantic import AliasChoices, BaseModel, Field

from pipelines import StageError
from pipelines.config import OptionalImages, ShowProgress, StageConfig, build, load_yaml, section_names
from pipelines.sweep import Point, mean_std, targets
from storage.fs import join
from storage.markers import read_json

PRESETS = Path(__file__).resolve().parents[1] / "configs"
ARMS = ("vae", "reals")
ALLOWED_DIFFERENCE = "train_vae.align_weight"
METRIC_KEYS = ("FD_domain", "Precision_domain", "Recall_domain", "cond_accuracy", "FD_effnet", "Precision_effnet",
               "Recall_effnet", "PSNR", "rFD_domain")
OPTIONAL_KEYS = ("FID", "sFID", "IS", "Precision", "Recall", "FD_dinov2", "Precision_dinov2", "Recall_dinov2",
                 "LPIPS")
# Each section of the experiment config and the stages whose fields it holds (its Run form's typed sections).
FORM_SECTIONS = {"synthetic": ("synthetic",), "shard": ("shard",), "reference": ("make-reference",),
                 "evaluator": ("train-evaluator",), "train_vae": ("train-vae",), "pretrain_vae": ("train-vae",),
                 "convert": ("convert",), "encode": ("encode",), "generator": ("train-sit", "train-dit"),
                 "sample": ("sample",), "sample_dit": ("sample",), "evaluate": ("evaluate",), "assess": ("assess",),
                 "downstream": ("downstream",)}
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
    teacher_layer: int | None = Field(None, ge=1, description="teacher layer aligned to: a DINOv2 block or an "
                                                              "EfficientNet stage (2-9; default: the last)")
    align_weight: float = Field(0.5, gt=0, description="alignment weight of the ReaLS arm (the baseline has 0)")
    images: OptionalImages = Field(None, description="ImageNet-layout folder with train/ and val/ (default: a "
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
    model: str | None = Field(None, description="generator, overriding generator.model: SiT-* (flow matching) or "
                                                "DiT-* (DDPM, learned variance), e.g. DiT-T/2")
    generator: dict = Field(default_factory=dict, validation_alias=AliasChoices(*section_names("generator")),
                            description="TrainSiTConfig fields (a DiT: TrainDiTConfig's); former name train_sit")
    sample: dict = Field(default_factory=dict, description="SampleConfig fields")
    sample_dit: dict = Field(default_factory=lambda: {"mode": "DDPM", "num_sampling_steps": 50},
                             description="SampleConfig fields that replace the sample section's sampler settings "
                                         "when the generator is a DiT")
    evaluate: dict = Field(default_factory=dict, description="EvaluateConfig fields")
    assess: dict = Field(default_factory=dict, description="AssessConfig fields (domain space, reconstruction)")
    downstream: dict = Field(default_factory=dict, description="DownstreamConfig fields (segmentation and depth from "
                                                               "each run's latents; run when the data has ground "
                                                               "truth: the synthetic set, or a ground_truth folder)")
    points: list[dict] = Field(default_factory=list, description="sweep: overrides of the ReaLS arm, one point each "
                                                                 "(`reals experiment --sweep FILE`)")
    grid: dict[str, list] = Field(default_factory=dict, description="sweep: knob -> values, every combination a point")
    show_progress: ShowProgress = Field(True, description="show a progress bar per phase")


class ExperimentSummary(BaseModel):
    """What `reals experiment` produced."""

    output: str
    results: str = Field(description="results.json")
    table: str = Field(description="results.md")
    loss_curves: str
    markdown: str
    seeds: int
    steps_run: int
    steps_reused: int
    wall_seconds: float
    phase_seconds: dict[str, float]
    evaluator_val_accuracy: float
    paired: dict[str, dict] = Field(description="metric -> paired differences (reals - vae) over seeds")
    sweep_table: str | None = Field(None, description="sweep.md, when the experiment is a sweep")
    sweep_plots: list[str] = Field(default_factory=list, description="one plot per knob of the sweep")


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


def recorded_configs(steps: dict, *run_roots: str) -> dict:
    """A run's stage configs as JSON, its folders (its own, and one it shares steps with) written ``<run>``
    (section names as in ExperimentConfig)."""
    text = json.dumps({kind.replace("-", "_"): u.config.model_dump(mode="json") for kind, u in steps.items()},
                      sort_keys=True)
    for root in run_roots:
        text = text.replace(f"{root}/", "<run>/").replace(f'"{root}"', '"<run>"')
    return json.loads(text)


def check_arms(root: str, seeds: int, points: list[tuple[str, Point]] = ()) -> dict:
    """Compare the arms' recorded configs seed by seed against the baseline's; raise unless the ReaLS arm differs
    only in the alignment weight and each sweep point ``(arm, point)`` only in that and what its overrides set."""
    def stages(arm: str, seed: int) -> dict:
        recorded = read_json(join(root, arm, f"seed{seed}", "configs.json"))
        if recorded is None:
            raise StageError(f"recorded configs of {arm} seed {seed} are missing under {root}")
        return recorded["stages"]

    report = {"allowed": ALLOWED_DIFFERENCE, "seeds": {}, "points": {}}
    for seed in range(seeds):
        diffs = config_differences(stages("vae", seed), stages("reals", seed))
        baseline, aligned_weight = diffs.get(ALLOWED_DIFFERENCE, [None, None])
        if set(diffs) != {ALLOWED_DIFFERENCE} or baseline != 0 or not aligned_weight > 0:
            raise StageError(f"the arms of seed {seed} must differ only in {ALLOWED_DIFFERENCE} (0 vs > 0); they "
                             f"differ in {json.dumps(diffs)}")
        report["seeds"][str(seed)] = diffs
    for arm, point in points:
        allowed = {ALLOWED_DIFFERENCE} | {targets(k) for k in point.overrides}
        per_seed = {}
        for seed in range(seeds):
            diffs = config_differences(stages("vae", seed), stages(arm, seed))
            extra = sorted(set(diffs) - allowed)
            if extra:
                raise StageError(f"sweep point {point.name}, seed {seed}: differs from the baseline in "
                                 f"{', '.join(extra)}, which its overrides ({point.label()}) do not set")
            per_seed[str(seed)] = diffs
        report["points"][point.name] = {"arm": arm, "overrides": point.overrides, "seeds": per_seed}
    report["ok"] = True
    return report


# ---------------------------------------------------------------------------------------------------
# Results: table, paired differences, loss curves
# ---------------------------------------------------------------------------------------------------

def _fmt(x: float) -> str:
    if x == 0 or not math.isfinite(x):
        return f"{x:g}"
    return f"{x:.3f}" if abs(x) < 100 else f"{x:.1f}"


def _params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"


DOWNSTREAM_KEYS = ("mIoU", "mIoU_teacher", "mIoU_probe", "delta1", "delta1_teacher", "delta1_probe")


def downstream_row(summary: dict | None) -> dict:
    """A run's segmentation mIoU and depth δ<1.25 from its latents through its heads, from the teacher and from the
    ridge probe on its raw latents, and the first and last as fractions of the teacher's."""
    out = {}
    for task, key, name in (("seg", "miou", "mIoU"), ("depth", "delta1", "delta1")):
        scored = (summary or {}).get("metrics", {}).get(task) or {}
        if not all(source in scored for source in ("reals", "teacher", "baseline")):
            continue
        out.update({name: scored["reals"][key], f"{name}_teacher": scored["teacher"][key],
                    f"{name}_probe": scored["baseline"][key]})
        if out[f"{name}_teacher"] > 0:
            out[f"{name}_fraction"] = out[name] / out[f"{name}_teacher"]
            out[f"{name}_probe_fraction"] = out[f"{name}_probe"] / out[f"{name}_teacher"]
    return out


def collect(plan_, records: dict[str, dict], config: ExperimentConfig) -> dict:
    """results.json: per-run metrics, per-arm mean/std, paired differences (reals - vae) per seed."""
    runs = []
    for (arm, seed), steps in plan_.runs.items():
        rec = {kind: records[u.name]["summary"] for kind, u in steps.items()}
        metrics = {k: float(v["value"]) for k, v in rec["evaluate"]["metrics"].items()}
        metrics.update(rec["assess"]["metrics"])
        downstream = downstream_row(rec.get("downstream"))
        seconds = sum(records[u.name]["seconds"] for u in steps.values()  # its own steps (not those it shares)
                      if u.name.startswith(f"{arm}-seed{seed}-"))
        final = rec["train-vae"]["final"]
        runs.append({
            "arm": arm, "seed": seed, "root": plan_.run_root(arm, seed), "metrics": metrics,
            "vae_run": steps["train-vae"].config.output, "generator_run": steps["generator"].config.output,
            "model": rec["generator"]["model"], "family": rec["generator"]["family"],
            "sit_parameters": rec["generator"]["parameters"],
            "vae_parameters": rec["assess"]["vae_parameters"], "vae_steps": rec["train-vae"]["steps"],
            "sit_steps": rec["generator"]["steps"], "nfe": rec["sample"]["nfe"], "samples": rec["sample"]["num_samples"],
            "vae_final": rec["train-vae"]["final"], "sit_final_loss": rec["generator"]["final_loss"],
            "teacher": rec["train-vae"]["teacher"], "alignment": rec["train-vae"]["alignment"],
            "latent_shape": rec["train-vae"]["latent_shape"], "noise_to_signal": rec["assess"]["noise_to_signal"],
            "notes": rec["assess"]["notes"] + rec["evaluate"]["notes"], "downstream": downstream, "seconds": seconds,
            "row": {**metrics, **{k: final[k] for k in ("patch_cos", "global_cos") if k in final}, **downstream,
                    "minutes": seconds / 60},
        })
    keys = [k for k in METRIC_KEYS + OPTIONAL_KEYS if all(k in r["metrics"] for r in runs)]
    down = [k for k in DOWNSTREAM_KEYS if all(k in r["downstream"] for r in runs)]
    arms = {}
    for arm in dict.fromkeys(r["arm"] for r in runs):
        mine = sorted((r for r in runs if r["arm"] == arm), key=lambda r: r["seed"])
        arms[arm] = {"metrics": {k: mean_std([r["metrics"][k] for r in mine]) for k in keys},
                     "downstream": {k: mean_std([r["downstream"][k] for r in mine]) for k in down},
                     "vae_final": {k: mean_std([r["vae_final"][k] for r in mine]) for k in ("rec", "patch_cos", "global_cos")
                                   if all(k in r["vae_final"] for r in mine)},
                     "max_noise_to_signal": mean_std([max(r["noise_to_signal"]) for r in mine])}
    by = {(r["arm"], r["seed"]): r["metrics"] for r in runs}
    paired = {}
    for k in keys:
        diffs = [by[("reals", s)][k] - by[("vae", s)][k] for s in range(config.seeds)]
        lower = k in LOWER_IS_BETTER
        paired[k] = {**mean_std(diffs), "better": "lower" if lower else "higher",
                     "reals_better_in": sum((d < 0) if lower else (d > 0) for d in diffs), "of": len(diffs)}
    evaluator = records["train-evaluator"]["summary"]
    notes = sorted({n for r in runs for n in r["notes"] if n})
    pretrain = records["pretrain-vae"]["summary"] if "pretrain-vae" in records else None
    return {"runs": runs, "arms": arms, "paired_differences": paired, "metric_keys": keys, "downstream_keys": down,
            "seeds": config.seeds,
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
    if results["downstream_keys"]:
        down = results["downstream_keys"]
        lines += ["", "### Downstream, training-free (`reals downstream`: held-out images, mean ± std over seeds)", "",
                  "| arm | " + " | ".join(down) + " |", "|" + "---|" * (len(down) + 1)]
        for arm in ARMS:
            d = results["arms"][arm]["downstream"]
            lines.append(f"| {arm} | " + " | ".join(f"{_fmt(d[k]['mean'])} ± {_fmt(d[k]['std'])}" for k in down) + " |")
        lines += ["", "mIoU and delta1 (depth δ<1.25): the arm's latents through its alignment heads and the ridge "
                  "heads fitted on the teacher's features; _teacher: those heads on the teacher's own features; "
                  "_probe: ridge heads fitted on the arm's raw latents."]
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


def preset(quick: bool = False) -> str:
    """The YAML of the default run, or of ``--quick``."""
    return str(PRESETS / ("experiment-quick.yaml" if quick else "experiment.yaml"))


def load_experiment_config(path: str | None = None, quick: bool = False, **overrides) -> ExperimentConfig:
    """An ExperimentConfig from YAML (default: the preset), with top-level overrides (None ones ignored)."""
    values = {**load_yaml(path or preset(quick)), **{k: v for k, v in overrides.items() if v is not None}}
    return build(ExperimentConfig, values, "experiment config ")
