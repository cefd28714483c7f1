"""DINOv2 from torch hub's checkpoint layout: the same teacher as from a save_pretrained dir, the hub model's
forward, the official architectures, and files that do not fit refused by name."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from reals import ReaLSError
from reals import dinov2_hub
from reals.dinov2_hub import OFFICIAL, HubArch, build_model, hub_file_name, infer_arch, load_hub_checkpoint
from reals.teachers import build_teacher

# Tiny stand-ins for an official name: (name, architecture). Heads are not in any shape: the table gives them.
TINY = {
    "dinov2_vits14": HubArch(width=32, depth=2, heads=2, mlp_hidden=64, image_size=28),
    "dinov2_vitg14_reg": HubArch(width=32, depth=2, heads=2, mlp_hidden=48, swiglu=True, registers=4, image_size=28),
}


def hub_state_from_transformers(model) -> dict[str, torch.Tensor]:
    """torch hub's layout of a transformers DINOv2 (vision_transformer.py's names; qkv and w12 concatenated)."""
    out = {}
    for key, value in model.state_dict().items():
        key = (key.replace("embeddings.position_embeddings", "pos_embed")
               .replace("embeddings.patch_embeddings.projection.", "patch_embed.proj.")
               .replace("embeddings.", "").replace("encoder.layer.", "blocks.").replace("layernorm.", "norm.")
               .replace("layer_scale1.lambda1", "ls1.gamma").replace("layer_scale2.lambda1", "ls2.gamma")
               .replace("attention.o_proj", "attn.proj").replace("mlp.down_proj", "mlp.w3"))
        out[key] = value.clone()
    for prefix in sorted({k.rsplit(".attention.", 1)[0] for k in out if ".attention.q_proj." in k}):
        for p in ("weight", "bias"):
            out[f"{prefix}.attn.qkv.{p}"] = torch.cat([out.pop(f"{prefix}.attention.{x}_proj.{p}") for x in "qkv"])
            if f"{prefix}.mlp.gate_proj.{p}" in out:
                out[f"{prefix}.mlp.w12.{p}"] = torch.cat([out.pop(f"{prefix}.mlp.gate_proj.{p}"),
                                                          out.pop(f"{prefix}.mlp.up_proj.{p}")])
    return out


def hub_forward(w: dict[str, torch.Tensor], x: torch.Tensor, heads: int) -> torch.Tensor:
    """DinoVisionTransformer.forward_features' normed tokens at the native size, restated from the hub layout."""
    b, d = x.shape[0], w["cls_token"].shape[-1]
    patch = w["patch_embed.proj.weight"].shape[-1]
    t = F.conv2d(x, w["patch_embed.proj.weight"], w["patch_embed.proj.bias"], stride=patch).flatten(2).transpose(1, 2)
    t = torch.cat([w["cls_token"].expand(b, -1, -1), t], 1) + w["pos_embed"]
    if "register_tokens" in w:
        t = torch.cat([t[:, :1], w["register_tokens"].expand(b, -1, -1), t[:, 1:]], 1)
    n = t.shape[1]
    depth = 1 + max(int(k.split(".")[1]) for k in w if k.startswith("blocks."))
    for i in range(depth):
        p = lambda name: (w[f"blocks.{i}.{name}.weight"], w[f"blocks.{i}.{name}.bias"])  # noqa: E731
        h = F.layer_norm(t, (d,), *p("norm1"), eps=1e-6)
        q, k, v = F.linear(h, *p("attn.qkv")).reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        t = t + w[f"blocks.{i}.ls1.gamma"] * F.linear(a, *p("attn.proj"))
        h = F.layer_norm(t, (d,), *p("norm2"), eps=1e-6)
        if f"blocks.{i}.mlp.w12.weight" in w:
            x1, x2 = F.linear(h, *p("mlp.w12")).chunk(2, dim=-1)
            m = F.linear(F.silu(x1) * x2, *p("mlp.w3"))
        else:
            m = F.linear(F.gelu(F.linear(h, *p("mlp.fc1"))), *p("mlp.fc2"))
        t = t + w[f"blocks.{i}.ls2.gamma"] * m
    return F.layer_norm(t, (d,), w["norm.weight"], w["norm.bias"], eps=1e-6)


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No Hugging Face or torch hub cache and no $REALS_DINOV2_DIR, whatever this machine has."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch-hub"))
    monkeypatch.delenv("REALS_DINOV2_DIR", raising=False)
    return tmp_path


def tiny_model(arch: HubArch, seed: int = 0):
    """A random transformers DINOv2 of ``arch``, every tensor (layerscale too) drawn at random."""
    torch.manual_seed(seed)
    model = build_model(arch)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.eval()


@pytest.mark.parametrize("name", list(TINY))
def test_hub_file_and_hf_dir_are_the_same_teacher(name, isolated, monkeypatch):
    arch = TINY[name]
    monkeypatch.setitem(OFFICIAL, name, arch)  # the official name, shrunk
    model = tiny_model(arch)
    model.save_pretrained(isolated / "hf" / name)
    hub_dir = isolated / "hub"
    hub_dir.mkdir()
    state = hub_state_from_transformers(model)
    torch.save(state, hub_dir / hub_file_name(name))  # a plain dict of tensors, as torch hub pickles it

    from_dir = build_teacher(name, input_size=28, weights_dir=str(isolated / "hf"))
    monkeypatch.setenv("REALS_DINOV2_DIR", str(hub_dir))
    from_hub = build_teacher(name, input_size=28)
    assert from_hub.source == str(hub_dir / hub_file_name(name)) and "torch hub file" in from_hub.description
    assert from_hub.num_register_tokens == arch.registers
    images = torch.rand(2, 3, 40, 40)
    (p1, g1), (p2, g2) = from_dir(images), from_hub(images)
    assert p1.shape == (2, 32, 2, 2)
    assert (p1 - p2).abs().max().item() == 0 and (g1 - g2).abs().max().item() == 0
    # and what the hub's own forward computes from the file
    x = from_hub.preprocess(images)
    with torch.no_grad():
        tokens = from_hub.model(pixel_values=x).last_hidden_state
    assert torch.allclose(tokens, hub_forward(state, x, arch.heads), atol=1e-5)


def test_without_a_name_the_shapes_give_the_architecture(tmp_path):
    arch = TINY["dinov2_vitg14_reg"]
    torch.save(hub_state_from_transformers(tiny_model(arch)), tmp_path / "mine.pth")
    model, got = load_hub_checkpoint(tmp_path / "mine.pth", heads=2)
    assert got == arch and model.config.num_register_tokens == 4 and model.config.use_swiglu_ffn
    with pytest.raises(ReaLSError, match="width 32 is not a multiple of DINOv2's head width 64"):
        load_hub_checkpoint(tmp_path / "mine.pth")


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_official_architectures_round_trip_their_shapes(name):
    """Each official size, built on the meta device: its hub layout has exactly the keys and shapes expected."""
    arch = OFFICIAL[name]
    with torch.device("meta"):
        model = build_model(arch)
    state = hub_state_from_transformers(model)
    assert infer_arch(state) == arch  # heads = width / 64 in every official size
    assert set(state) == dinov2_hub.hub_keys(arch)
    assert hub_file_name(name) == name.replace("_reg", "_reg4") + "_pretrain.pth"


def test_files_that_do_not_fit_are_refused_by_name(tmp_path, isolated, monkeypatch):
    name = "dinov2_vits14"
    state = hub_state_from_transformers(tiny_model(TINY[name]))
    path = tmp_path / hub_file_name(name)
    monkeypatch.setenv("REALS_DINOV2_DIR", str(tmp_path))

    def refused(bad, match):
        torch.save(bad, path)
        with pytest.raises(ReaLSError, match=match) as err:
            build_teacher(name, input_size=28)
        assert str(path) in str(err.value) and "\n" not in str(err.value)

    refused(state, r"not dinov2_vits14's torch hub checkpoint: width 32 \(expected 384\), depth 2 \(expected 12\)")
    monkeypatch.setitem(OFFICIAL, name, TINY[name])
    refused({k: v for k, v in state.items() if k != "blocks.1.ls2.gamma"}, "missing key blocks.1.ls2.gamma")
    refused({**state, "head.weight": torch.zeros(3)}, "unexpected key head.weight")
    refused({**state, "blocks.0.attn.qkv.weight": torch.zeros(90, 32)}, "tensor blocks.0.attn.qkv.weight has shape")
    refused({"model": state}, "not a torch hub DINOv2 checkpoint.*'model' holds a dict")
    path.write_bytes(b"not a pickle")
    with pytest.raises(ReaLSError, match="not a torch hub DINOv2 checkpoint"):
        build_teacher(name, input_size=28)
    # a register checkpoint is not the plain model
    torch.save(hub_state_from_transformers(tiny_model(TINY["dinov2_vitg14_reg"])), path)
    with pytest.raises(ReaLSError, match="registers 4 \\(expected 0\\)"):
        build_teacher(name, input_size=28)
