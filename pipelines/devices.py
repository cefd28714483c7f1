"""The torch device a stage runs on, from its ``--device`` flag."""
from __future__ import annotations

import torch

from pipelines import StageError


def torch_device(name: str) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``; refused when CUDA is absent."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise StageError(f"--device {name} requested but CUDA is not available")
    return torch.device(name)
