"""reals sample: per-sample seeds, ADM-layout output, worker-count independence, resume by range, refusals;
DiT checkpoints by DDPM and DDIM, and each family refused by the other's samplers."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from pipelines import StageError
from pipelines.checkpoints import load_checkpoint
from pipelines.cli import main
from pipelines.generator_checkpoint import model_spec
from pipelines.sampling import sample_labels
from pipelines.stages.sample import SampleConfig, SampleWorker, run, sample_spec
from pipelines.stages.train_sit import TrainDiTConfig, TrainSiTConfig
from pipelines.stages.train_sit import run as train

from helpers import make_vae_dir

N = 20  # samples; units of 6 -> ranges 0-6, 6-12, 12-18, 18-20


def train_tiny(config_class, model: str, store, vae_dir, root) -> dict:
    """A 3-step run of ``model`` on the tiny latent store (encoded by the tiny VAE it samples with)."""
    summary = train(config_class(data_path=store.url, output=str(root / "run"), model=model, global_batch_size=8,
                                 max_steps=3, sample_every=0, ema_decay=0.5, show_progress=False))
    return {"root": root, "vae": vae_dir, "ckpt": summary.checkpoint, "run": str(root / "run")}


@pytest.fixture(scope="module")
def trained(tiny_store, tiny_vae_dir, tmp_path_factory):
    return train_tiny(TrainSiTConfig, "SiT-T/4", tiny_store, tiny_vae_dir, tmp_path_factory.mktemp("sample"))


def sample_config(trained, output, **kw) -> SampleConfig:
    base = dict(mode="SDE", ckpt=trained["ckpt"], vae_path=trained["vae"], output=str(output), num_fid_samples=N,
                unit_size=6, per_proc_batch_size=4, num_sampling_steps=4, cfg_scale=1.5,
                guidance_interval=(0.0, 0.75), labels="balanced", save_latents=True, show_progress=False)
    return SampleConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def two_workers(trained, ray_session):
    out = trained["root"] / "two" / "samples.npz"
    return run(sample_config(trained, out, workers=2, keep_parts=True)), out


def test_two_workers_draw_exactly_what_one_draws(trained, two_workers):
    summary, out2 = two_workers
    one = run(sample_config(trained, trained["root"] / "one" / "samples.npz", workers=1))
    assert (summary.workers, one.workers, summary.parts, summary.parts_sampled) == (2, 1, 4, 4)
    assert len(os.listdir(f"{out2}.parts")) == 8  # kept: --keep-parts
    assert not os.path.exists(f"{one.output}.parts")  # removed once the merged file read back whole
    with np.load(out2) as a, np.load(one.output) as b:
        assert sorted(a.files) == sorted(b.files) == ["arr_0", "arr_1", "latents"]
        for key in a.files:
            assert np.array_equal(a[key], b[key]), key


def test_npz_is_adm_layout_with_balanced_labels(two_workers):
    summary, out = two_workers
    with np.load(out) as f:
        images, labels, latents = f["arr_0"], f["arr_1"], f["latents"]
    assert images.dtype == np.uint8 and images.shape == (N, 32, 32, 3)
    assert labels.dtype == np.int64 and labels.shape == (N,)
    assert latents.dtype == np.float32 and latents.shape == (N, 4, 8, 8)
    assert np.bincount(labels).tolist() == [N // 4] * 4 == summary.label_counts
    assert labels.tolist() == [i % 4 for i in range(N)]
    assert images.std() > 0 and os.path.getsize(summary.grid) > 0


def test_rerun_redoes_only_the_deleted_and_the_damaged_part(trained, two_workers):
    summary, out = two_workers
    with np.load(out) as f:
        before = {k: f[k] for k in f.files}
    os.remove(f"{out}.parts/00000006-00000012.npz")
    with open(f"{out}.parts/00000012-00000018.npz", "ab") as f:  # bytes that disagree with the marker
        f.write(b"x")
    again = run(sample_config(trained, out, workers=1))
    assert (again.parts_sampled, again.parts_reused, again.samples_sampled) == (2, 2, 12)
    with np.load(out) as f:
        assert all(np.array_equal(f[k], before[k]) for k in before)


@pytest.mark.parametrize("run_fixture, settings", [("trained", {"mode": "ODE", "sampling_method": "euler"}),
                                                   ("trained_dit", {"mode": "DDIM", "num_sampling_steps": 10})])
def test_each_sample_depends_only_on_its_own_seeds(run_fixture, settings, request):
    trained = request.getfixturevalue(run_fixture)
    labels = sample_labels("random", 7, 3, range(12)).tolist()
    assert sample_labels("random", 7, 3, [5, 9]).tolist() == [labels[5], labels[9]]
    assert labels != sample_labels("random", 7, 4, range(12)).tolist()
    config = sample_config(trained, trained["root"] / "x.npz", labels="random", **settings)
    ckpt = load_checkpoint(trained["ckpt"])
    name, kw = model_spec(ckpt)
    worker = SampleWorker({**sample_spec(config, trained["ckpt"], ckpt, name, kw, "fp"), "device": "cpu"})
    images, y, z = worker.sample(np.arange(6))
    images2, y2, z2 = worker.sample(np.array([4, 1]))
    assert y2.tolist() == [y[4], y[1]]
    np.testing.assert_allclose(z2, z[[4, 1]], atol=1e-5)


def test_bare_state_dict_checkpoints_are_understood(trained, tmp_path):
    ckpt = load_checkpoint(trained["ckpt"])
    torch.save(dict(ckpt["ema"]), tmp_path / "SiT-T-4.pt")
    bare = load_checkpoint(str(tmp_path / "SiT-T-4.pt"))
    assert model_spec(bare, "SiT-T/4") == model_spec(ckpt)
    with pytest.raises(StageError, match="pass --model"):
        model_spec(bare)


def test_refusals_name_what_disagrees(trained, tmp_path, capsys):
    with pytest.raises(StageError, match=r"takes latents 4x8x8, the VAE .* makes 4x16x16"):
        run(sample_config(trained, tmp_path / "a.npz", vae_path=make_vae_dir(tmp_path / "v64", resolution=64)))
    with pytest.raises(StageError, match="trained on latents of VAE"):
        run(sample_config(trained, tmp_path / "b.npz", vae_path=make_vae_dir(tmp_path / "v1", seed=1)))
    with pytest.raises(StageError, match="--model SiT-T/2 disagrees"):
        run(sample_config(trained, tmp_path / "c.npz", model="SiT-T/2"))
    code = main(["sample", "ode", "--ckpt", trained["run"], "--vae-path", trained["vae"], "--output",
                 str(tmp_path / "d.png")])
    assert code == 2 and "must end with .npz" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# DiT: DDPM and DDIM
# ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_dit(tiny_store, tiny_vae_dir, tmp_path_factory):
    return train_tiny(TrainDiTConfig, "DiT-T/4", tiny_store, tiny_vae_dir, tmp_path_factory.mktemp("sample-dit"))


def test_ddpm_two_workers_draw_exactly_what_one_draws(trained_dit, ray_session):
    out = trained_dit["root"]
    two = run(sample_config(trained_dit, out / "two.npz", mode="DDPM", num_sampling_steps=10, workers=2))
    one = run(sample_config(trained_dit, out / "one.npz", mode="DDPM", num_sampling_steps=10, workers=1))
    assert (two.workers, one.workers, two.model, two.nfe) == (2, 1, "DiT-T/4", 10)
    with np.load(out / "two.npz") as a, np.load(out / "one.npz") as b:
        assert a["arr_0"].shape == (N, 32, 32, 3) and np.isfinite(a["latents"]).all()
        for key in a.files:
            assert np.array_equal(a[key], b[key]), key


def test_each_family_is_refused_by_the_others_samplers(trained, trained_dit, tmp_path):
    with pytest.raises(StageError, match="DDPM samples a DiT, but the checkpoint holds SiT-T/4, a SiT: sample it "
                                         "with ODE or SDE"):
        run(sample_config(trained, tmp_path / "a.npz", mode="DDPM"))
    with pytest.raises(StageError, match="ODE samples a SiT, but the checkpoint holds DiT-T/4, a DiT"):
        run(sample_config(trained_dit, tmp_path / "b.npz", mode="ODE"))
    with pytest.raises(StageError, match="--model SiT-T/4 disagrees with the checkpoint, which holds a DiT-T/4"):
        run(sample_config(trained_dit, tmp_path / "c.npz", mode="ODE", model="SiT-T/4"))
    torch.save(dict(load_checkpoint(trained_dit["ckpt"])["ema"]), tmp_path / "DiT-T-4.pt")
    bare = load_checkpoint(str(tmp_path / "DiT-T-4.pt"))
    with pytest.raises(StageError, match="--model SiT-T/4 is a SiT, but DiT-T-4.pt is named as a DiT checkpoint"):
        model_spec(bare, "SiT-T/4", ckpt_url=str(tmp_path / "DiT-T-4.pt"))
    name, kw = model_spec(bare, "DiT-T/4", ckpt_url=str(tmp_path / "DiT-T-4.pt"))
    assert (name, kw["learn_sigma"]) == ("DiT-T/4", True)
