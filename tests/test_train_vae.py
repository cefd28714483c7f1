"""`reals train-vae` on tiny shards: losses fall, exact resume, NaN stop, S3 checkpoints, clear errors."""
from __future__ import annotations

import json

import pytest
import torch

from pipelines import StageError
from pipelines.cli import main
from pipelines.checkpoints import LOG, check_resumable, load_checkpoint, read_log
from pipelines.stages.train_vae import RESUME_KEYS, TrainVAEConfig, run
from reals import ReaLSError
from reals.losses import AutoencoderLoss
from reals.teachers import Teacher
from storage.fs import exists, join, read_bytes

TINY = dict(vae_config="tiny", dino_model="tiny-dinov2", perceptual="none", align_hidden_dim=32,
            disc_channels=8, disc_layers=2, lr=2e-3, shuffle_buffer=16, ema_decay=0.9, show_progress=False)


def tiny_config(data_path: str, output: str, **kw) -> TrainVAEConfig:
    return TrainVAEConfig(data_path=data_path, output=output, **{**TINY, **kw})


def test_reconstruction_and_alignment_losses_fall(tiny_shards, tmp_path):
    out = str(tmp_path / "run")
    s = run(tiny_config(tiny_shards, out, max_steps=36, log_every=6, sample_every=36, ckpt_every=100))
    log = read_log(join(out, LOG))
    assert [e["step"] for e in log] == [6, 12, 18, 24, 30, 36]
    first, last = log[0], log[-1]
    assert last["rec"] < 0.8 * first["rec"]
    assert last["align"] < 0.8 * first["align"]
    assert last["patch_cos"] > first["patch_cos"]
    assert s.steps == 36 and s.checkpoint.endswith("0000036.pt") and exists(s.checkpoint)
    assert s.perceptual.startswith("none") and "tiny-dinov2" in s.teacher
    assert s.latent_shape == [4, 8, 8] and s.final["rec"] == pytest.approx(last["rec"])
    assert exists(join(out, "samples", "0000036.png"))
    ckpt = load_checkpoint(s.checkpoint)
    assert {"vae", "align_net", "ema", "opt", "opt_d", "disc", "rng", "config", "step"} <= set(ckpt)
    assert ckpt["config"]["max_steps"] == 36 and ckpt["teacher"]["name"] == "tiny-dinov2"


@pytest.mark.parametrize("cache_teacher", [False, True])
def test_resume_reproduces_an_uninterrupted_run(tiny_shards, tmp_path, cache_teacher):
    # 48 train images / batch 8 = 6 batches per epoch: the resume lands mid-epoch, the GAN is on from step 3.
    kw = dict(log_every=1, disc_start=3, cache_teacher=cache_teacher)
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    run(tiny_config(tiny_shards, whole, max_steps=9, **kw))
    first = run(tiny_config(tiny_shards, parts, max_steps=4, **kw))
    second = run(tiny_config(tiny_shards, parts, max_steps=9, resume=True, **kw))
    assert (first.steps, second.resumed_from, second.steps) == (4, 4, 9)

    def losses(out):
        return [{k: v for k, v in e.items() if k != "time" and not k.endswith("_per_sec")}  # wall-clock fields
                for e in read_log(join(out, LOG))]

    assert losses(parts) == losses(whole)
    assert "d_loss" in losses(whole)[-1]
    a, b = load_checkpoint(join(whole, "0000009.pt")), load_checkpoint(join(parts, "0000009.pt"))
    for key in ("vae", "align_net"):
        assert all(torch.equal(a["ema"][key][k], b["ema"][key][k]) for k in a["ema"][key])
    assert all(torch.equal(a["disc"][k], b["disc"][k]) for k in a["disc"])


def test_cached_teacher_features_train_as_the_teacher_does(tiny_shards, tmp_path, monkeypatch):
    calls = {"images": 0}
    forward = Teacher.forward

    def counted(self, images):
        calls["images"] += len(images)
        return forward(self, images)

    monkeypatch.setattr(Teacher, "forward", counted)
    kw = dict(max_steps=12, log_every=1, seed=3)  # two epochs of 6 batches of 8
    run(tiny_config(tiny_shards, str(tmp_path / "live"), **kw))
    assert calls["images"] == 12 * 8
    calls["images"] = 0
    s = run(tiny_config(tiny_shards, str(tmp_path / "cached"), cache_teacher=True, **kw))
    assert calls["images"] == s.teacher_cached == 48  # every train image once, then never again
    live, cached = read_log(join(str(tmp_path / "live"), LOG)), read_log(join(str(tmp_path / "cached"), LOG))
    for a, b in zip(live, cached, strict=True):
        for key in ("rec", "align", "patch_cos", "global_cos", "loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)


def test_teacher_cache_too_large_for_memory_is_refused(tiny_shards, tmp_path, monkeypatch):
    monkeypatch.setattr("pipelines.stages.train_vae.os.sysconf", lambda name: 256)  # a 64 KiB machine
    with pytest.raises(StageError, match=r"--cache-teacher needs .* GiB for 48 images.*train without it"):
        run(tiny_config(tiny_shards, str(tmp_path / "run"), max_steps=2, cache_teacher=True))


def test_existing_run_needs_resume(tiny_shards, tmp_path):
    out = str(tmp_path / "run")
    run(tiny_config(tiny_shards, out, max_steps=1))
    with pytest.raises(StageError, match="already holds checkpoints.*--resume"):
        run(tiny_config(tiny_shards, out, max_steps=2))
    with pytest.raises(StageError, match="batch_size was 8, now 4"):
        run(tiny_config(tiny_shards, out, max_steps=2, batch_size=4, resume=True))


def test_non_finite_loss_saves_and_names_the_step(tiny_shards, tmp_path, monkeypatch):
    calls = {"n": 0}
    forward = AutoencoderLoss.forward

    def poisoned(self, *args, **kw):
        terms = forward(self, *args, **kw)
        calls["n"] += 1
        if calls["n"] == 3:
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    monkeypatch.setattr(AutoencoderLoss, "forward", poisoned)
    out = str(tmp_path / "run")
    with pytest.raises(StageError, match="non-finite loss at step 3 .*0000002.pt"):
        run(tiny_config(tiny_shards, out, max_steps=10))
    assert json.loads(read_bytes(join(out, "latest.json")))["step"] == 2


def test_checkpoints_and_resume_on_s3(tiny_shards, s3_bucket):
    out = f"{s3_bucket}/vae-run"
    run(tiny_config(tiny_shards, out, max_steps=2, log_every=1, ckpt_every=1))
    s = run(tiny_config(tiny_shards, out, max_steps=3, log_every=1, resume=True))
    assert s.resumed_from == 2 and s.checkpoint == f"{out}/0000003.pt"
    assert [e["step"] for e in read_log(join(out, LOG))] == [1, 2, 3]
    assert load_checkpoint(s.checkpoint)["step"] == 3
    assert json.loads(read_bytes(join(out, "latest.json")))["checkpoint"] == "0000003.pt"


def test_corrupt_samples_are_skipped_and_counted(tmp_path):
    import io

    import numpy as np
    from PIL import Image

    from storage.markers import write_json
    from storage.shards import write_shard

    def png(seed):
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
        return buf.getvalue()

    data = str(tmp_path / "data")
    samples = [{"__key__": f"img{i}", "png": png(i), "cls": i % 2} for i in range(8)]
    samples.insert(3, {"__key__": "broken", "png": b"not a png", "cls": 0})
    write_shard(f"{data}/train-000000.tar", samples)
    write_json(f"{data}/manifest.json", {"classes": ["a", "b"], "resolution": 32, "image_format": "png",
                                         "splits": {"train": {"count": 9, "shards": ["train-000000.tar"],
                                                              "shard_size": 9}}})
    s = run(tiny_config(data, str(tmp_path / "run"), max_epoch=2))
    assert (s.steps, s.epoch, s.skipped) == (2, 2, 1)


def test_incompatible_teacher_grid_fails_at_start(tiny_shards, tmp_path):
    # tiny-dinov2 at 42 px has a 3x3 grid: it does not divide the 8x8 latent grid.
    with pytest.raises(ReaLSError, match="teacher grid 3x3.*latent grid 8x8"):
        run(tiny_config(tiny_shards, str(tmp_path / "run"), max_steps=1, dino_input_size=42))
    assert not exists(str(tmp_path / "run" / "latest.json"))


def test_cli_yaml_and_flags(tiny_shards, tmp_path, capsys):
    cfg = tmp_path / "vae.yaml"
    cfg.write_text("\n".join(f"{k}: {v}" for k, v in TINY.items() if k != "show_progress") + "\n")
    out = str(tmp_path / "run")
    args = ["train-vae", "--data-path", tiny_shards, "--output", out, "--config", str(cfg), "--no-progress"]
    assert main(args + ["--max-steps", "2", "--align-weight", "0"]) == 0
    printed = capsys.readouterr().out
    assert "unaligned baseline" in printed and "perceptual: none" in printed
    recorded = json.loads(read_bytes(join(out, "config.json")))
    assert recorded["align_weight"] == 0 and (recorded["shards"], recorded["teacher"]) == (tiny_shards, "tiny-dinov2")
    assert main(args) == 2  # neither --max-steps nor --max-epoch
    assert "--max-steps or --max-epoch" in capsys.readouterr().err
    assert main(args + ["--max-epoch", "1"]) == 2  # the run exists and --resume is missing
    assert main(args + ["--max-epoch", "1", "--resume"]) == 0
    assert load_checkpoint(join(out, "0000006.pt"))["epoch"] == 1


def test_renamed_fields_still_read_their_reals_names(tiny_shards, tmp_path):
    """`shards`/`teacher`/`teacher_input_size` take YAML's and old checkpoints' `data_path`/`dino_model`/..."""
    config = tiny_config(tiny_shards, str(tmp_path / "run"), max_steps=1, dino_input_size=56)
    assert (config.shards, config.teacher, config.teacher_input_size) == (tiny_shards, "tiny-dinov2", 56)
    dumped = config.model_dump()
    assert {"shards", "teacher", "teacher_input_size"} <= set(dumped) and "data_path" not in dumped
    former = {"shards": "data_path", "teacher": "dino_model", "teacher_input_size": "dino_input_size"}
    saved = {former.get(k, k): v for k, v in dumped.items()}  # a checkpoint written before the rename
    check_resumable(config.output, saved, config, RESUME_KEYS)
    with pytest.raises(StageError, match="cannot resume .*: shards was 'elsewhere'"):
        check_resumable(config.output, {**saved, "data_path": "elsewhere"}, config, RESUME_KEYS)
