"""Images between numpy and the models: uint8 NHWC arrays <-> float NCHW tensors in [-1, 1] (VAE) or [0, 1]."""
from __future__ import annotations

import numpy as np
import torch


def _nchw(images: np.ndarray, device: torch.device | str) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8)).to(device).permute(0, 3, 1, 2).float()


def to_model_images(images: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W] in [-1, 1], the VAE's input range."""
    return _nchw(images, device) / 127.5 - 1.0


def to_unit_images(images: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W] in [0, 1], the teachers' and classifiers' input range."""
    return _nchw(images, device) / 255.0


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float [B, 3, H, W] in [-1, 1] (clamped) -> uint8 [B, H, W, 3] on the CPU."""
    x = x.detach().float().clamp(-1, 1)
    return ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
