"""`reals convert` / `reals extract-ema`: a diffusers-loadable ReaLS VAE dir with correct latent statistics."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from pipelines import StageError
from pipelines.cli import main
from pipelines.stages.convert import (ConvertConfig, ExtractEMAConfig, missing_outputs, model_from_checkpoint, run,
                                      run_extract_ema)
from pipelines.checkpoints import load_checkpoint
from pipelines.stages.train_vae import TrainVAEConfig
from pipelines.stages.train_vae import run as train
from reals.vae import ReaLSVAE, build_vae
from storage.shards import iter_shards, shard_urls

NUM = 20


@pytest.fixture(scope="module")
def trained(tiny_shards, tmp_path_factory):
    """A 4-step tiny train-vae run: (run folder, checkpoint URL)."""
    out = str(tmp_path_factory.mktemp("vae-run"))
    s = train(TrainVAEConfig(data_path=tiny_shards, output=out, vae_config="tiny", dino_model="tiny-dinov2",
                             perceptual="none", align_hidden_dim=16, lr=2e-3, max_steps=4, ema_decay=0.5,
                             shuffle_buffer=16, show_progress=False))
    return out, s.checkpoint


@pytest.fixture(scope="module")
def converted(trained, tiny_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("vae-dir") / "reals-vae"
    summary = run(ConvertConfig(ckpt=trained[0], output_dir=str(out), data_path=tiny_shards, num_samples=NUM,
                                batch_size=7, show_progress=False))
    return out, summary


def test_converted_dir_loads_with_plain_diffusers(converted, tmp_path):
    out, summary = converted
    vae = ReaLSVAE.from_pretrained(out)
    assert vae.fingerprint == summary.fingerprint == vae.provenance["fingerprint"]
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    np.save(tmp_path / "x.npy", x.numpy())
    script = (
        "import sys, numpy as np, torch\n"
        "from diffusers import AutoencoderKL\n"
        f"vae = AutoencoderKL.from_pretrained({str(out)!r}).eval()\n"
        f"x = torch.from_numpy(np.load({str(tmp_path / 'x.npy')!r}))\n"
        "with torch.no_grad():\n"
        "    mean = vae.encode(x).latent_dist.mean\n"
        "    rec = vae.decode(mean).sample\n"
        f"np.save({str(tmp_path / 'mean.npy')!r}, mean.numpy()); np.save({str(tmp_path / 'rec.npy')!r}, rec.numpy())\n"
        "assert not any(m.split('.')[0] in ('reals', 'pipelines', 'storage') for m in sys.modules)\n"
        "print(list(vae.config.latents_std))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == pytest.approx(summary.latents_std)
    with torch.no_grad():
        mean, _ = vae.encode(x)
        rec = vae.decode(mean)
    np.testing.assert_allclose(np.load(tmp_path / "mean.npy"), mean.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.load(tmp_path / "rec.npy"), rec.numpy(), rtol=0, atol=1e-5)


def test_mean_std_match_a_direct_computation(converted, trained, tiny_shards):
    out, summary = converted
    stats = json.loads((out / "mean_std.json").read_text())
    model = model_from_checkpoint(load_checkpoint(trained[1]), ema=True)
    images = [s["image"] for s in iter_shards(shard_urls(tiny_shards), split_by_worker=False)][:NUM]
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        z = model.vae.encode(x).latent_dist.mean.double().numpy()
    assert summary.num_images == NUM
    np.testing.assert_allclose(stats["latents_mean"], z.mean(axis=(0, 2, 3)), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(stats["latents_std"], z.std(axis=(0, 2, 3)), rtol=1e-6, atol=1e-8)
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["teacher"]["name"] == "tiny-dinov2" and prov["training"]["step"] == 4
    assert prov["latent_statistics"]["num_images"] == NUM and prov["conversion"]["weights"] == "ema"


def test_rerun_skips_and_no_ema_converts_the_raw_weights(converted, trained, tiny_shards, tmp_path):
    out, summary = converted
    again = run(ConvertConfig(ckpt=trained[1], output_dir=str(out), data_path=tiny_shards, num_samples=NUM,
                              show_progress=False))
    assert again.skipped and again.fingerprint == summary.fingerprint
    raw_dir = tmp_path / "raw"
    assert main(["convert", "--ckpt", trained[1], "--output-dir", str(raw_dir), "--data-path", tiny_shards,
                 "--num-samples", str(NUM), "--no-ema", "--no-progress"]) == 0
    raw = ReaLSVAE.from_pretrained(raw_dir)
    ckpt = load_checkpoint(trained[1])
    assert raw.provenance["conversion"]["weights"] == "raw" and raw.fingerprint != summary.fingerprint
    assert torch.equal(raw.vae.state_dict()["decoder.conv_out.weight"], ckpt["vae"]["decoder.conv_out.weight"])


def test_output_dir_must_be_local(trained, tiny_shards):
    with pytest.raises(StageError, match="must be a local directory"):
        run(ConvertConfig(ckpt=trained[1], output_dir="s3://bucket/vae", data_path=tiny_shards))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_extract_ema_writes_a_loadable_state_dict(trained, tmp_path, suffix):
    path = tmp_path / f"ema{suffix}"
    s = run_extract_ema(ExtractEMAConfig(ckpt=trained[1], output=str(path)))
    ema = load_checkpoint(trained[1])["ema"]["vae"]
    vae = build_vae(s.vae_config, path)
    assert s.tensors == len(ema)
    assert all(torch.equal(v, ema[k]) for k, v in vae.state_dict().items())


def test_rerun_redoes_a_truncated_weight_file(converted, trained, tiny_shards, tmp_path, capsys):
    out, summary = converted
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    weights = copy / "diffusion_pytorch_model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[:size // 2])
    config = ConvertConfig(ckpt=trained[1], output_dir=str(copy), data_path=tiny_shards, num_samples=NUM,
                           show_progress=False)
    assert missing_outputs(config) == f"damaged: diffusion_pytorch_model.safetensors is {size // 2} bytes, {size} were written"
    again = run(config)
    assert missing_outputs(config) is None and not again.skipped and again.fingerprint == summary.fingerprint
    assert f"diffusion_pytorch_model.safetensors is {size // 2} bytes, {size} were written" in capsys.readouterr().out
    assert weights.stat().st_size == size and ReaLSVAE.from_pretrained(copy).fingerprint == summary.fingerprint
