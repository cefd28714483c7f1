"""Foreign checkpoints, built in the official layouts (SiT/DiT/REPA train.py, bare state dicts) with random weights."""
from __future__ import annotations

import argparse

import pytest
import torch

from pipelines import StageError
from pipelines.cli import main
from pipelines.generator_checkpoint import load_recognised, model_spec, recognise, sde_diffusion_form
from pipelines.sampling import make_sampler
from pipelines.stages.sample import SampleConfig, run, sample_spec
from reals.sit import create_sit

NAME = "SiT-T/2"


def random_sit(seed=0):
    torch.manual_seed(seed)
    m = create_sit(NAME, input_size=4, in_channels=4, num_classes=3).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.1)
    return m


def projectors(hidden=128, projector_dim=32, z_dim=16):
    """REPA's ``projectors``: a ModuleList of Linear-SiLU-Linear-SiLU-Linear (``build_mlp``)."""
    shapes = {"0": (projector_dim, hidden), "2": (projector_dim, projector_dim), "4": (z_dim, projector_dim)}
    out = {}
    for i, (o, n) in shapes.items():
        out[f"projectors.0.{i}.weight"], out[f"projectors.0.{i}.bias"] = torch.randn(o, n), torch.randn(o)
    return out


def train_py(state, **args):
    """The dict SiT's, DiT's and REPA's train.py save: model, ema, opt, args (an argparse.Namespace)."""
    return {"model": state, "ema": state, "opt": {"state": {}, "param_groups": []}, "args": argparse.Namespace(**args)}


def save(obj, path):
    torch.save(obj, path)
    return str(path)


def weights_equal(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_sit_train_py_loads_through_the_namespace_allow_list(tmp_path):
    state = random_sit().state_dict()
    url = save(train_py(state, model=NAME, path_type="GVP", prediction="velocity", image_size=32), tmp_path / "0001.pt")
    with pytest.raises(Exception, match="argparse.Namespace"):
        torch.load(url, weights_only=True)  # the plain weights_only load refuses it
    rec = load_recognised(url)
    assert (rec.format, rec.family) == ("SiT train.py", "SiT")
    assert rec.checkpoint["args"] == {"model": NAME, "path_type": "GVP", "prediction": "velocity"}
    assert weights_equal(rec.checkpoint["ema"], state)
    with pytest.raises(StageError, match="path 'VP'"):
        recognise(train_py(state, model=NAME, path_type="VP"), "x.pt")
    with pytest.raises(StageError, match="--model SiT-B/2 disagrees"):
        recognise(train_py(state, model=NAME), "x.pt", "SiT-B/2")


def test_bare_state_dicts_need_their_family_named(tmp_path):
    state = random_sit().state_dict()
    with pytest.raises(StageError, match=r"shapes are those of T/2\).*name the family"):
        recognise(state, str(tmp_path / "weights.pt"))
    assert recognise(state, "weights.pt", NAME).family == "SiT"
    official = recognise(state, str(tmp_path / "SiT-T-2-32x32.pt"))
    assert (official.format, official.checkpoint["args"]["model"]) == ("SiT state dict", NAME)
    dit = recognise(state, str(tmp_path / "DiT-T-2-32x32.pt"))
    assert (dit.family, dit.checkpoint["args"]["model"]) == ("DiT", "DiT-T/2")
    with pytest.raises(StageError, match="--model SiT-T/2 is a SiT, but DiT-T-2-32x32.pt is named as a DiT"):
        recognise(state, "DiT-T-2-32x32.pt", NAME)


def test_repa_checkpoints_drop_projectors_and_convert_time_and_sign(tmp_path):
    repa = random_sit(1)  # REPA's SiT without its projectors has SiT's layout; it runs in REPA's time
    state = {**repa.state_dict(), **projectors()}
    url = save(train_py(state, model=NAME, path_type="linear", prediction="v", enc_type="dinov2-vit-b",
                        encoder_depth=2, proj_coeff=0.5), tmp_path / "0400000.pt")
    rec = load_recognised(url)
    assert (rec.format, rec.family, rec.checkpoint["args"]["path_type"]) == ("REPA train.py", "SiT", "Linear")
    assert not any(k.startswith("projectors.") for k in rec.checkpoint["ema"])
    ours = create_sit(NAME, input_size=4, in_channels=4, num_classes=3).eval()
    ours.load_state_dict(rec.checkpoint["ema"])
    x, y = torch.randn(5, 4, 4, 4), torch.tensor([0, 1, 2, 3, 1])
    t = torch.tensor([0.0, 0.1, 0.5, 0.77, 1.0])
    with torch.no_grad():
        # SiT's time t is REPA's 1 - t, and REPA's velocity d/dt is minus SiT's.
        assert torch.allclose(ours(x, t, y), -repa(x, 1 - t, y), atol=1e-5)
    bare = recognise(state, "last.pt")  # REPA's released file: a bare state dict with projectors
    assert (bare.format, bare.checkpoint["args"]["model"]) == ("REPA state dict", NAME)
    assert weights_equal(bare.checkpoint["ema"], rec.checkpoint["ema"])
    cosine = recognise(train_py(state, model=NAME, path_type="cosine", prediction="v", enc_type="x"), "c.pt")
    assert cosine.checkpoint["args"]["path_type"] == "GVP"
    legacy = {k.replace("blocks.", "decoder_blocks."): v for k, v in state.items()}
    with pytest.raises(StageError, match="decoder_blocks"):
        recognise(legacy, "last.pt", NAME)


def test_cli_writes_a_weights_only_checkpoint_and_refuses_mismatches(tmp_path, capsys):
    state = {**random_sit().state_dict(), **projectors()}
    src = save(train_py(state, model=NAME, path_type="linear", prediction="v", enc_type="e"), tmp_path / "r.pt")
    out = tmp_path / "imported.pt"
    assert main(["import-checkpoint", src, "--output", str(out)]) == 0
    assert "REPA train.py" in capsys.readouterr().out
    ckpt = torch.load(out, weights_only=True)  # no allow-list needed any more
    assert recognise(ckpt, str(out)).format == "ReaLS checkpoint"
    qk_norm = {**state, "blocks.0.attn.q_norm.weight": torch.ones(32)}  # REPA --qk-norm: not this SiT
    src = save(train_py(qk_norm, model=NAME, path_type="linear", prediction="v", enc_type="e"), tmp_path / "q.pt")
    assert main(["import-checkpoint", src, "--output", str(tmp_path / "q2.pt")]) == 2
    assert "q_norm" in capsys.readouterr().err
    assert not (tmp_path / "q2.pt").exists()


def test_dit_checkpoints_are_never_sampled_as_sit(tmp_path, capsys):
    state = random_sit().state_dict()
    src = save(train_py(state, model="DiT-T/2", image_size=32, num_classes=3), tmp_path / "0000100.pt")
    rec = load_recognised(src)
    assert (rec.format, rec.family) == ("DiT train.py", "DiT")
    config = SampleConfig(mode="ODE", ckpt=src, vae_path=str(tmp_path / "no-vae"), output=str(tmp_path / "s.npz"))
    with pytest.raises(StageError, match="ODE samples a SiT, but the checkpoint holds DiT-T/2, a DiT"):
        run(config)
    assert not (tmp_path / "s.npz").exists()


def test_repa_imports_keep_repas_sde_diffusion_recorded_from_the_import(tmp_path):
    """REPA samples its SDE with diffusion 2t (SiT's "linear" form) on both its paths; SiT's checkpoints with
    sigma_t. The import's record decides, also for a file written by import-checkpoint and read back."""
    state = {**random_sit().state_dict(), **projectors()}
    src = save(train_py(state, model=NAME, path_type="cosine", prediction="v", enc_type="e"), tmp_path / "r.pt")
    out = tmp_path / "imported.pt"
    assert main(["import-checkpoint", src, "--output", str(out)]) == 0
    imported = torch.load(out, weights_only=True)
    assert sde_diffusion_form(imported) == sde_diffusion_form(recognise(state, "last.pt").checkpoint) == "linear"
    sit = recognise(train_py(random_sit().state_dict(), model=NAME, path_type="GVP"), "s.pt").checkpoint
    assert sde_diffusion_form(sit) == "sigma"
    name, kw = model_spec(imported, ckpt_url=str(out))
    config = dict(mode="SDE", ckpt=str(out), vae_path=str(tmp_path), output=str(tmp_path / "s.npz"))
    spec = sample_spec(SampleConfig(**config), str(out), imported, name, kw, "fp")
    assert (spec["path_type"], spec["diffusion_form"]) == ("GVP", "linear")
    sampler = make_sampler(spec)
    assert sampler.diffusion_form == "linear" and sampler.diffusion(0.5) == pytest.approx(0.5)
    forced = sample_spec(SampleConfig(**config, diffusion_form="sigma"), str(out), imported, name, kw, "fp")
    assert forced["diffusion_form"] == "sigma" and forced["run"] != spec["run"]


def test_sde_heun_without_a_last_step_is_refused_in_one_line(tmp_path):
    out = save(recognise(train_py(random_sit().state_dict(), model=NAME), "s.pt").checkpoint, tmp_path / "s.pt")
    ckpt = torch.load(out, weights_only=True)
    name, kw = model_spec(ckpt, ckpt_url=out)
    config = SampleConfig(mode="SDE", ckpt=out, vae_path=str(tmp_path), output=str(tmp_path / "s.npz"),
                          sampling_method="heun", last_step="none")
    with pytest.raises(StageError, match=r"^SDE heun with last step none .* use another last step, or euler$"):
        make_sampler(sample_spec(config, out, ckpt, name, kw, "fp"))
