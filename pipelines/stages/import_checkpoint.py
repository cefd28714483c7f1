"""Checkpoints the field hands around, recognised by content and brought into this project's layout.

``reals import-checkpoint SRC --output DST.pt`` writes what ``reals sample --ckpt SRC`` reads: the formats and
their conversions are ``pipelines.generator_checkpoint``'s.
"""
from __future__ import annotations

import io
import posixpath
from typing import Annotated

import torch
from pydantic import BaseModel, Field

from pipelines.config import Cli, StageConfig
from pipelines.generator_checkpoint import check_weights_fit, checkpoint_weights, load_recognised, model_spec
from pipelines.registry import Stage


class ImportCheckpointConfig(StageConfig):
    """Inputs of `reals import-checkpoint`."""

    src: Annotated[str, Cli(positional=True)] = Field(
        description="a checkpoint file: SiT/DiT/REPA train.py, a bare SiT/DiT/REPA state dict, or ours")
    output: str = Field(description="the converted checkpoint (.pt), local or s3://")
    model: str | None = Field(None, description="model name (e.g. SiT-XL/2 or DiT-XL/2); names the family of a "
                                                "bare state dict")


class ImportCheckpointSummary(BaseModel):
    output: str
    source: str
    format: str
    family: str
    model: str
    notes: list[str]


def run(config: ImportCheckpointConfig) -> ImportCheckpointSummary:
    """Recognise ``src``, check its tensors against its model, write it in this project's layout."""
    from pipelines.checkpoints import resolve_checkpoint
    from storage.fs import to_url, write_bytes_atomic

    url = resolve_checkpoint(config.src)
    rec = load_recognised(url, config.model)
    name, kw = model_spec(rec.checkpoint, ckpt_url=url)
    check_weights_fit(name, kw, checkpoint_weights(rec.checkpoint, True)[0])
    buf = io.BytesIO()
    torch.save(rec.checkpoint, buf)
    write_bytes_atomic(to_url(config.output), buf.getvalue())
    return ImportCheckpointSummary(output=to_url(config.output), source=url, format=rec.format, family=rec.family,
                                   model=rec.checkpoint["args"]["model"], notes=list(rec.notes))


def show(s: ImportCheckpointSummary) -> None:
    done = "; ".join(s.notes) or "weights as they are"
    print(f"import-checkpoint: {posixpath.basename(s.source)} is a {s.format} ({s.family} {s.model}): {done} "
          f"-> {s.output}")


STAGES = [Stage("import-checkpoint", ImportCheckpointConfig, ImportCheckpointSummary, run, show=show,
                help="bring a SiT/REPA/DiT checkpoint into this project's layout",
                description=__doc__.split("\n\n")[0])]
