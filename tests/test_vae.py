"""The ReaLS VAE wrapper, its configs, losses and discriminator (no shards needed)."""
from __future__ import annotations

import json

import pytest
import torch

from reals import ReaLSError
from reals.align import AlignNet
from reals.discriminator import NLayerDiscriminator
from reals.losses import (AutoencoderLoss, PerceptualLoss, adaptive_weight, hinge_d_loss, kl_loss,
                          lpips_backbone_file, reconstruction_loss)
from reals.vae import VAE_CONFIGS, ReaLSVAE, build_vae, downsample_factor


def tiny_reals(seed: int = 0, mean=None, std=None) -> ReaLSVAE:
    torch.manual_seed(seed)
    return ReaLSVAE(build_vae("tiny"), AlignNet(4, 32, hidden_dim=16), mean, std).eval()


# ---------------------------------------------------------------------------------------------------
# Configs and building
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, size, factor", [("tiny", 32, 4), ("demo", 32, 4), ("sd-f8c4", 64, 8)])
def test_registry_configs_give_documented_latent_shapes(name, size, factor):
    vae = build_vae(name)
    assert downsample_factor(vae) == factor
    with torch.no_grad():
        post = vae.encode(torch.zeros(1, 3, size, size)).latent_dist
        rec = vae.decode(post.mean).sample
    assert tuple(post.mean.shape) == (1, 4, size // factor, size // factor)
    assert tuple(rec.shape) == (1, 3, size, size)


def test_unknown_config_is_a_clear_error():
    with pytest.raises(ReaLSError, match="unknown VAE config 'nope'.*tiny"):
        build_vae("nope")
    assert set(VAE_CONFIGS) == {"sd-f8c4", "demo", "tiny"}


def test_build_vae_from_state_dict_file_and_diffusers_dir(tmp_path):
    torch.manual_seed(1)
    vae = build_vae("tiny")
    torch.save(vae.state_dict(), tmp_path / "vae.pt")
    vae.save_pretrained(tmp_path / "dir")
    for loaded in (build_vae("tiny", tmp_path / "vae.pt"), build_vae("sd-f8c4", tmp_path / "dir")):
        assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(), loaded.state_dict().values()))
    with pytest.raises(ReaLSError, match="does not fit config demo"):
        build_vae("demo", tmp_path / "vae.pt")
    with pytest.raises(ReaLSError, match="not found"):
        build_vae("tiny", tmp_path / "missing.pt")


# ---------------------------------------------------------------------------------------------------
# ReaLSVAE
# ---------------------------------------------------------------------------------------------------

def test_reals_vae_save_load_roundtrip_and_normalisation(tmp_path):
    model = tiny_reals(mean=[0.1, -0.2, 0.3, 0.0], std=[2.0, 0.5, 1.0, 4.0])
    model.save_pretrained(tmp_path / "vae", {"teacher": {"name": "tiny-dinov2"}, "resolution": 32})
    loaded = ReaLSVAE.from_pretrained(tmp_path / "vae")
    assert loaded.fingerprint == model.fingerprint
    assert loaded.provenance["teacher"]["name"] == "tiny-dinov2"
    assert (loaded.latent_channels, loaded.downsample_factor, loaded.resolution) == (4, 4, 32)

    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        mean, std = loaded.encode(x)
        ref_mean, ref_std = model.encode(x)
        z_norm = loaded.normalize(mean)
        expected = (mean - torch.tensor([0.1, -0.2, 0.3, 0.0]).view(1, 4, 1, 1)) / torch.tensor(
            [2.0, 0.5, 1.0, 4.0]).view(1, 4, 1, 1)
        torch.testing.assert_close(z_norm, expected)
        torch.testing.assert_close(loaded.denormalize(z_norm), mean)
        torch.testing.assert_close(loaded.decode(mean), model.decode(ref_mean))
        patch, global_ = loaded.semantic_features(z_norm)
        ref_patch, ref_global = model.align_net(mean)
    torch.testing.assert_close((mean, std), (ref_mean, ref_std))
    torch.testing.assert_close((patch, global_), (ref_patch, ref_global))
    assert patch.shape == (2, 32, 8, 8) and global_.shape == (2, 32)
    stats = json.loads((tmp_path / "vae" / "mean_std.json").read_text())
    assert stats["latents_std"] == pytest.approx([2.0, 0.5, 1.0, 4.0])
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert config["latents_mean"] == pytest.approx([0.1, -0.2, 0.3, 0.0])


def test_a_vae_dir_with_the_older_mean_std_names_still_loads(tmp_path):
    model = tiny_reals(mean=[0.1, -0.2, 0.3, 0.0], std=[2.0, 0.5, 1.0, 4.0])
    model.save_pretrained(tmp_path / "vae", {"resolution": 32})
    (tmp_path / "vae" / "mean_std.json").write_text(json.dumps({"mean": [0.1, -0.2, 0.3, 0.0],
                                                                "std": [2.0, 0.5, 1.0, 4.0]}))
    loaded = ReaLSVAE.from_pretrained(tmp_path / "vae")
    assert loaded.latents_std.tolist() == pytest.approx([2.0, 0.5, 1.0, 4.0])
    assert loaded.fingerprint == model.fingerprint


def test_fingerprint_follows_weights_and_statistics():
    a, b = tiny_reals(seed=0), tiny_reals(seed=0)
    assert a.fingerprint == b.fingerprint
    assert tiny_reals(seed=1).fingerprint != a.fingerprint
    assert tiny_reals(seed=0, std=[1.0, 1.0, 1.0, 2.0]).fingerprint != a.fingerprint


def test_from_pretrained_names_missing_files(tmp_path):
    with pytest.raises(ReaLSError, match="mean_std.json.*reals convert"):
        ReaLSVAE.from_pretrained(tmp_path)
    with pytest.raises(ReaLSError, match="std must be positive"):
        tiny_reals(std=[1.0, 0.0, 1.0, 1.0])


def test_training_forward_detaches_heads_for_the_probe():
    model = tiny_reals().train()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    for detach, expect_grad in ((False, True), (True, False)):
        model.zero_grad()
        out = model(x, detach_heads=detach)
        out["patch"].square().mean().backward()
        enc_grad = model.vae.encoder.conv_in.weight.grad
        assert (enc_grad is not None and enc_grad.abs().sum() > 0) == expect_grad
        assert model.align_net.mlp_patch[0].weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------

def test_lpips_without_backbone_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-hub"))
    expected = lpips_backbone_file("vgg")
    assert str(expected).startswith(str(tmp_path))
    with pytest.raises(ReaLSError, match=r"vgg16-.*\.pth.*perceptual: none.*perceptual: random"):
        PerceptualLoss("lpips", "vgg")


def test_lpips_loads_backbone_from_torch_hub_cache(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    backbone = torchvision.models.squeezenet1_1().state_dict()
    path = lpips_backbone_file("squeeze")
    path.parent.mkdir(parents=True)
    torch.save(backbone, path)
    loss = PerceptualLoss("lpips", "squeeze")
    assert "LPIPS" in loss.describe() and str(path) in loss.describe()
    first = loss.net.net.slice1[0].weight
    torch.testing.assert_close(first, backbone["features.0.weight"])
    assert not any(p.requires_grad for p in loss.parameters())
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(loss(x, x), torch.zeros(2), atol=1e-6)
        assert bool((loss(x, y) > 0).all())


def test_perceptual_none_and_random_say_what_they_are():
    none = PerceptualLoss("none")
    assert not none.enabled and "none" in none.describe()
    assert torch.equal(none(torch.zeros(3, 3, 8, 8), torch.ones(3, 3, 8, 8)), torch.zeros(3))
    rand = PerceptualLoss("random", "squeeze")
    assert rand.enabled and "not the LPIPS metric" in rand.describe()
    with pytest.raises(ReaLSError, match="unknown perceptual loss"):
        PerceptualLoss("perceptron")


def test_reconstruction_kl_and_hinge_values():
    x, y = torch.zeros(2, 3, 4, 4), torch.full((2, 3, 4, 4), 0.5)
    torch.testing.assert_close(reconstruction_loss(x, y, "l1"), torch.full((2,), 0.5))
    torch.testing.assert_close(reconstruction_loss(x, y, "mse"), torch.full((2,), 0.25))
    zeros = torch.zeros(2, 4, 2, 2)
    torch.testing.assert_close(kl_loss(zeros, zeros, 48), torch.zeros(2))
    # KL of N(1, 1) from N(0, 1) is 1/2 per value: 16 values / 48 image values.
    torch.testing.assert_close(kl_loss(torch.ones(2, 4, 2, 2), zeros, 48), torch.full((2,), 8 / 48))
    assert hinge_d_loss(torch.full((4,), 2.0), torch.full((4,), -2.0)).item() == 0.0
    assert hinge_d_loss(torch.zeros(4), torch.zeros(4)).item() == pytest.approx(1.0)


def test_adaptive_weight_is_ratio_of_last_layer_gradient_norms():
    last = torch.nn.Parameter(torch.randn(3, 3))
    nll = (last * 2.0).sum()          # gradient: all 2
    g = (last * 0.5).sum()            # gradient: all 0.5
    w = adaptive_weight(nll, g, last)
    assert w.item() == pytest.approx(6.0 / (1.5 + 1e-4), rel=1e-5)
    assert not w.requires_grad
    assert adaptive_weight(nll, g * 0, last, max_weight=100.0).item() == pytest.approx(100.0)


def test_autoencoder_loss_adds_gan_term_only_with_logits():
    model = tiny_reals().train()
    disc = NLayerDiscriminator(3, 8, 2)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    crit = AutoencoderLoss(PerceptualLoss("none"), disc_start=5)
    assert not crit.gan_active(4) and crit.gan_active(5)
    out = model(x)
    plain = crit(x, out)
    assert "g" not in plain
    logits = disc(out["rec"])
    assert logits.shape[:2] == (2, 1)
    with_gan = crit(x, out, logits, model.vae.decoder.conv_out.weight)
    expected = plain["loss"] + with_gan["d_weight"] * with_gan["g"]
    torch.testing.assert_close(with_gan["loss"], expected)
    assert with_gan["d_weight"].item() > 0
