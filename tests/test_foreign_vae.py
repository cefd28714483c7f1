"""A stock diffusers AutoencoderKL directory (SD-VAE's layout) as the VAE: `reals convert --from-diffusers`."""
from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
import torch

from pipelines import StageError
from pipelines.cli import main
from pipelines.stages.convert import ConvertConfig, run
from reals import ReaLSError
from reals.vae import ReaLSVAE, build_vae
from storage.markers import write_json
from storage.shards import iter_shards, shard_urls, write_shard

NUM = 12


def png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """One train shard of 16 smooth 32 px images and its manifest (written directly, no Ray)."""
    root = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 90, 32)[None, :, None, None]
    images = np.clip(rng.integers(30, 160, (16, 1, 1, 3)) + ramp, 0, 255).astype(np.uint8)
    images = images.repeat(32, axis=1).reshape(16, 32, 32, 3)
    write_shard(f"{root}/train-000000.tar", [{"__key__": f"k{i:03d}", "png": png(images[i]), "cls": i % 2,
                                              "json": {}} for i in range(16)])
    write_json(f"{root}/manifest.json", {"classes": ["a", "b"], "resolution": 32, "image_format": "png",
                                         "fingerprint": "foreign-vae", "splits": {"train": {
                                             "count": 16, "shards": ["train-000000.tar"], "shard_size": 16}}})
    return str(root)


@pytest.fixture(scope="module")
def stock(tmp_path_factory):
    """A diffusers AutoencoderKL directory with random weights: config.json + safetensors, no heads, no stats."""
    path = tmp_path_factory.mktemp("stock") / "sd-vae-like"
    torch.manual_seed(3)
    vae = build_vae("tiny")
    vae.register_to_config(scaling_factor=0.18215)
    vae.save_pretrained(str(path), safe_serialization=True)
    return path


def diffusers_normalise(config: dict, z: torch.Tensor) -> torch.Tensor:
    """What diffusers' pipelines do with a VAE config: (z - latents_mean) * scaling_factor / latents_std."""
    mean, std = config.get("latents_mean"), config.get("latents_std")
    if mean is None:
        return z * config["scaling_factor"]
    view = lambda v: torch.tensor(v).view(1, -1, 1, 1)  # noqa: E731
    return (z - view(mean)) * config["scaling_factor"] / view(std)


def test_statistics_from_shards_and_diffusers_convention_agree(stock, shards, tmp_path):
    with pytest.raises(ReaLSError, match="missing mean_std.json.*--from-diffusers"):
        ReaLSVAE.from_pretrained(stock)
    out = tmp_path / "vae-dir"
    s = run(ConvertConfig(from_diffusers=str(stock), output_dir=str(out), data_path=shards, num_samples=NUM,
                          batch_size=5, show_progress=False))
    vae = ReaLSVAE.from_pretrained(out)
    assert not vae.has_heads and vae.fingerprint == s.fingerprint and s.num_images == NUM
    images = [r["image"] for r in iter_shards(shard_urls(shards), split_by_worker=False)][:NUM]
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        z = vae.encode(x)[0]
    zd = z.double().numpy()
    np.testing.assert_allclose(s.latents_mean, zd.mean(axis=(0, 2, 3)), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(s.latents_std, zd.std(axis=(0, 2, 3)), rtol=1e-6, atol=1e-8)  # population std
    config = json.loads((out / "config.json").read_text())
    assert config["scaling_factor"] == 1.0
    assert torch.allclose(diffusers_normalise(config, z), vae.normalize(z), atol=1e-5)
    prov = vae.provenance
    assert prov["source"]["heads"] is False and prov["resolution"] == 32 and prov["latent_shape"] == [4, 8, 8]
    with pytest.raises(ReaLSError, match="needs the VAE's alignment heads"):
        vae.semantic_features(torch.zeros(1, 4, 8, 8))
    again = run(ConvertConfig(from_diffusers=str(stock), output_dir=str(out), data_path=shards,
                              num_samples=NUM, show_progress=False))
    assert again.skipped and again.fingerprint == s.fingerprint


def test_scaling_factor_means_mean_zero_std_inverse(stock, tmp_path, capsys):
    out = tmp_path / "dit-style"
    assert main(["convert", "--from-diffusers", str(stock), "--scaling-factor", "0.18215", "--resolution", "32",
                 "--output-dir", str(out)]) == 0
    vae = ReaLSVAE.from_pretrained(out)
    assert vae.latents_mean.tolist() == [0.0] * 4 and vae.latents_std.tolist() == pytest.approx([1 / 0.18215] * 4)
    config = json.loads((out / "config.json").read_text())
    assert config["scaling_factor"] == pytest.approx(0.18215) and config["latents_mean"] is None
    z = torch.randn(2, 4, 8, 8)
    assert torch.allclose(diffusers_normalise(config, z), vae.normalize(z), atol=1e-5)
    capsys.readouterr()
    assert main(["convert", "--from-diffusers", str(stock), "--output-dir", str(tmp_path / "x")]) == 2
    assert "--data-path is required" in capsys.readouterr().err
    assert main(["convert", "--ckpt", "a.pt", "--from-diffusers", str(stock), "--scaling-factor", "1",
                 "--output-dir", str(tmp_path / "y")]) == 2
    assert "exactly one of --ckpt" in capsys.readouterr().err
    with pytest.raises(StageError, match="not a diffusers AutoencoderKL directory"):
        run(ConvertConfig(from_diffusers=str(tmp_path), output_dir=str(tmp_path / "z"), scaling_factor=1.0))


def to_ldm_layout(state: dict, num_blocks: int, prefix: str = "") -> dict:
    """A diffusers AutoencoderKL state dict written in the original LDM (CompVis) key layout, with the
    mid-block attention as 1x1 convolutions, as the single-file SD-VAE weights are stored."""
    out = {}
    for key, value in state.items():
        k = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        k = re.sub(r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block.", k)
        k = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", k)
        k = re.sub(r"up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.",
                   lambda m: f"up.{num_blocks - 1 - int(m[1])}.{'block' if m[2] == 'resnets' else 'upsample'}.", k)
        k = re.sub(r"mid_block\.resnets\.(\d)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", k)
        if "mid_block.attentions.0." in k:
            k = k.replace("mid_block.attentions.0.", "mid.attn_1.").replace("group_norm", "norm")
            k = re.sub(r"to_(q|k|v)\.", r"\1.", k).replace("to_out.0.", "proj_out.")
            value = value[:, :, None, None] if value.ndim == 2 else value
        out[prefix + k] = value
    return out


@pytest.mark.parametrize("name,prefix", [("vae-ft-mse-840000-ema-pruned.safetensors", ""),
                                         ("sd.ckpt", "first_stage_model.")])
def test_vae_ckpt_takes_ldm_single_file_weights(tmp_path, name, prefix):
    torch.manual_seed(4)
    reference = build_vae("tiny")
    state = to_ldm_layout(reference.state_dict(), len(reference.config.block_out_channels), prefix)
    path = tmp_path / name
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({"state_dict": state, "global_step": 840000}, path)
    loaded = build_vae("tiny", path)
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in loaded.state_dict().items())
    with pytest.raises(ReaLSError, match="does not fit config"):
        build_vae("demo", path)


def test_encode_no_teacher_stores_latents_of_a_stock_vae(stock, shards, tmp_path, capsys):
    """fast-DiT style: a stock VAE dir names no teacher; --no-teacher stores latents only, verify-store checks them,
    train-sit trains on them, and a teacher-feature run onto that store is refused by name."""
    from pipelines.stages.train_sit import TrainSiTConfig
    from pipelines.stages.train_sit import run as train
    from pipelines.stages.verify_store import VerifyStoreConfig
    from pipelines.stages.verify_store import run as verify
    from storage.latent_store import LatentStore

    vae_dir, store = str(tmp_path / "vae"), str(tmp_path / "store")
    assert main(["convert", "--from-diffusers", str(stock), "--scaling-factor", "0.18215", "--resolution", "32",
                 "--output-dir", vae_dir]) == 0
    args = ["encode", "--data-path", shards, "--vae-path", vae_dir, "--output", store, "--workers", "0",
            "--no-progress"]
    capsys.readouterr()
    assert main(args) == 2
    assert "pass --dino-model NAME, or --no-teacher to store latents only" in capsys.readouterr().err
    assert main(args + ["--no-teacher", "--dino-model", "tiny-dinov2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --dino-model is for teacher features") and err.count("\n") == 1
    assert main(args + ["--no-teacher"]) == 0
    latents = LatentStore.open(store)
    assert not latents.has_teacher and "teacher_global" not in latents.array_names
    assert latents.attrs["teacher"] is None and int(latents.done_rows().sum()) == 16
    assert verify(VerifyStoreConfig(store=store, data_path=shards, vae_path=vae_dir, num_samples=4)).ok
    assert main(args + ["--dino-model", "tiny-dinov2"]) == 2
    assert "has teacher_features=False, this run wants True" in capsys.readouterr().err
    run_dir = tmp_path / "run"
    summary = train(TrainSiTConfig(data_path=store, output=str(run_dir), model="SiT-T/4", global_batch_size=4,
                                   max_steps=1, sample_every=0, show_progress=False))
    assert summary.checkpoint
