"""Alignment network: shapes, save/load, grid rule, the alignment loss, and that it can be optimised."""
from __future__ import annotations

import json

import pytest
import torch

from reals import ReaLSError
from reals.align import AlignNet, alignment_loss, check_compatible, teacher_to_latent_grid


def test_alignnet_shapes_and_config_roundtrip():
    net = AlignNet(latent_channels=4, teacher_width=48, hidden_dim=16, num_layers=3)
    patch, glob = net(torch.randn(2, 4, 8, 6))
    assert patch.shape == (2, 48, 8, 6) and glob.shape == (2, 48)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in net.mlp_patch) == 3
    assert sum(isinstance(m, torch.nn.Linear) for m in net.mlp_cls) == 3
    clone = AlignNet.from_init_config(net.init_config)
    assert clone.init_config == net.init_config == {"latent_channels": 4, "teacher_width": 48, "hidden_dim": 16,
                                                    "num_layers": 3}
    with pytest.raises(ReaLSError, match="expected latents"):
        net(torch.randn(2, 3, 8, 8))


def test_alignnet_save_load(tmp_path):
    torch.manual_seed(0)
    net = AlignNet(4, 32, hidden_dim=16, num_layers=2)
    net.save_pretrained(tmp_path / "vae")
    saved = json.loads((tmp_path / "vae" / "align_net.json").read_text())
    assert saved["_class_name"] == "AlignNet" and {k: v for k, v in saved.items() if k[0] != "_"} == net.init_config
    loaded = AlignNet.from_pretrained(tmp_path / "vae")
    z = torch.randn(3, 4, 4, 4)
    for a, b in zip(net(z), loaded(z)):
        assert torch.equal(a, b)


def test_alignnet_load_errors(tmp_path):
    with pytest.raises(ReaLSError, match="align_net.json.*not found"):
        AlignNet.from_pretrained(tmp_path)
    AlignNet(4, 32, hidden_dim=16).save_pretrained(tmp_path)
    (tmp_path / "align_net.json").write_text(json.dumps(AlignNet(4, 32, hidden_dim=8).init_config))  # no _class_name
    with pytest.raises(ReaLSError, match="do not match"):
        AlignNet.from_pretrained(tmp_path)
    with pytest.raises(ReaLSError, match="expected keys"):
        AlignNet.from_init_config({"latent_channels": 4})
    with pytest.raises(ReaLSError, match="expected keys"):
        AlignNet.from_init_config({"latent_channels": 4, "teacher_width": 32, "width": 8})


@pytest.mark.parametrize("latent, teacher", [((8, 8), (8, 8)), ((4, 4), (7, 7)), ((32, 32), (16, 16)),
                                             ((4, 8), (8, 16)), ((8, 8), (32, 32))])
def test_compatible_grids(latent, teacher):
    check_compatible(latent, teacher)
    assert teacher_to_latent_grid(torch.randn(1, 5, *teacher), latent).shape == (1, 5, *latent)


@pytest.mark.parametrize("latent, teacher, reason", [((8, 8), (7, 7), "non-integer factor"),
                                                     ((32, 32), (12, 12), "non-integer factor"),
                                                     ((8, 8), (16, 8), "aspect ratio"),
                                                     ((4, 8), (8, 8), "aspect ratio")])
def test_incompatible_grids_raise(latent, teacher, reason):
    with pytest.raises(ReaLSError, match=reason):
        check_compatible(latent, teacher)
    pred = torch.randn(1, 5, *latent)
    with pytest.raises(ReaLSError, match=reason):
        alignment_loss(pred, torch.randn(1, 5), torch.randn(1, 5, *teacher), torch.randn(1, 5))


def test_downsampling_averages_whole_teacher_blocks():
    teacher = torch.randn(2, 3, 8, 8)
    pooled = teacher_to_latent_grid(teacher, (4, 4))
    assert torch.allclose(pooled[:, :, 1, 2], teacher[:, :, 2:4, 4:6].mean(dim=(2, 3)))


@pytest.mark.parametrize("teacher_grid", [(16, 16), (4, 4)])
def test_loss_is_zero_on_matching_features_and_positive_otherwise(teacher_grid):
    torch.manual_seed(0)
    teacher_patch, teacher_global = torch.randn(2, 24, *teacher_grid), torch.randn(2, 24)
    target = teacher_to_latent_grid(teacher_patch, (8, 8))
    exact = alignment_loss(2.0 * target, 3.0 * teacher_global, teacher_patch, teacher_global, distmat_weight=1.0)
    assert exact["loss"].item() == pytest.approx(0.0, abs=1e-5)
    assert exact["patch_cos"].item() == pytest.approx(1.0, abs=1e-5)
    assert exact["global_cos"].item() == pytest.approx(1.0, abs=1e-5)

    pred_patch, pred_global = torch.randn(2, 24, 8, 8, requires_grad=True), torch.randn(2, 24)
    off = alignment_loss(pred_patch, pred_global, teacher_patch, teacher_global, distmat_weight=1.0,
                         distmat_margin=0.0)
    assert off["patch_loss"] > 0.5 and off["global_loss"] > 0.5 and off["distmat_loss"] > 0
    assert off["loss"].item() == pytest.approx(
        (off["patch_loss"] + off["global_loss"] + off["distmat_loss"]).item(), rel=1e-5)
    off["loss"].backward()
    assert pred_patch.grad is not None and pred_patch.grad.abs().sum() > 0


def test_margins_forgive_near_matches():
    torch.manual_seed(0)
    teacher_patch, teacher_global = torch.randn(2, 16, 4, 4), torch.randn(2, 16)
    pred_patch = teacher_patch + 0.2 * torch.randn_like(teacher_patch)
    pred_global = teacher_global + 0.2 * torch.randn_like(teacher_global)
    plain = alignment_loss(pred_patch, pred_global, teacher_patch, teacher_global)
    assert plain["loss"] > 0
    cos_floor = min(plain["patch_cos"].item(), plain["global_cos"].item())
    lenient = alignment_loss(pred_patch, pred_global, teacher_patch, teacher_global, margin=1.0,
                             distmat_weight=1.0, distmat_margin=2.0)
    assert lenient["loss"].item() == 0.0
    partial = alignment_loss(pred_patch, pred_global, teacher_patch, teacher_global, margin=(1 - cos_floor) / 2)
    assert 0 < partial["loss"] < plain["loss"]


def test_weights_scale_the_terms():
    torch.manual_seed(0)
    args = (torch.randn(2, 8, 4, 4), torch.randn(2, 8), torch.randn(2, 8, 4, 4), torch.randn(2, 8))
    base = alignment_loss(*args)
    only_global = alignment_loss(*args, patch_weight=0.0, global_weight=2.0)
    assert only_global["loss"].item() == pytest.approx(2 * base["global_loss"].item(), rel=1e-6)


def test_alignnet_learns_a_fixed_teacher():
    """A few dozen Adam steps on fixed latents clearly reduce the loss towards a learnable teacher."""
    torch.manual_seed(0)
    z = torch.randn(8, 4, 4, 4)
    lift = torch.randn(32, 4)
    teacher_patch = torch.nn.functional.interpolate(torch.tanh(torch.einsum("dc,bchw->bdhw", lift, z)),
                                                    size=(8, 8), mode="nearest")
    teacher_global = teacher_patch.mean(dim=(2, 3)) + 0.1 * torch.randn(8, 32)
    net = AlignNet(4, 32, hidden_dim=64, num_layers=3)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        out = alignment_loss(*net(z), teacher_patch, teacher_global, distmat_weight=0.5)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert losses[-1] < 0.3 * losses[0]
    assert out["patch_cos"] > 0.9
