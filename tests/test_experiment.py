"""`reals experiment` end to end at micro scale: a complete table, arms differing only in the alignment weight."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipelines import StageError
from flows.experiment import run
from pipelines.experiment_plan import plan
from pipelines.experiment import (ALLOWED_DIFFERENCE, ARMS, METRIC_KEYS, ExperimentConfig, check_arms,
                                  config_differences, load_experiment_config)

MICRO = dict(
    seeds=2, teacher="tiny-dinov2", teacher_input_size=56, align_weight=0.5, show_progress=False,
    synthetic={"classes": 3, "per_class": 16, "val_per_class": 6, "size": 32},
    shard={"resolution": 32, "shard_size": 32},
    evaluator={"steps": 40, "batch_size": 16, "width": 8},
    train_vae={"vae_config": "tiny", "perceptual": "none", "batch_size": 4, "max_steps": 3, "align_hidden_dim": 16,
               "log_every": 1, "ckpt_every": 3, "sample_every": 3},
    pretrain_vae={"max_steps": 2, "ckpt_every": 2},
    convert={"num_samples": 16, "batch_size": 16},
    encode={"batch_size": 16},
    generator={"model": "SiT-T/2", "global_batch_size": 8, "max_steps": 3, "log_every": 1, "sample_every": 0},
    sample={"sampling_method": "euler", "num_sampling_steps": 2, "num_fid_samples": 6, "per_proc_batch_size": 6,
            "unit_size": 6},
    evaluate={"features": ["effnet"], "batch_size": 32},
)


@pytest.fixture(scope="module")
def micro(ray_session, tmp_path_factory):
    config = ExperimentConfig(output=str(tmp_path_factory.mktemp("experiment")), **MICRO)
    return config, run(config)


def test_micro_experiment_writes_a_complete_table(micro):
    config, s = micro
    results = json.loads(Path(s.results).read_text())
    runs = {(r["arm"], r["seed"]) for r in results["runs"]}
    assert runs == {(arm, seed) for arm in ARMS for seed in range(config.seeds)}
    for r in results["runs"]:
        assert set(METRIC_KEYS) <= set(r["metrics"]), r["arm"]
        assert 0 <= r["metrics"]["cond_accuracy"] <= 1 and r["metrics"]["PSNR"] > 0
        assert r["vae_steps"] == 3 and r["sit_steps"] == 3 and r["samples"] == 6
    assert set(METRIC_KEYS) <= set(results["paired_differences"])
    for k in METRIC_KEYS:
        p = results["paired_differences"][k]
        by = {(r["arm"], r["seed"]): r["metrics"][k] for r in results["runs"]}
        assert p["values"] == pytest.approx([by[("reals", i)] - by[("vae", i)] for i in range(config.seeds)])
    table = Path(s.table).read_text()
    assert all(k in table for k in METRIC_KEYS) and "± " in table and "SiT-T/2" in table
    assert Path(s.loss_curves).read_bytes()[:4] == b"\x89PNG"
    assert 0 <= s.evaluator_val_accuracy <= 1


def test_arms_differ_only_in_the_alignment_weight(micro):
    config, s = micro
    for seed in range(config.seeds):
        vae, reals = (json.loads(Path(s.output, arm, f"seed{seed}", "configs.json").read_text()) for arm in ARMS)
        assert config_differences(vae["stages"], reals["stages"]) == {ALLOWED_DIFFERENCE: [0.0, 0.5]}
        recorded = json.loads(Path(s.output, "records", f"reals-seed{seed}-train-vae.json").read_text())
        assert recorded["config"]["align_weight"] == 0.5 and recorded["config"]["seed"] == seed
        trained = json.loads(Path(s.output, "vae", f"seed{seed}", "vae", "config.json").read_text())
        assert trained["align_weight"] == 0.0 and trained["vae_ckpt"] == reals["stages"]["train_vae"]["vae_ckpt"]
    pretrain = json.loads(Path(s.output, "pretrain", "vae", "config.json").read_text())
    assert pretrain["align_weight"] == 0.0 and Path(trained["vae_ckpt"]).is_file()
    assert json.loads(Path(s.output, "config_check.json").read_text())["ok"] is True


def test_check_refuses_arms_that_differ_elsewhere(micro, tmp_path):
    config, s = micro
    for arm in ARMS:
        shutil.copytree(Path(s.output, arm, "seed0"), tmp_path / arm / "seed0",
                        ignore=lambda d, names: [n for n in names if n != "configs.json"])
    path = tmp_path / "reals" / "seed0" / "configs.json"
    tampered = json.loads(path.read_text())
    tampered["stages"]["generator"]["lr"] *= 2
    path.write_text(json.dumps(tampered))
    with pytest.raises(StageError, match="generator.lr"):
        check_arms(str(tmp_path), 1)


def test_rerun_reuses_every_unit_and_refuses_changed_settings(micro):
    config, s = micro
    again = run(config)
    assert again.steps_run == 0 and again.steps_reused == s.steps_run + s.steps_reused
    assert again.paired == s.paired
    changed = config.model_copy(update={"generator": {**config.generator, "lr": 1e-3}})
    with pytest.raises(StageError, match="other settings"):
        run(changed)


def test_presets_load_and_plan_both_arms_alike():
    for quick in (False, True):
        config = load_experiment_config(quick=quick, output="/tmp/unused-experiment")
        p = plan(config)
        assert config.seeds >= 3 and len(p.runs) == 2 * config.seeds
        units = p.runs[("vae", 0)]
        assert units["train-vae"].config.align_weight == 0 and p.runs[("reals", 0)]["train-vae"].config.align_weight > 0
    with pytest.raises(StageError, match="may not set seed"):
        plan(ExperimentConfig(output="/tmp/unused-experiment", train_vae={"seed": 3}))
    with pytest.raises(StageError, match="experiment section sample may not set ckpt, output"):
        plan(ExperimentConfig(output="/tmp/unused-experiment", sample={"ckpt": "mine", "output": "x.npz"}))
    own = plan(ExperimentConfig(output="/tmp/unused-experiment", train_vae={"vae_ckpt": "/w/vae.safetensors"}))
    assert own.runs[("vae", 0)]["train-vae"].config.vae_ckpt == "/w/vae.safetensors"  # its own input, not filled


def test_set_overrides_a_preset_from_the_command_line(monkeypatch, capsys):
    from flows.cli import main

    seen = []

    def captured(config):
        seen.append(config)
        raise StageError("stopped before running")

    monkeypatch.setattr("flows.experiment.run", captured)
    assert main(["experiment", "--output", "/tmp/unused-experiment", "--seeds", "2", "--set",
                 "train_sit.max_steps=1000", "sample.num_fid_samples=500", "align_weight=1.0"]) == 2
    preset = load_experiment_config()
    config = seen[0]
    assert (config.generator["max_steps"], config.sample["num_fid_samples"], config.align_weight) == (1000, 500, 1.0)
    assert config.seeds == 2 and config.generator["lr"] == preset.generator["lr"]  # the rest of a section stays
    assert plan(config).runs[("reals", 0)]["generator"].config.max_steps == 1000
    for bad, err in ((["max_steps"], "expected KEY=VALUE"), (["seeds.x=1"], "--set seeds.x: seeds is not a section"),
                     (["no_such=1"], "invalid experiment config no_such")):
        assert main(["experiment", "--output", "/tmp/unused-experiment", "--set", *bad]) == 2
        assert err in capsys.readouterr().err


def test_a_dit_generator_trains_with_train_dit_and_samples_by_ddpm():
    config = load_experiment_config(quick=True, output="/tmp/unused-experiment", model="DiT-T/2")
    p = plan(config)
    for arm in ARMS:
        train, sample = p.runs[(arm, 0)]["generator"], p.runs[(arm, 0)]["sample"]
        assert (train.stage, train.config.model, type(train.config).__name__) == ("train-dit", "DiT-T/2",
                                                                                 "TrainDiTConfig")
        assert (sample.config.mode, sample.config.num_sampling_steps, sample.config.sampling_method) == ("DDPM", 50, None)
        assert sample.config.cfg_scale == config.sample["cfg_scale"]  # the rest of the sample section is shared
    assert plan(load_experiment_config(quick=True, output="/tmp/unused-experiment")).runs[("vae", 0)][
        "generator"].stage == "train-sit"
    with pytest.raises(StageError, match="unknown model"):
        plan(load_experiment_config(quick=True, output="/tmp/unused-experiment", model="DiT-Q/2"))


# ----------------------------------------------------------------- the sweep (issue 18)

SWEEP = {"points": [{"name": "block1", "teacher_layer": 1}, {"name": "mean", "train_sit.sample_posterior": False}],
         "grid": {"align_weight": [0.5]}}  # 0.5: the base; `mean` changes only the generator
GENERATOR = ("generator", "sample", "evaluate", "assess")


def test_a_sweep_expands_its_points_and_grid_against_one_baseline(tmp_path):
    from pipelines.sweep import expand

    grid = {"align_weight": [0.5, 1.0]}
    points = expand(SWEEP["points"][:1] + [{"train_vae": {"kl_weight": 1e-5}}], grid)
    assert [(p.name, p.overrides) for p in points] == [
        ("block1", {"teacher_layer": 1}), ("kl_weight-1e-05", {"train_vae.kl_weight": 1e-5}),
        ("align_weight-0.5", {"align_weight": 0.5}), ("align_weight-1.0", {"align_weight": 1.0})]
    config = ExperimentConfig(output=str(tmp_path), **MICRO, points=SWEEP["points"][:1] + [
        {"train_vae.kl_weight": 1e-5}], grid=grid)
    p = plan(config)
    arms = {arm for arm, _ in p.runs}
    assert arms == {"vae", "reals", "reals-block1", "reals-kl_weight-1e-05", "reals-align_weight-1.0"}
    assert dict((point.name, arm) for arm, point in p.points)["align_weight-0.5"] == "reals"  # the base config
    for seed in range(config.seeds):
        vae, block1 = p.runs[("vae", seed)]["train-vae"].config, p.runs[("reals-block1", seed)]["train-vae"].config
        kl = p.runs[("reals-kl_weight-1e-05", seed)]["train-vae"].config
        assert (vae.align_weight, vae.teacher_layer, block1.teacher_layer, block1.align_weight) == (0, None, 1, 0.5)
        assert (kl.kl_weight, vae.kl_weight) == (1e-5, p.runs[("reals", seed)]["train-vae"].config.kl_weight)
        assert p.runs[("reals-align_weight-1.0", seed)]["train-vae"].config.align_weight == 1.0
        assert block1.vae_ckpt == vae.vae_ckpt  # one shared pretraining
    assert not p.borrowed  # every point above changes the VAE


def test_a_generator_only_point_shares_the_reals_arms_vae_side(tmp_path):
    from pipelines.experiment_plan import VAE_SIDE, phases

    config = ExperimentConfig(output=str(tmp_path), **MICRO, points=SWEEP["points"])
    p = plan(config)
    for seed in range(config.seeds):
        base, mean = p.runs[("reals", seed)], p.runs[("reals-mean", seed)]
        assert p.borrowed[("reals-mean", seed)] == p.run_root("reals", seed)
        assert all(mean[k] is base[k] for k in VAE_SIDE)  # the very units, run once
        assert mean["generator"].config.store == base["generator"].config.store
        assert (mean["generator"].config.sample_posterior, base["generator"].config.sample_posterior) == (False, True)
        assert mean["generator"].config.output.startswith(p.run_root("reals-mean", seed))
        assert mean["sample"].config.vae_path == base["sample"].config.vae_path
        assert mean["generator"].name != base["generator"].name
        # its recorded configs read as the baseline's but for the alignment weight and its override
        diffs = config_differences(p.recorded("vae", seed), p.recorded("reals-mean", seed))
        assert set(diffs) == {ALLOWED_DIFFERENCE, "generator.sample_posterior"}
    units = [u for _, phase in phases(p) for u in phase]
    assert len(units) == len({u.name for u in units})  # the shared units are planned once
    own = {(arm, seed): {k for k, u in units.items() if u.name.startswith(f"{arm}-")} for (arm, seed), units in
           p.runs.items()}
    assert own[("reals-mean", 0)] == set(GENERATOR) and own[("reals-block1", 0)] == set(p.runs[("vae", 0)])


def test_a_sweep_refuses_points_that_change_shared_inputs(tmp_path):
    config = ExperimentConfig(output=str(tmp_path), **MICRO)
    for bad, match in (({"seeds": 5}, "seeds is shared"), ({"shard.shard_size": 8}, "shard is shared"),
                       ({"train_vae.no_such": 1}, "sweep point no_such-1")):
        with pytest.raises(StageError, match=match):
            plan(config.model_copy(update={"points": [bad], "grid": {}}))


@pytest.fixture(scope="module")
def micro_sweep(micro):
    config, first = micro
    return config, first, run(config.model_copy(update=SWEEP))


def test_a_micro_sweep_reuses_the_baseline_and_reports_every_point(micro_sweep):
    config, first, s = micro_sweep
    point_units = config.seeds * (len(plan(config.model_copy(update=SWEEP)).runs[("vae", 0)]) + len(GENERATOR))
    assert s.steps_run == point_units and s.steps_reused == first.steps_run + first.steps_reused
    check = json.loads(Path(s.output, "config_check.json").read_text())
    entry = check["points"]["block1"]
    for seed in range(config.seeds):
        recorded = json.loads(Path(s.output, entry["arm"], f"seed{seed}", "configs.json").read_text())["stages"]
        vae = json.loads(Path(s.output, "vae", f"seed{seed}", "configs.json").read_text())["stages"]
        assert set(config_differences(vae, recorded)) == {ALLOWED_DIFFERENCE, "train_vae.teacher_layer"}
        assert entry["seeds"][str(seed)] == config_differences(vae, recorded)
    assert check["points"]["align_weight-0.5"]["arm"] == "reals"
    prov = json.loads(Path(s.output, "reals-block1", "seed0", "vae-dir", "provenance.json").read_text())
    assert prov["teacher"]["layer"] == 1 and "block 1" in prov["teacher"]["description"]
    sweep = json.loads(Path(s.output, "sweep.json").read_text())
    assert [r["name"] for r in sweep["rows"]] == ["base", "block1", "mean"]
    assert sweep["same_as_base"] == ["align_weight-0.5"]
    mean = json.loads(Path(s.output, "reals-mean", "seed0", "configs.json").read_text())
    assert mean["vae_side"] == str(Path(s.output, "reals", "seed0"))
    assert not Path(s.output, "reals-mean", "seed0", "vae").exists()  # its VAE side is the ReaLS arm's
    rows = {r["name"]: r["stats"] for r in sweep["rows"]}
    assert rows["mean"]["mIoU_fraction"]["values"] == rows["base"]["mIoU_fraction"]["values"]
    assert rows["mean"]["minutes"]["mean"] < rows["base"]["minutes"]["mean"]  # its own units only
    for row in sweep["rows"]:
        assert {"FD_domain", "FD_domain_change", "PSNR", "patch_cos", "mIoU_fraction", "delta1_fraction",
                "mIoU_probe_fraction", "minutes"} <= set(row["stats"])
        assert len(row["stats"]["FD_domain"]["values"]) == config.seeds
    table = Path(s.sweep_table).read_text()
    assert "| block1 | teacher_layer=1 |" in table and "| VAE baseline |" in table
    assert sorted(Path(p).name for p in s.sweep_plots) == ["sweep-align_weight.png", "sweep-sample_posterior.png",
                                                           "sweep-teacher_layer.png"]
    assert all(Path(p).read_bytes()[:4] == b"\x89PNG" for p in s.sweep_plots)


def test_the_experiment_reports_downstream_per_arm(micro):
    config, s = micro
    results = json.loads(Path(s.results).read_text())
    assert {"mIoU", "mIoU_teacher", "mIoU_probe", "delta1"} <= set(results["downstream_keys"])
    for arm in ARMS:
        assert 0 <= results["arms"][arm]["downstream"]["mIoU"]["mean"] <= 1
    assert "### Downstream" in Path(s.table).read_text()


def test_the_experiment_lays_out_each_run_as_the_pipeline_lays_out_its_run(tmp_path):
    """One plan, one layout: every artifact at the same path relative to its run (shared steps: the experiment's
    folder), e.g. samples/samples.npz in both."""
    import os

    from pipelines.chain import produced
    from pipelines.pipeline_config import load_pipeline_config, pipeline_steps

    def layout(steps, root) -> dict:
        return {(s.stage, role): os.path.relpath(url, root) for s in steps for role, url in produced(s).items()}

    pipeline = layout(pipeline_steps(load_pipeline_config(output=str(tmp_path / "pipe"))), tmp_path / "pipe")
    p = plan(load_experiment_config(quick=True, output=str(tmp_path / "exp")))
    shared = layout(p.shared.values(), p.root)
    run = layout(p.runs[("reals", 0)].values(), p.run_root("reals", 0))
    both = {**shared, **run}
    common = set(pipeline) & set(both)
    assert {stage for stage, _ in common} >= {"synthetic", "shard", "train-vae", "convert", "encode", "train-sit",
                                               "sample", "make-reference", "evaluate", "downstream"}
    assert {k: both[k] for k in common} == {k: pipeline[k] for k in common}
    assert run[("sample", "samples")] == os.path.join("samples", "samples.npz")
