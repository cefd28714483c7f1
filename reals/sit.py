"""SiT: scalable interpolant transformers (DiT backbone with adaLN-Zero) over latents.

Time convention (SiT's): ``t`` in [0, 1], t=0 is pure noise and t=1 is data; the model takes ``t`` as is.
Label ``num_classes`` is the null class used by classifier-free guidance (see ``reals.transport.guidance``).
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from reals import ReaLSError
from reals.pretrained import PretrainedMixin, register_to_config


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation of token features by per-sample shift and scale."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


#################################################################################
#               Embedding Layers for Timesteps and Class Labels                 #
#################################################################################

class TimestepEmbedder(nn.Module):
    """Embeds scalar times into vectors: sinusoidal frequencies followed by a two-layer MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """Sinusoidal embedding [B, dim] of times ``t`` [B] (cosines first, then sines)."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Embeds class labels; index ``num_classes`` is the null class, used for label dropout (CFG training)."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Replace labels by the null class, at random (rate ``dropout_prob``) or where ``force_drop_ids == 1``."""
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


class PatchEmbed(nn.Module):
    """Latent [B, C, H, W] -> tokens [B, (H/p)*(W/p), D] by a strided convolution."""

    def __init__(self, input_size: int, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.grid_size = input_size // patch_size
        self.num_patches = self.grid_size ** 2
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


#################################################################################
#                                 Core SiT Model                                #
#################################################################################

class Attention(nn.Module):
    """Multi-head self-attention (fused qkv projection, PyTorch's scaled dot-product kernel)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    """Transformer feed-forward: Linear, tanh-GELU, Linear."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SiTBlock(nn.Module):
    """Transformer block whose norms are modulated by the conditioning (adaLN-Zero gates)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """Modulated norm and linear projection of each token back to a latent patch."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class SiT(nn.Module, PretrainedMixin):
    """Class-conditional transformer predicting the transport's target (velocity by default) for latents.

    Its constructor arguments are its config (``SiT(**model.init_config)`` rebuilds it; checkpoints keep them)."""

    config_name = "sit.json"
    weights_name = "sit.safetensors"

    family = "SiT"
    # SiT checkpoints trained with learn_sigma carry sigma channels that the transport does not use.
    returns_sigma = False

    @register_to_config
    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = False,
    ):
        super().__init__()
        if input_size % patch_size:
            raise ReaLSError(f"{self.family}: input_size {input_size} is not divisible by patch_size {patch_size}")
        if hidden_size % num_heads:
            raise ReaLSError(f"{self.family}: hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_classes = num_classes
        self.input_size = input_size

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # Fixed (not learned) 2D sin-cos position embedding; a buffer, saved under the key "pos_embed".
        self.register_buffer("pos_embed", torch.zeros(1, self.x_embedder.num_patches, hidden_size))
        self.blocks = nn.ModuleList([SiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT initialisation: xavier linears, sin-cos positions, zero-initialised adaLN gates and output."""
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        self.apply(_basic_init)

        self.pos_embed.copy_(get_2d_sincos_pos_embed(self.pos_embed.shape[-1], self.x_embedder.grid_size).unsqueeze(0))

        # Patch embedding like a linear layer (xavier over the flattened kernel).
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)

        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        # adaLN-Zero: every block starts as the identity.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)

        # Output starts at zero.
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens [B, N, p*p*C] -> latents [B, C, H, W]."""
        c, p, h = self.out_channels, self.patch_size, self.x_embedder.grid_size
        x = x.reshape(x.shape[0], h, h, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, h * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Prediction [B, C, H, W] for latents ``x`` [B, C, H, W], times ``t`` [B] in [0, 1], labels ``y`` [B]
        ([B, 2C, H, W] for a family that ``returns_sigma``)."""
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        x = self.x_embedder(x) + self.pos_embed.to(x.dtype)
        c = self.t_embedder(t) + self.y_embedder(y, self.training)
        for block in self.blocks:
            x = block(x, c)
        x = self.unpatchify(self.final_layer(x, c))
        return x[:, : self.in_channels] if self.learn_sigma and not self.returns_sigma else x


#################################################################################
#                   Sine/Cosine Positional Embedding Functions                  #
#################################################################################

def get_1d_sincos_pos_embed(embed_dim: int, pos: torch.Tensor) -> torch.Tensor:
    """Sin-cos embedding [M, embed_dim] of positions ``pos`` [M] (sines first, then cosines)."""
    omega = 1.0 / 10000 ** (torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0))
    out = pos.to(torch.float64)[:, None] * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2D sin-cos embedding [grid_size**2, embed_dim], row-major over the patch grid (as in MAE/DiT)."""
    if embed_dim % 4:
        raise ReaLSError(f"SiT: hidden size {embed_dim} must be divisible by 4 for the 2D sin-cos embedding")
    coords = torch.arange(grid_size, dtype=torch.float64)
    grid_h, grid_w = torch.meshgrid(coords, coords, indexing="ij")
    # MAE/DiT order: the first half encodes the column (w) coordinate, the second half the row (h).
    emb_w = get_1d_sincos_pos_embed(embed_dim // 2, grid_w.reshape(-1))
    emb_h = get_1d_sincos_pos_embed(embed_dim // 2, grid_h.reshape(-1))
    return torch.cat([emb_w, emb_h], dim=1).float()


#################################################################################
#                                   SiT Configs                                 #
#################################################################################

# Transformer sizes shared by the model families (SiT here, DiT in ``reals.dit``): "XL/2" is depth 28, width 1152,
# 16 heads, 2x2 patches. The T sizes are tiny: tests and the CPU demo only.
ARCHITECTURES = {
    f"{size}/{p}": dict(depth=depth, hidden_size=width, patch_size=p, num_heads=heads)
    for size, depth, width, heads, patches in [
        ("XL", 28, 1152, 16, (2, 4, 8)), ("L", 24, 1024, 16, (2, 4, 8)), ("B", 12, 768, 12, (2, 4, 8)),
        ("S", 12, 384, 6, (2, 4, 8)), ("T", 4, 128, 4, (1, 2, 4)),
    ]
    for p in patches
}

SiT_models = {f"SiT-{arch}": partial(SiT, **kw) for arch, kw in ARCHITECTURES.items()}


def architecture_of(state: dict) -> str | None:
    """The ``ARCHITECTURES`` name ("XL/2") whose depth, width and patch size a SiT/DiT-layout state dict has."""
    if "x_embedder.proj.weight" not in state:
        return None
    width, _, p, _ = state["x_embedder.proj.weight"].shape
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    for name, arch in ARCHITECTURES.items():
        if (arch["depth"], arch["hidden_size"], arch["patch_size"]) == (depth, width, p):
            return name
    return None


def create_sit(name: str, **kwargs) -> SiT:
    """Build the registered SiT ``name`` (e.g. "SiT-XL/2") with constructor ``kwargs``."""
    if name not in SiT_models:
        raise ReaLSError(f"unknown SiT model {name!r}; choose one of: {', '.join(SiT_models)}")
    return SiT_models[name](**kwargs)
