"""Where a stage runs: the host, process and Ray node a summary records, and the Ray resources a one-task stage asks."""
from __future__ import annotations

import os
import socket

from pydantic import BaseModel, Field


def where_this_runs() -> dict:
    """``{"host", "pid", "node"}`` of this process (``node``: its Ray node id, or None outside Ray)."""
    node = None
    try:
        import ray

        if ray.is_initialized():
            node = ray.get_runtime_context().get_node_id()
    except ImportError:
        pass
    return {"host": socket.gethostname(), "pid": os.getpid(), "node": node}


class Placed(BaseModel):
    """A summary that records where its stage ran (filled in the process that builds the summary)."""

    ran_on: dict = Field(default_factory=where_this_runs,
                         description="where the stage ran: host, process id and Ray node id (rank 0 under DDP)")


def task_resources(device: str = "cpu") -> dict:
    """Ray options of a stage that runs as one task: a CPU, and a GPU when ``device`` allows one and the cluster
    has any (its ``auto`` device then finds CUDA)."""
    from pipelines.devices import ray_uses_gpu

    return {"num_cpus": 1, "num_gpus": 1 if ray_uses_gpu(device, 1) else 0}
