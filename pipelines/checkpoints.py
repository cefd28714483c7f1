"""Run folders of the training stages: ``{step:07d}.pt`` checkpoints, ``latest.json``, RNG states, ``log.jsonl``.

Everything goes through storage URLs (local, ``s3://``, ``memory://``). A checkpoint is written whole and
atomically, then ``latest.json`` points at it, so a reader never follows a pointer to a torn file. Loading is
``weights_only``: checkpoints hold tensors, numbers, strings and plain containers only (and the
``argparse.Namespace`` of the official training scripts).
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import posixpath
import random
import re

import numpy as np
import torch
from pydantic import AliasChoices

from pipelines import StageError
from storage.fs import (child, filesystem, is_local, join, list_files, read_bytes, remove_stale_temps, to_url,
                        write_bytes_atomic)
from storage.markers import read_json, write_json

LATEST = "latest.json"
LOG = "log.jsonl"
CHECKPOINT_RE = re.compile(r"^\d{7}\.pt$")
LOGGER = logging.getLogger(__name__)


def checkpoint_name(step: int) -> str:
    """The file name of the checkpoint after ``step`` optimiser steps."""
    return f"{step:07d}.pt"


def save_checkpoint(output: str, step: int, state: dict) -> str:
    """Write ``state`` as ``{step:07d}.pt`` under ``output``, then point ``latest.json`` at it; returns its URL."""
    name = checkpoint_name(step)
    url = join(output, name)
    buf = io.BytesIO()
    torch.save(state, buf)
    write_bytes_atomic(url, buf.getvalue())
    write_json(join(output, LATEST), {"checkpoint": name, "step": step})
    return url


def load_checkpoint(url: str) -> dict:
    """A checkpoint (``weights_only``; memory-mapped when local) from a local or object-store URL.

    ``argparse.Namespace`` is allow-listed: the official SiT, DiT and REPA ``train.py`` checkpoints pickle their
    command-line arguments as one (a plain attribute container; its values pass the same ``weights_only`` rules).
    """
    with torch.serialization.safe_globals([argparse.Namespace]):
        return _load(url)


def _load(url: str) -> dict:
    try:
        if not is_local(url):
            return torch.load(io.BytesIO(read_bytes(url)), map_location="cpu", weights_only=True)
        path = filesystem(url)[1]
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # a file in torch's legacy (non-zip) format cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise StageError(f"checkpoint not found: {url}") from None
    except Exception as e:  # noqa: BLE001 - a torn or foreign file is a user-facing problem
        raise StageError(f"cannot read checkpoint {url}: {type(e).__name__}: {e}") from None


def latest_checkpoint(output: str) -> str | None:
    """URL of the newest checkpoint of a run folder: ``latest.json``, else the highest ``{step:07d}.pt``."""
    latest = read_json(join(output, LATEST))
    if latest is not None:
        return child(output, latest["checkpoint"], "latest.json checkpoint name")
    found = [u for u in list_files(output, ".pt") if CHECKPOINT_RE.match(posixpath.basename(u))]
    return found[-1] if found else None


def resolve_checkpoint(url: str) -> str:
    """A checkpoint URL from itself (a file) or from a run folder."""
    fs, path = filesystem(url)
    if fs.isfile(path):
        return url
    found = latest_checkpoint(url) if fs.isdir(path) else None
    if found is None:
        raise StageError(f"checkpoint not found: {url} is neither a checkpoint file nor a run folder holding one")
    return found


def checkpoint_to_resume(output: str, resume: bool, owner: bool = True) -> str | None:
    """The checkpoint a run folder continues from (None when it holds none); refused unless ``resume``. The
    ``owner`` (rank 0 of a run) first removes the temporary files of a write that a previous run did not finish
    (killed, disk full); the other ranks leave them, since rank 0 may already be writing."""
    stale = remove_stale_temps(output) + remove_stale_temps(join(output, "samples")) if owner else []
    if stale:
        LOGGER.warning("%s: removed %d temporary file(s) of an interrupted write (%s)", output, len(stale),
                       ", ".join(stale[:3]))
    latest = latest_checkpoint(output)
    if latest is not None and not resume:
        raise StageError(f"{output} already holds checkpoints (latest: {latest}); pass --resume to continue "
                         "that run, or choose another --output")
    return latest


def check_resumable(output: str, saved: dict, config, keys) -> None:
    """Refuse to resume ``output`` when one of the settings ``keys`` of ``config`` differs from the saved ones
    (a setting saved under a field's former name, such as ``data_path``, counts as that field's)."""
    for key in keys:
        alias = type(config).model_fields[key].validation_alias
        names = alias.choices if isinstance(alias, AliasChoices) else [key]
        was = next((saved[n] for n in names if n in saved), None)
        if was != getattr(config, key):
            raise StageError(f"cannot resume {output}: {key} was {was!r}, now {getattr(config, key)!r}")


# ---------------------------------------------------------------------------------------------------
# RNG states
# ---------------------------------------------------------------------------------------------------

def seed_rngs(seed: int) -> None:
    """Seed the torch, numpy and python generators that ``rng_state`` captures."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def rng_state() -> dict:
    """torch (CPU and CUDA), numpy and python RNG states, in a ``weights_only``-loadable form."""
    np_state = np.random.get_state(legacy=False)
    np_state["state"]["key"] = torch.from_numpy(np_state["state"]["key"].astype(np.int64))
    state = {"torch": torch.get_rng_state(), "numpy": np_state, "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state`` captured."""
    torch.set_rng_state(state["torch"])
    np_state = dict(state["numpy"])
    np_state["state"] = dict(np_state["state"], key=np_state["state"]["key"].numpy().astype(np.uint32))
    np.random.set_state(np_state)
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------------
# The run log
# ---------------------------------------------------------------------------------------------------

class RunLog:
    """``log.jsonl``, one JSON object per logging interval: appended locally, rewritten whole on object stores.

    Opening it with ``keep_until`` (a resumed run's step) drops the entries written after that checkpoint.
    """

    def __init__(self, url: str, keep_until: int | None = None):
        self.url = url
        fs, self.path = filesystem(url)
        self.local = is_local(url)
        self.lines: list[str] = []
        if keep_until is not None and fs.exists(self.path):
            self.lines = [json.dumps(e, sort_keys=True) for e in _entries(url) if e["step"] <= keep_until]
        self._rewrite()

    def _rewrite(self) -> None:
        write_bytes_atomic(self.url, "".join(ln + "\n" for ln in self.lines).encode())

    def append(self, entry: dict) -> None:
        line = json.dumps(entry, sort_keys=True)
        self.lines.append(line)
        if self.local:
            with open(self.path, "a") as f:
                f.write(line + "\n")
        else:
            self._rewrite()


def read_log(url: str) -> list[dict]:
    """The entries of a ``log.jsonl`` (empty when absent)."""
    fs, path = filesystem(url)
    if not fs.exists(path):
        return []
    return _entries(url)


def _entries(url: str) -> list[dict]:
    """The entries of a log; a torn last line (a run killed while appending it) is dropped with a warning."""
    lines = [ln for ln in read_bytes(url).decode(errors="replace").splitlines() if ln.strip()]
    entries = []
    for i, line in enumerate(lines, 1):
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines):
                raise StageError(f"{url}, line {i}: not a JSON log entry; remove that line") from None
            LOGGER.warning("%s: dropped its torn last line (%d bytes), written by a run stopped mid-write",
                           url, len(line))
    return entries


# ---------------------------------------------------------------------------------------------------
# Completeness and progress of a training run (for the stage registry)
# ---------------------------------------------------------------------------------------------------

def training_missing(output: str, max_steps: int | None, epochs: int | None) -> str | None:
    """What a training run under ``output`` still lacks to reach ``max_steps`` (or ``epochs``), or None."""
    output = to_url(output)
    latest = latest_checkpoint(output)
    if latest is None:
        return "no checkpoint"
    if max_steps is not None:
        step = (read_json(join(output, LATEST)) or {}).get("step")
        if step is None:
            step = load_checkpoint(latest)["step"]
        return None if step >= max_steps else f"checkpoint at step {step} of {max_steps}"
    if epochs is None:
        return "neither max_steps nor epochs is set"
    done = load_checkpoint(latest)["epoch"]
    return None if done >= epochs else f"checkpoint after {done} of {epochs} epochs"


def training_progress(output: str, max_steps: int | None):
    """A function giving the fraction of ``max_steps`` a running training run has logged (None without a cap)."""
    if not max_steps:
        return None
    log = join(to_url(output), LOG)
    return lambda: (read_log(log) or [{"step": 0}])[-1]["step"] / max_steps
