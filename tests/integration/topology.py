"""Helpers of the integration suite: the micro pipeline config, a driver's environment, `reals` as a process."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from test_flows import MICRO as _FLOWS_MICRO

ROOT = Path(__file__).resolve().parents[2]
# The micro pipeline of tests/test_flows.py, smaller still: the served deployments are pre-filled with it.
MICRO = {**_FLOWS_MICRO, "synthetic": {"classes": 2, "per_class": 8, "val_per_class": 4, "size": 32},
         "shard": {**_FLOWS_MICRO["shard"], "shard_size": 4},
         "train_vae": {**_FLOWS_MICRO["train_vae"], "max_steps": 2, "log_every": 1, "sample_every": 2},
         "train_sit": {**_FLOWS_MICRO["train_sit"], "max_steps": 2, "log_every": 1},
         "sample": {**_FLOWS_MICRO["sample"], "num_fid_samples": 8, "unit_size": 4, "workers": 2},
         "downstream": {"num_fit": 8, "num_eval": 4, "show_progress": False}}


def driver_env(cluster, **extra) -> dict[str, str]:
    """A driver's environment: this process's, the cluster's (credentials included), the worktree importable."""
    return {**os.environ, **cluster.env, "PYTHONPATH": str(ROOT), **extra}


def reals(args: list[str], env: dict, timeout: float = 900, **kwargs) -> subprocess.CompletedProcess:
    """Run ``reals ARGS`` in its own process (a driver), output captured."""
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, **kwargs)
