"""DINOv2 checkpoints in torch hub's layout (``dinov2_vitl14_reg4_pretrain.pth``) as transformers models.

torch hub's files (facebookresearch/dinov2) are plain dicts of tensors named after its ``vision_transformer.py``:
``cls_token``, ``pos_embed``, ``register_tokens`` (with registers), ``mask_token``, ``patch_embed.proj.*``,
``blocks.N.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp.fc1, mlp.fc2, ls2.gamma}`` (ViT-g: SwiGLU
``mlp.w12`` = [gate; up] and ``mlp.w3``) and ``norm.*``. They carry no config: the architecture is read from
the shapes (width, depth, patch, position grid, registers, MLP kind and width); the head count is not in any
shape, so it is the official table's for an official size and ``width / 64`` otherwise (DINOv2's head width in
all four sizes), unless given. The tensors are renamed (``qkv`` split into query, key, value) into
transformers' ``Dinov2Model`` / ``Dinov2WithRegistersModel``, whose forward equals the hub model's, except
that without registers transformers resizes the position grid to the target size where the hub model uses a
0.1-offset scale factor (the same for Hugging Face's own converted DINOv2 weights; equal at 518 px).
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from reals import ReaLSError


@dataclass(frozen=True)
class HubArch:
    """A DINOv2 ViT as torch hub builds it (layerscale on, qkv bias, LayerNorm eps 1e-6)."""

    width: int
    depth: int
    heads: int
    mlp_hidden: int
    swiglu: bool = False
    registers: int = 0
    patch_size: int = 14
    image_size: int = 518


def _swiglu_hidden(width: int, mlp_ratio: int = 4) -> int:
    """The hub's SwiGLU keeps 2/3 of ``width * mlp_ratio``, rounded up to a multiple of 8."""
    return (int(int(width * mlp_ratio) * 2 / 3) + 7) // 8 * 8


_SIZES = {"vits14": (384, 12, 6, False), "vitb14": (768, 12, 12, False), "vitl14": (1024, 24, 16, False),
          "vitg14": (1536, 40, 24, True)}
# torch hub's entry points (dinov2_vitl14, dinov2_vitl14_reg) -> the architecture of their pretrained weights
OFFICIAL = {f"dinov2_{size}{suffix}": HubArch(w, d, h, _swiglu_hidden(w) if glu else 4 * w, glu, regs)
            for size, (w, d, h, glu) in _SIZES.items() for suffix, regs in (("", 0), ("_reg", 4))}


def hub_file_name(name: str) -> str:
    """torch hub's file for a model name: ``dinov2_vitl14_reg`` -> ``dinov2_vitl14_reg4_pretrain.pth``."""
    return f"{name}{OFFICIAL[name].registers if name.endswith('_reg') else ''}_pretrain.pth"


def hub_keys(arch: HubArch) -> set[str]:
    """Every key of a hub checkpoint of ``arch``."""
    mlp = ("w12", "w3") if arch.swiglu else ("fc1", "fc2")
    keys = {"cls_token", "pos_embed", "mask_token", "patch_embed.proj.weight", "patch_embed.proj.bias",
            "norm.weight", "norm.bias"} | ({"register_tokens"} if arch.registers else set())
    for i in range(arch.depth):
        keys |= {f"blocks.{i}.ls1.gamma", f"blocks.{i}.ls2.gamma"}
        keys |= {f"blocks.{i}.{m}.{p}" for m in ("norm1", "norm2", "attn.qkv", "attn.proj", *(f"mlp.{x}" for x in mlp))
                 for p in ("weight", "bias")}
    return keys


def infer_arch(state: dict[str, torch.Tensor], heads: int | None = None) -> HubArch:
    """The architecture a hub state dict's shapes describe (``heads``: default ``width / 64``)."""
    missing = [k for k in ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.norm1.weight")
               if k not in state]
    if missing:
        raise ReaLSError(f"not a DINOv2 torch hub checkpoint: no {missing[0]}")
    width = state["cls_token"].shape[-1]
    patch = state["patch_embed.proj.weight"].shape[-1]
    positions = state["pos_embed"].shape[1] - 1
    side = math.isqrt(positions)
    if side * side != positions:
        raise ReaLSError(f"pos_embed holds {positions} patch positions, not a square grid")
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    swiglu = "blocks.0.mlp.w12.weight" in state
    if swiglu:
        mlp_hidden = state["blocks.0.mlp.w3.weight"].shape[1] if "blocks.0.mlp.w3.weight" in state else 0
    else:
        mlp_hidden = state["blocks.0.mlp.fc1.weight"].shape[0] if "blocks.0.mlp.fc1.weight" in state else 0
    registers = state["register_tokens"].shape[1] if "register_tokens" in state else 0
    if heads is None:
        if width % 64:
            raise ReaLSError(f"width {width} is not a multiple of DINOv2's head width 64: give the head count")
        heads = width // 64
    return HubArch(width, depth, heads, mlp_hidden, swiglu, registers, patch, side * patch)


def _transformers_key(key: str) -> str:
    """A hub key's name in transformers' DINOv2 (the parts of ``qkv`` and ``w12`` are named by the caller)."""
    for pattern, repl in ((r"^(cls_token|mask_token|register_tokens)$", r"embeddings.\1"),
                          (r"^pos_embed$", "embeddings.position_embeddings"),
                          (r"^patch_embed\.proj\.", "embeddings.patch_embeddings.projection."),
                          (r"^norm\.", "layernorm."),
                          (r"^blocks\.(\d+)\.", r"encoder.layer.\1.")):
        key = re.sub(pattern, repl, key)
    for old, new in ((".attn.proj.", ".attention.o_proj."), (".ls1.gamma", ".layer_scale1.lambda1"),
                     (".ls2.gamma", ".layer_scale2.lambda1"), (".mlp.w3.", ".mlp.down_proj.")):
        key = key.replace(old, new)
    return key


def to_transformers_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a hub state dict into transformers' keys: ``qkv`` -> q/k/v projections, ``w12`` -> gate/up."""
    out = {}
    for key, value in state.items():
        new = _transformers_key(key)
        if ".attn.qkv." in key:
            for part, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                out[new.replace(".attn.qkv.", f".attention.{part}.")] = chunk
        elif ".mlp.w12." in key:
            for part, chunk in zip(("gate_proj", "up_proj"), value.chunk(2, dim=0)):
                out[new.replace(".mlp.w12.", f".mlp.{part}.")] = chunk
        else:
            out[new] = value
    return out


def build_model(arch: HubArch):
    """An untrained transformers DINOv2 of ``arch``."""
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    ratio = next((r for r in range(1, 17)
                  if (_swiglu_hidden(arch.width, r) if arch.swiglu else r * arch.width) == arch.mlp_hidden), None)
    if ratio is None:  # transformers' config takes an integer mlp_ratio
        raise ReaLSError(f"MLP width {arch.mlp_hidden} is no integer ratio of the width {arch.width}"
                         + (" (SwiGLU: 2/3 of it, rounded up to 8)" if arch.swiglu else ""))
    kwargs = dict(hidden_size=arch.width, num_hidden_layers=arch.depth, num_attention_heads=arch.heads,
                  mlp_ratio=ratio, use_swiglu_ffn=arch.swiglu, patch_size=arch.patch_size,
                  image_size=arch.image_size, layer_norm_eps=1e-6, qkv_bias=True)
    if arch.registers:
        return Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=arch.registers, **kwargs))
    return Dinov2Model(Dinov2Config(**kwargs))


def load_hub_checkpoint(path: str | Path, name: str | None = None, heads: int | None = None):
    """The transformers DINOv2 held by a torch hub file; with an official ``name`` (``dinov2_vitl14_reg``) its
    shapes must be that model's. A file that does not fit is refused naming the file and what differs."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling raises many kinds; all mean "not this format"
        raise ReaLSError(f"{path}: not a torch hub DINOv2 checkpoint ({type(e).__name__}: "
                         f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
    if not isinstance(state, dict):
        raise ReaLSError(f"{path}: not a torch hub DINOv2 checkpoint (expected a plain dict of tensors, "
                         f"got {type(state).__name__})")
    odd = next((k for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
    if odd is not None:
        raise ReaLSError(f"{path}: not a torch hub DINOv2 checkpoint (expected a plain dict of tensors; "
                         f"{odd!r} holds a {type(state[odd]).__name__})")
    try:
        arch = infer_arch(state, heads if heads is not None or name not in OFFICIAL else OFFICIAL[name].heads)
    except ReaLSError as e:
        raise ReaLSError(f"{path}: {e}") from None
    expected = hub_keys(arch)
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        what = f"missing key {missing[0]}" if missing else f"unexpected key {unexpected[0]}"
        more = len(missing) + len(unexpected) - 1
        raise ReaLSError(f"{path}: not a DINOv2 torch hub checkpoint of its shapes: {what}"
                         + (f" (and {more} more)" if more else ""))
    if name in OFFICIAL and arch != OFFICIAL[name]:
        want = asdict(OFFICIAL[name])
        diff = ", ".join(f"{k} {v} (expected {want[k]})" for k, v in asdict(arch).items() if v != want[k])
        raise ReaLSError(f"{path}: not {name}'s torch hub checkpoint: {diff}")
    try:
        model = build_model(arch)
    except ReaLSError as e:
        raise ReaLSError(f"{path}: {e}") from None
    own = model.state_dict()
    for key, value in state.items():
        for new, part in to_transformers_state({key: value}).items():
            if part.shape != own[new].shape:
                raise ReaLSError(f"{path}: tensor {key} has shape {tuple(value.shape)}, which does not fit the "
                                 f"rest (width {arch.width}, {arch.heads} heads, MLP width {arch.mlp_hidden})")
    model.load_state_dict(to_transformers_state(state), strict=True)
    return model.eval(), arch
