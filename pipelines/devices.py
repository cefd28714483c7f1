"""Where a stage's models run, from its ``--device`` flag: the torch device of this process, or whether its Ray
workers take GPUs. ``auto`` means CUDA when there is any (here, or on the Ray cluster)."""
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


def ray_gpus() -> float:
    """The GPUs of the Ray cluster (Ray started or joined already)."""
    import ray

    return ray.cluster_resources().get("GPU", 0)


def ray_uses_gpu(name: str, per_worker: float = 0.0) -> bool:
    """Whether Ray workers of a stage run on ``--device name`` take GPUs: never on ``cpu``; else when the cluster
    has ``per_worker`` of them (any, when 0). ``cuda`` is refused on a cluster without GPUs."""
    if name == "cpu":
        return False
    gpus = ray_gpus()
    if name.startswith("cuda") and not gpus:
        raise StageError(f"--device {name}: the Ray cluster has no GPU")
    return gpus >= per_worker if per_worker else gpus > 0
