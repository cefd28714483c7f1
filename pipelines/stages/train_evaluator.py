"""Stage `train-evaluator`: train the domain evaluator (a small CNN classifier) on a dataset's shards.

It learns the training split's classes from scratch, so it knows nothing of any teacher; its held-out
accuracy on the validation split is measured and saved with it. The evaluator's penultimate features are
the ``domain`` feature space of ``FD_domain`` and its logits give the conditional accuracy of samples
(``reals.evaluator``). Both splits are held in memory as uint8 arrays: this is sized for the experiment's
datasets (tens of thousands of small images), not for ImageNet.

It trains on the loop the training stages share (``pipelines.training``). Output (a local folder):
``evaluator.safetensors`` and ``evaluator.json`` (model config, training settings, data fingerprint, val
accuracy), the json last, beside the run's ``{step:07d}.pt`` checkpoints, ``latest.json`` and ``log.jsonl``
(the mean loss of each twentieth of the run). A re-run with the same settings and data is skipped; an
interrupted one continues from its latest checkpoint (exactly, on CPU); one with other settings or data
removes the other run's checkpoints and trains afresh.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from pipelines import StageError
from pipelines.checkpoints import LATEST, LOG, latest_checkpoint, load_checkpoint, read_log
from pipelines.config import Shards, ShowProgress
from pipelines.devices import torch_device
from pipelines.distributed import Dist
from pipelines.placement import Placed
from pipelines.ray_train import RayTrainSettings, under_torchrun
from pipelines.registry import Chain, Output, Stage
from pipelines.training import Schedule, TrainingLoop
from reals import ReaLSError
from reals.evaluator import DomainClassifier
from reals.images import to_unit_images
from storage.fs import apply_umask, join, list_files, local_path, remove
from storage.markers import fingerprint, read_json
from storage.shards import iter_shards, read_manifest, shard_urls

# settings that change the trained weights (the rest only change how the run is shown or where it runs)
TRAINING_KEYS = ("split", "val_split", "steps", "batch_size", "lr", "weight_decay", "width", "stages", "dropout",
                 "seed")
LOG_INTERVALS = 20  # log.jsonl entries per run; the last one's mean loss is the summary's final_loss
LOGGER = logging.getLogger(__name__)


class TrainEvaluatorConfig(RayTrainSettings):
    """Inputs of `reals train-evaluator`."""

    shards: Shards = Field(description="shards URL (a folder with manifest.json, from `reals shard`)")
    output: str = Field(description="local folder to write evaluator.safetensors and evaluator.json into")
    split: str = Field("train", description="split to train on")
    val_split: str = Field("val", description="held-out split whose accuracy is reported")
    steps: int = Field(1000, ge=1, description="optimiser steps")
    batch_size: int = Field(128, ge=2, description="images per step")
    lr: float = Field(2e-3, gt=0, description="peak AdamW learning rate (linear warm-up, cosine decay)")
    weight_decay: float = Field(5e-4, ge=0, description="AdamW weight decay")
    width: int = Field(32, ge=4, description="channels of the first stage (doubled at every stage)")
    stages: int = Field(3, ge=1, le=6, description="stride-2 stages; features are width * 2**(stages-1) wide")
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout before the classification head")
    seed: int = Field(0, ge=0, description="seed of the weights, batches and augmentation")
    ckpt_every: int = Field(500, ge=1, description="save a checkpoint every N steps (and after the last)")
    device: str = Field("auto", description="torch device: auto, cpu, cuda")
    show_progress: ShowProgress = Field(True, description="show a progress bar")
    num_workers: int = Field(1, ge=1, le=1, description="Ray Train workers: one (the evaluator trains in one process)")


class TrainEvaluatorSummary(Placed):
    """What `reals train-evaluator` did."""

    output: str
    steps: int
    num_classes: int
    resolution: int
    feature_dim: int
    parameters: int
    train_images: int
    val_images: int
    train_accuracy: float = Field(description="accuracy on the training split, without augmentation")
    val_accuracy: float = Field(description="accuracy on the held-out split")
    chance: float = Field(description="1 / number of classes")
    final_loss: float = Field(description="mean training loss of the last logging interval (a twentieth of the run)")
    seconds: float
    resumed_from: int | None = Field(None, description="the checkpoint's step an interrupted run continued from")
    skipped: bool = Field(description="an evaluator with the same settings and data was already there")


# ---------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------

def load_split(shards: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """All decodable images (uint8 NHWC) and labels of a split, in shard order."""
    manifest = read_manifest(shards)
    if split not in manifest.get("splits", {}):
        raise StageError(f"split {split!r} not in {shards} (has {sorted(manifest.get('splits', {}))}); "
                         "shard it first with `reals shard --split`")
    samples = list(iter_shards(shard_urls(shards, split), shuffle=0, split_by_worker=False, skipped=[]))
    if not samples:
        raise StageError(f"split {split!r} of {shards} has no decodable images")
    shapes = {s["image"].shape for s in samples}
    if len(shapes) > 1:
        raise StageError(f"split {split!r} of {shards} mixes image shapes {sorted(shapes)}; shard it with a "
                         "fixed --resolution")
    return np.stack([s["image"] for s in samples]), np.array([s["cls"] for s in samples], dtype=np.int64)


def augment(images: torch.Tensor) -> torch.Tensor:
    """Random horizontal flips and translations of up to 1/8 of the side (reflect padding; torch's global RNG)."""
    b, _, h, w = images.shape
    flip = torch.rand(b) < 0.5
    images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
    pad = max(1, h // 8)
    padded = F.pad(images, (pad, pad, pad, pad), mode="reflect")
    dx, dy = torch.randint(0, 2 * pad + 1, (2, b)).tolist()
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])


@torch.no_grad()
def accuracy(model: DomainClassifier, images: np.ndarray, labels: np.ndarray, device: torch.device,
             batch_size: int = 512) -> float:
    """Top-1 accuracy of the model in eval mode."""
    model.eval()
    hits = 0
    for i in range(0, len(images), batch_size):
        _, logits = model(to_unit_images(images[i:i + batch_size], device))
        hits += int((logits.argmax(1).cpu().numpy() == labels[i:i + batch_size]).sum())
    return hits / len(images)


# ---------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------

class Trainer(TrainingLoop):
    """One training run of the evaluator on in-memory images: the step the shared loop drives."""

    def __init__(self, cfg: TrainEvaluatorConfig, out: Path, num_classes: int, identity: str):
        self.cfg, self.identity = cfg, identity
        self.images, self.labels = load_split(cfg.shards, cfg.split)
        self.batch_size = min(cfg.batch_size, len(self.images))
        device = torch_device(cfg.device)
        super().__init__(str(out), Dist(device=device), Schedule(
            max_steps=cfg.steps, max_epochs=None, steps_per_epoch=len(self.images) // self.batch_size,
            log_every=max(1, cfg.steps // LOG_INTERVALS), ckpt_every=cfg.ckpt_every, batch_size=self.batch_size,
            show_progress=cfg.show_progress))
        torch.manual_seed(cfg.seed)
        try:
            self.model = DomainClassifier(num_classes, self.images.shape[1], cfg.width, cfg.stages,
                                          cfg.dropout).to(device)
        except ReaLSError as e:
            raise StageError(str(e)) from None
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.warmup = max(1, cfg.steps // 20)
        self.begin(cfg.seed * 1_000_003 + 1, resume=True)  # run() has removed the checkpoints of other settings

    def restore(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["opt"])

    def checkpoint_state(self) -> dict:
        return {"model": self.model.state_dict(), "model_config": self.model.init_config,
                "opt": self.opt.state_dict(), "config": self.cfg.model_dump(), "identity": self.identity}

    def batches(self, epoch: int, skip: int) -> Iterator[np.ndarray]:
        """Sorted indices of the epoch's full batches (a permutation drawn from seed and epoch) after ``skip``."""
        order = np.random.default_rng([self.cfg.seed, epoch]).permutation(len(self.images))
        for start in range(skip * self.batch_size, len(order) - self.batch_size + 1, self.batch_size):
            yield np.sort(order[start:start + self.batch_size])

    def lr_factor(self, step: int) -> float:
        """Linear warm-up over the first 5% of the steps, then cosine decay."""
        return min((step + 1) / self.warmup, 0.5 * (1 + math.cos(math.pi * min(1.0, step / self.cfg.steps))))

    def train_batch(self, idx: np.ndarray) -> dict[str, float]:
        device = self.d.device
        for group in self.opt.param_groups:
            group["lr"] = self.cfg.lr * self.lr_factor(self.step)
        self.model.train()
        x = augment(to_unit_images(self.images[idx], torch.device("cpu"))).to(device)
        _, logits = self.model(x)
        loss = F.cross_entropy(logits, torch.from_numpy(self.labels[idx]).to(device))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return {"loss": loss.item()}


# ---------------------------------------------------------------------------------------------------
# Stage
# ---------------------------------------------------------------------------------------------------

def _local_dir(url: str) -> Path:
    path = local_path(url)
    if path is None:
        raise StageError(f"--output must be a local folder, got {url}")
    return Path(path).resolve()


def _summary(out: Path, info: dict, skipped: bool, resumed_from: int | None = None) -> TrainEvaluatorSummary:
    return TrainEvaluatorSummary(output=str(out), skipped=skipped, resumed_from=resumed_from,
                                 **{k: info[k] for k in TrainEvaluatorSummary.model_fields if k in info})


def discard_other_run(out: Path, identity: str) -> None:
    """Remove the checkpoints of a run with other settings or data, so that this one starts afresh."""
    latest = latest_checkpoint(str(out))
    if latest is not None and load_checkpoint(latest).get("identity") != identity:
        LOGGER.warning("%s: removing the checkpoints of an evaluator trained with other settings or data", out)
        for url in list_files(str(out), ".pt") + [str(out / LATEST)]:
            remove(url)


def run(config: TrainEvaluatorConfig) -> TrainEvaluatorSummary:
    """Train the evaluator and save it with its held-out accuracy (skipped when already trained the same way)."""
    if under_torchrun():
        raise StageError("train-evaluator trains in one process: run it without torchrun (--nproc-per-node 1)")
    out = _local_dir(config.output)
    manifest = read_manifest(config.shards)
    training = {k: getattr(config, k) for k in TRAINING_KEYS}
    identity = {"training": training, "data_fingerprint": manifest.get("fingerprint")}
    key = fingerprint(identity)
    old = read_json(str(out / DomainClassifier.config_name)) if (out / DomainClassifier.weights_name).is_file() else None
    if old and old.get("identity") == key:
        return _summary(out, old, skipped=True)

    t0 = time.perf_counter()
    num_classes = len(manifest["classes"])
    discard_other_run(out, key)
    trainer = Trainer(config, out, num_classes, key)
    val_images, val_labels = load_split(config.shards, config.val_split)
    trainer.train("train-evaluator")
    model, images, labels, device = trainer.model, trainer.images, trainer.labels, trainer.d.device
    final = trainer.final or read_log(join(trainer.output, LOG))[-1]  # a run resumed at its last step logs nothing
    info = {
        "identity": key, **identity, "shards": config.shards,
        "classes": manifest["classes"], "steps": config.steps, "num_classes": num_classes,
        "resolution": int(images.shape[1]), "feature_dim": model.feature_dim,
        "parameters": sum(p.numel() for p in model.parameters()), "train_images": len(images),
        "val_images": len(val_images), "train_accuracy": accuracy(model, images, labels, device),
        "val_accuracy": accuracy(model, val_images, val_labels, device), "chance": 1.0 / num_classes,
        "final_loss": final["loss"], "seconds": round(time.perf_counter() - t0, 2),
    }
    model.cpu().save_pretrained(out, **info)
    apply_umask(out)  # safetensors writes 0600
    return _summary(out, info, skipped=False, resumed_from=trainer.resumed_from)


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------

def show(s: TrainEvaluatorSummary) -> None:
    resumed = "" if s.resumed_from is None else f" (resumed from step {s.resumed_from})"
    verb = "already trained" if s.skipped else f"trained {s.steps} steps{resumed} in {s.seconds:.0f} s"
    print(f"train-evaluator: {verb}: {s.num_classes} classes at {s.resolution}px, {s.parameters} parameters, "
          f"{s.feature_dim}-d features -> {s.output}")
    print(f"  accuracy: val {s.val_accuracy:.3f} on {s.val_images} held-out images (chance {s.chance:.3f}), "
          f"train {s.train_accuracy:.3f} on {s.train_images}")


STAGES = [Stage("train-evaluator", TrainEvaluatorConfig, TrainEvaluatorSummary, run, show=show, runs_on="train",
                reads={"shards": ("shards/{split}", "shards/{val_split}")},
                writes={"output": Output("evaluator", "evaluator", local=True)},
                chain=Chain("train_evaluator", "the domain evaluator (trained when assess needs it)"),
                help="train the domain evaluator (CNN classifier) for FD_domain", description=__doc__.split("\n\n")[0])]
