"""SiT model family (and DiT's sizes): published sizes, conditioning, adaLN-Zero start, and overfitting with the transport loss."""
from __future__ import annotations

import pytest
import torch

from reals import ReaLSError
from reals.models import MODELS
from reals.sit import SiT, SiT_models, create_sit, get_2d_sincos_pos_embed
from reals.transport import create_transport

# DiT/SiT papers' parameter counts (ImageNet 256: 32x32x4 latents, 1000 classes).
PUBLISHED_PARAMS = {"SiT-B/2": 130e6, "SiT-L/2": 458e6, "SiT-XL/2": 675e6,
                    "DiT-S/2": 33e6, "DiT-B/2": 130e6, "DiT-XL/2": 675e6}


def tiny(**kw) -> SiT:
    kw = {"input_size": 4, "in_channels": 4, "num_classes": 5, **kw}
    return SiT_models["SiT-T/2"](**kw)


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_parameter_count_matches_published(name):
    with torch.device("meta"):
        model = MODELS[name](input_size=32, in_channels=4, num_classes=1000)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - PUBLISHED_PARAMS[name]) / PUBLISHED_PARAMS[name] < 0.01


def test_registry_builds_every_size_with_its_patch():
    for name, factory in SiT_models.items():
        with torch.device("meta"):
            model = factory(input_size=32, in_channels=4, num_classes=1000)
        assert model.patch_size == int(name.split("/")[1])
        assert model.x_embedder.num_patches == (32 // model.patch_size) ** 2
    with pytest.raises(ReaLSError, match="unknown SiT model"):
        create_sit("SiT-XXL/2")
    with pytest.raises(ReaLSError, match="divisible"):
        create_sit("SiT-T/4", input_size=6)


def test_forward_shapes_and_adaln_zero_start():
    x, t, y = torch.randn(3, 4, 4, 4), torch.rand(3), torch.tensor([0, 1, 4])
    for learn_sigma in (False, True):
        model = tiny(learn_sigma=learn_sigma)
        out = model(x, t, y)
        assert out.shape == x.shape  # learned-sigma channels are dropped, as in SiT
        assert torch.count_nonzero(out) == 0  # zero-initialised output layer
        assert model.final_layer.linear.out_features == 4 * (8 if learn_sigma else 4)
        assert torch.equal(SiT(**model.init_config).state_dict()["pos_embed"], model.pos_embed)
        assert SiT(**model.init_config).final_layer.linear.out_features == model.final_layer.linear.out_features


def test_position_embedding_is_fixed_2d_sincos():
    model = tiny()
    assert "pos_embed" in dict(model.named_buffers())
    assert "pos_embed" not in dict(model.named_parameters())
    emb = get_2d_sincos_pos_embed(16, 3).reshape(3, 3, 16)  # rows, columns, dim
    # First half encodes the column, second half the row (MAE/DiT layout).
    assert torch.allclose(emb[0, :, :8], emb[2, :, :8]) and not torch.allclose(emb[:, 0, :8], emb[:, 2, :8])
    assert torch.allclose(emb[:, 0, 8:], emb[:, 2, 8:]) and not torch.allclose(emb[0, :, 8:], emb[2, :, 8:])
    assert torch.allclose(model.pos_embed[0], get_2d_sincos_pos_embed(128, 2))


def test_label_dropout_uses_null_class():
    torch.manual_seed(0)
    model = tiny(class_dropout_prob=1.0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    x, t, y = torch.randn(2, 4, 4, 4), torch.rand(2), torch.tensor([1, 2])
    null = torch.full_like(y, model.num_classes)
    model.eval()
    cond, uncond = model(x, t, y), model(x, t, null)
    assert not torch.allclose(cond, uncond)
    model.train()  # every label dropped in training
    assert torch.allclose(model(x, t, y), uncond, atol=1e-6)
    assert model.y_embedder.embedding_table.num_embeddings == model.num_classes + 1


def test_tiny_sit_overfits_fixed_latents():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    n = 32
    latents, labels = torch.randn(n, 4, 4, 4, generator=g), torch.arange(n)
    model = tiny(num_classes=n, class_dropout_prob=0.0)
    transport = create_transport()
    # A fixed evaluation set: 4 noise draws and times per latent.
    x1_eval, y_eval = latents.repeat(4, 1, 1, 1), labels.repeat(4)
    x0_eval, t_eval = torch.randn(x1_eval.shape, generator=g), transport.sample_t(4 * n, generator=g)

    def eval_loss():
        with torch.no_grad():
            terms = transport.training_losses(model, x1_eval, {"y": y_eval}, x0=x0_eval, t=t_eval)
        return terms["loss"].mean().item()

    start = eval_loss()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(250):
        loss = transport.training_losses(model, latents, {"y": labels})["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = eval_loss()
    assert start > 1.5  # E|x1 - x0|^2 = 2 per element for a zero-output model
    assert end < 0.35 * start
