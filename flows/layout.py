"""Where a pipeline run puts everything, and which stage fields the pipeline fills from that layout."""
from __future__ import annotations

import os
from dataclasses import dataclass

from storage.fs import join


@dataclass(frozen=True)
class Layout:
    """Where each stage writes: under the run root, or under the local folder for what must be local."""

    root: str
    local: str

    @property
    def data(self) -> str:
        return os.path.join(self.local, "data")

    @property
    def vae_dir(self) -> str:
        return os.path.join(self.local, "vae-dir")

    @property
    def shards(self) -> str:
        return join(self.root, "shards")

    @property
    def vae_run(self) -> str:
        return join(self.root, "vae")

    @property
    def store(self) -> str:
        return join(self.root, "latents")

    @property
    def sit_run(self) -> str:
        return join(self.root, "sit")

    @property
    def samples(self) -> str:
        return join(self.root, "samples", "samples.npz")

    @property
    def reference(self) -> str:
        return join(self.root, "reference", "val.npz")

    @property
    def metrics(self) -> str:
        return join(self.root, "metrics.json")

    @property
    def report(self) -> str:
        return join(self.root, "report")

    @property
    def downstream(self) -> str:
        return join(self.root, "downstream")


def filled_by_layout(at: Layout, images: str, downstream: bool) -> dict[str, dict]:
    """What the pipeline sets in each section from its layout (a section's own values take precedence)."""
    return {
        "synthetic": {"output": images},
        "shard": {"images": images, "output": at.shards},
        "train_vae": {"shards": at.shards, "output": at.vae_run, "resume": True},
        "convert": {"ckpt": at.vae_run, "output_dir": at.vae_dir, "shards": at.shards},
        "encode": {"shards": at.shards, "vae_path": at.vae_dir, "output": at.store},
        "train_sit": {"store": at.store, "output": at.sit_run, "resume": True},
        "sample": {"mode": "ODE", "ckpt": at.sit_run, "vae_path": at.vae_dir, "output": at.samples,
                   "save_latents": downstream},
        "make_reference": {"shards": at.shards, "split": "val", "output": at.reference},
        "evaluate": {"ref_batch": at.reference, "sample_batch": at.samples, "output": at.metrics},
        "downstream": {"tasks": ["seg", "depth"], "images": images, "vae_path": at.vae_dir, "output": at.downstream,
                       "samples": at.samples},
    }
