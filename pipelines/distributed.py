"""torch.distributed for the training stages: join a launcher's process group and agree across ranks.

A run starts distributed by itself under torchrun or Ray Train (their environment variables or an initialised
process group): gloo on CPU, NCCL on CUDA. With one process every helper is a no-op on the local value.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pipelines.devices import torch_device


@dataclass
class Dist:
    """This process's place in the run: rank, world size, device, and whether it made the process group."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    owned: bool = False

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> Dist:
    """Join the process group a launcher made (Ray Train), or make one from torchrun's environment variables."""
    use_cuda = torch_device(device).type == "cuda"
    owned = False
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo")
        owned = True
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return Dist(rank, world, torch.device("cuda", local), owned)
    return Dist(rank, world, torch.device("cpu"), owned)


@contextmanager
def distributed(device: str) -> Iterator[Dist]:
    """``init_distributed`` for the length of a run; the process group is destroyed after if this run made it."""
    d = init_distributed(device)
    try:
        yield d
    finally:
        if d.owned:
            dist.destroy_process_group()


def wrap_ddp(module: torch.nn.Module, d: Dist) -> torch.nn.Module:
    """``module`` under DistributedDataParallel when there are several ranks, else itself."""
    if not d.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(module, device_ids=[d.device.index] if d.device.type == "cuda" else None)


def all_true(flag: bool, d: Dist) -> bool:
    """Whether ``flag`` holds on every rank."""
    if not d.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=d.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def all_mean(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """``t`` averaged over the ranks (in place)."""
    if d.enabled:
        dist.all_reduce(t)
        t /= d.world
    return t


def all_gather(obj, d: Dist) -> list:
    """Every rank's ``obj``, in rank order."""
    if not d.enabled:
        return [obj]
    gathered: list = [None] * d.world
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier(d: Dist) -> None:
    """Wait for every rank."""
    if d.enabled:
        dist.barrier()
