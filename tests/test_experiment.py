"""`reals experiment` end to end at micro scale: a complete table, arms differing only in the alignment weight."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipelines import StageError
from flows.experiment import plan, run
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
    train_sit={"model": "SiT-T/2", "global_batch_size": 8, "max_steps": 3, "log_every": 1, "sample_every": 0},
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
    tampered["stages"]["train_sit"]["lr"] *= 2
    path.write_text(json.dumps(tampered))
    with pytest.raises(StageError, match="train_sit.lr"):
        check_arms(str(tmp_path), 1)


def test_rerun_reuses_every_unit_and_refuses_changed_settings(micro):
    config, s = micro
    again = run(config)
    assert again.units_run == 0 and again.units_reused == s.units_run + s.units_reused
    assert again.paired == s.paired
    changed = config.model_copy(update={"train_sit": {**config.train_sit, "lr": 1e-3}})
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


def test_a_dit_generator_trains_with_train_dit_and_samples_by_ddpm():
    config = load_experiment_config(quick=True, output="/tmp/unused-experiment", model="DiT-T/2")
    p = plan(config)
    for arm in ARMS:
        train, sample = p.runs[(arm, 0)]["train-sit"], p.runs[(arm, 0)]["sample"]
        assert (train.stage, train.config.model, type(train.config).__name__) == ("train-dit", "DiT-T/2",
                                                                                 "TrainDiTConfig")
        assert (sample.config.mode, sample.config.num_sampling_steps, sample.config.sampling_method) == ("DDPM", 50, None)
        assert sample.config.cfg_scale == config.sample["cfg_scale"]  # the rest of the sample section is shared
    assert plan(load_experiment_config(quick=True, output="/tmp/unused-experiment")).runs[("vae", 0)][
        "train-sit"].stage == "train-sit"
    with pytest.raises(StageError, match="unknown model"):
        plan(load_experiment_config(quick=True, output="/tmp/unused-experiment", model="DiT-Q/2"))
