"""Exponential moving average of model weights (VAE + heads, SiT)."""
from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def update_ema(ema_model: nn.Module, model: nn.Module, decay: float = 0.9999) -> None:
    """ema <- decay * ema + (1 - decay) * model, for parameters; buffers are copied."""
    ema_params = dict(ema_model.named_parameters())
    for name, p in model.named_parameters():
        ema_params[name].mul_(decay).add_(p.detach(), alpha=1 - decay)
    ema_buffers = dict(ema_model.named_buffers())
    for name, b in model.named_buffers():
        ema_buffers[name].copy_(b)


def requires_grad(model: nn.Module, flag: bool = True) -> None:
    """Set ``requires_grad`` on every parameter of ``model``."""
    for p in model.parameters():
        p.requires_grad_(flag)
