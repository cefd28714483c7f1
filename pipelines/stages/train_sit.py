"""Stages `train-sit` and `train-dit`: train a class-conditional SiT (flow matching) or DiT (DDPM with learned
variance: ε-prediction, linear betas 1e-4..0.02 over 1000 steps, MSE + VLB on a stop-gradient mean) on the
normalised latents of a latent store. One trainer serves both; the model name says the family (``SiT-B/2``,
``DiT-B/2``) and each stage takes its own family's models.

The model's ``in_channels`` and ``input_size`` come from the store's ``latent_shape`` and its classes from the
store's ``num_classes`` (label ``num_classes`` is the null class of classifier-free guidance, used for class
dropout). AdamW (weight decay 0), an EMA of the weights, gradient clipping, bf16 autocast on CUDA and an optional
``torch.compile``. A store still being encoded trains on its done rows.

Outputs under ``--output`` (local or object store): ``{step:07d}.pt`` checkpoints (model, ema, opt, args, step,
RNG states of every rank, data position) and ``latest.json``; ``log.jsonl`` (loss, gradient norm, steps/s per
logging interval); ``samples/{step:07d}.png`` (a fixed-seed grid drawn with the EMA weights and decoded by the
store's ReaLS VAE, or ``--vae-path``). Resuming is exact on CPU: the data order is a pure function of
(seed, epoch, rank) and a resumed run skips the batches its checkpoint consumed.

Distributed training starts by itself under torchrun or Ray Train (torch.distributed environment variables or
an initialised process group): gloo on CPU, NCCL on CUDA; each rank reads its own rows (global batch / world).

For comparison only, ``--data-path`` may instead name a SHARDS folder (with manifest.json) together with
``--vae-path``: the same loop is then fed by encoding images on the fly (normalised posterior sample of a
randomly flipped image), which is what the store saves.
"""
from __future__ import annotations

import os
import time
import warnings
from contextlib import closing, nullcontext
from typing import Annotated, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, field_validator

from pipelines import StageError
from pipelines.checkpoints import check_resumable, training_missing, training_progress
from pipelines.config import Cli, ShowProgress, Store
from pipelines.distributed import Dist, distributed, wrap_ddp
from pipelines.placement import Placed
from pipelines.ray_train import RayTrainSettings
from pipelines.registry import Chain, Output, Stage
from pipelines.render import image_grid
from pipelines.report_parts import ReportPart, Save, training_part
from pipelines.sampling import NOISE_STREAM, sample_generators, sample_images
from pipelines.training import Schedule, TrainingLoop, ema_copy
from reals import ReaLSError
from reals.ema import update_ema
from reals.diffusion import DDIMSampler, GaussianDiffusion
from reals.images import to_model_images
from reals.models import MODELS, create_model, model_family
from reals.transport import ODESampler, create_transport
from reals.vae import CHANNEL_STATISTICS, FORMER_CHANNEL_STATISTICS, ReaLSVAE
from storage.fs import exists, join, to_url
from storage.latent_loader import LatentLoader
from storage.latent_store import MissingRowsWarning
from storage.shards import iter_shards, read_manifest, shard_urls

GRID_SAMPLES = 8
GRID_STEPS = 26  # grid points (SiT convention): 25 Heun steps
GRID_CFG_SCALE = 4.0
RESUME_KEYS = ("model", "global_batch_size", "seed", "path_type", "prediction", "class_dropout", "sample_posterior")


# ---------------------------------------------------------------------------------------------------
# Config and summary
# ---------------------------------------------------------------------------------------------------

class TrainSiTConfig(RayTrainSettings):
    """Inputs of `reals train-sit`."""

    family: ClassVar[str] = "SiT"

    store: Store = Field(description="latent store URL (or, for comparison, a shards folder with --vae-path)")
    output: str = Field(description="run URL for checkpoints, log.jsonl and sample grids (local or s3://)")
    model: str = Field("SiT-XL/2", description="SiT model: " + ", ".join(n for n in MODELS if n.startswith("SiT")))
    global_batch_size: int = Field(256, ge=1, description="samples per optimiser step over all ranks")
    epochs: Annotated[int | None, Cli(group="length")] = Field(None, ge=1, description="stop after this many passes over the data")
    max_steps: Annotated[int | None, Cli(group="length")] = Field(None, ge=1, description="stop after this many optimiser steps")
    resume: bool = Field(False, description="continue from the latest checkpoint under --output")
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    ema_decay: float = Field(0.9999, ge=0, lt=1, description="EMA decay per step")
    class_dropout: float = Field(0.1, ge=0, lt=1, description="probability of replacing a label by the null class")
    grad_clip: float = Field(1.0, ge=0, description="clip the gradient norm to this (0: no clipping)")
    path_type: Literal["Linear", "GVP"] = Field("Linear", description="SiT: transport path between noise and data")
    prediction: Literal["velocity", "score", "noise"] = Field("velocity", description="SiT: what the model predicts")
    compile: bool = Field(False, description="torch.compile the model")
    seed: int = Field(0, ge=0, description="seed of the weights, the data order and the noise")
    log_every: int = Field(100, ge=1, description="append interval means to log.jsonl every N steps")
    ckpt_every: int = Field(50_000, ge=1, description="save a checkpoint every N steps")
    sample_every: int = Field(10_000, ge=0, description="write a sample grid every N steps (0: never)")
    vae_path: str | None = Field(None, description="ReaLS VAE dir for sample grids (default: the store's "
                                                   "provenance); required with a shards --data-path")
    in_memory: Annotated[bool | Literal["auto"], Cli(metavar="{auto,true,false}")] = Field("auto", description="hold the store in RAM: auto, true or false")
    sample_posterior: Annotated[bool, Cli(negative="--posterior-mean")] = Field(True, description="train on z = mean + std * eps (LDM/ReaLS); false: on the "
                                                     "posterior mean (for a VAE whose posterior is still wide)")
    split: str = Field("train", description="split of a shards --data-path")
    shuffle_buffer: int = Field(1000, ge=1, description="sample shuffle buffer of a shards --data-path")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="torch device")
    mixed_precision: bool = Field(True, description="bf16 autocast on CUDA (ignored on CPU)")
    show_progress: ShowProgress = Field(True, description="show a progress bar")

    @field_validator("model")
    @classmethod
    def _family(cls, v: str) -> str:
        if v not in MODELS:
            raise ValueError(f"unknown model {v!r}; choose one of: {', '.join(MODELS)}")
        if model_family(v) != cls.family:
            other = "train-dit" if cls.family == "SiT" else "train-sit"
            raise ValueError(f"{v} is a {model_family(v)}: train it with reals {other}")
        return v


class TrainDiTConfig(TrainSiTConfig):
    """Inputs of `reals train-dit`: those of train-sit, for DiT models (path_type and prediction do not apply)."""

    family: ClassVar[str] = "DiT"

    model: str = Field("DiT-XL/2", description="DiT model: " + ", ".join(n for n in MODELS if n.startswith("DiT")))


class TrainSiTSummary(Placed):
    """What `reals train-sit` did (rank 0's view)."""

    output: str
    checkpoint: str
    steps: int
    epoch: int = Field(description="epochs completed")
    resumed_from: int | None
    model: str
    family: str = Field(description="SiT (flow matching) or DiT (DDPM, learned variance)")
    parameters: int
    latent_shape: list[int]
    num_classes: int
    source: Literal["store", "shards"]
    rows_done: int
    rows_total: int
    world_size: int
    global_batch_size: int
    steps_per_sec: float = Field(description="optimiser steps per second in this run, grids and checkpoints included")
    final_loss: float | None = Field(description="mean loss of the last logging interval")
    grids: str = Field(description="where sample grids go, or why there are none")


def shape_str(shape) -> str:
    return "x".join(str(int(s)) for s in shape)


# ---------------------------------------------------------------------------------------------------
# Data sources: batches of normalised latents [B, C, h, w] and labels [B] for one rank
# ---------------------------------------------------------------------------------------------------

class StoreSource:
    """The latent store through ``LatentLoader`` (posterior sample, random flip, rows split by rank)."""

    kind = "store"
    exact_epochs = True  # every rank gets len(loader) batches

    def __init__(self, cfg: TrainSiTConfig, batch_size: int, d: Dist):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", MissingRowsWarning)  # reported by the stage itself
            self.loader = LatentLoader(cfg.store, batch_size, rank=d.rank, world_size=d.world, seed=cfg.seed,
                                       in_memory=cfg.in_memory, sample_posterior=cfg.sample_posterior)
        self.attrs = self.loader.attrs
        self.latent_shape = tuple(int(s) for s in self.loader.latent_shape)
        self.num_classes = self.loader.num_classes
        self.rows_done, self.rows_total = self.loader.rows_done, self.loader.rows_total
        self.steps_per_epoch = len(self.loader)
        self.vae_path = self.attrs.get("vae_path")
        self.vae = None

    def batches(self, epoch: int, skip: int = 0):
        """The epoch's batches after the first ``skip`` (the same batches on every run)."""
        self.loader.set_epoch(epoch)
        with closing(iter(self.loader)) as it:
            for i, batch in enumerate(it):
                if i >= skip:
                    yield batch


class ShardSource:
    """Shards encoded on the fly by the ReaLS VAE: the comparison baseline for the store."""

    kind = "shards"
    exact_epochs = False  # ranks hold different shards: the end of an epoch is agreed on when data runs out

    def __init__(self, cfg: TrainSiTConfig, batch_size: int, d: Dist):
        if not cfg.vae_path:
            raise StageError(f"{cfg.store} holds shards, not a latent store: pass --vae-path to encode them "
                             "on the fly, or train on the store `reals encode` makes")
        manifest = read_manifest(cfg.store)
        self.urls = shard_urls(cfg.store, cfg.split)
        if d.world > len(self.urls):
            raise StageError(f"{len(self.urls)} {cfg.split} shards for {d.world} ranks: re-shard smaller")
        self.vae = load_vae(cfg.vae_path).to(d.device)
        side = int(manifest["resolution"]) // self.vae.downsample_factor
        self.latent_shape = (self.vae.latent_channels, side, side)
        self.num_classes = len(manifest["classes"])
        self.rows_done = self.rows_total = int(manifest["splits"][cfg.split]["count"])
        self.steps_per_epoch = self.rows_total // (batch_size * d.world)
        self.attrs = {"vae_fingerprint": self.vae.fingerprint, "vae_path": to_url(cfg.vae_path),
                      "num_classes": self.num_classes, "classes": manifest["classes"],
                      "source_fingerprint": manifest.get("fingerprint")}
        self.vae_path = cfg.vae_path
        self.cfg, self.batch_size, self.d = cfg, batch_size, d

    @torch.no_grad()
    def encode(self, images: np.ndarray, rng: torch.Generator, skip: bool) -> torch.Tensor | None:
        """uint8 [B, H, W, 3] -> normalised posterior samples of the randomly flipped images (None when skipped)."""
        flip = torch.rand(len(images), generator=rng) < 0.5
        eps = torch.randn((len(images), *self.latent_shape), generator=rng)
        if skip:
            return None
        x = to_model_images(images, self.d.device)
        x = torch.where(flip.to(x.device).view(-1, 1, 1, 1), x.flip(-1), x)
        mean, std = self.vae.encode(x)
        if not self.cfg.sample_posterior:
            return self.vae.normalize(mean)
        return self.vae.normalize(mean + std * eps.to(x.device))

    def batches(self, epoch: int, skip: int = 0):
        """The epoch's batches after the first ``skip`` (their randomness is drawn, their encoding skipped)."""
        cfg = self.cfg
        rng = torch.Generator().manual_seed(int(np.random.SeedSequence([cfg.seed, epoch, self.d.rank])
                                                .generate_state(1, np.uint64)[0]))
        samples = iter_shards(self.urls, shuffle=cfg.shuffle_buffer, seed=cfg.seed * 1_000_003 + epoch,
                              split_by_node=self.d.enabled, split_by_worker=False)
        images, labels, i = [], [], 0
        for s in samples:
            images.append(s["image"])
            labels.append(s["cls"])
            if len(images) == self.batch_size:
                z = self.encode(np.stack(images), rng, skip=i < skip)
                if z is not None:
                    yield z, torch.tensor(labels, dtype=torch.long)
                images, labels, i = [], [], i + 1


def open_source(cfg: TrainSiTConfig, batch_size: int, d: Dist) -> StoreSource | ShardSource:
    """A shards folder (manifest.json) or a latent store."""
    if exists(join(to_url(cfg.store), "manifest.json")):
        return ShardSource(cfg, batch_size, d)
    return StoreSource(cfg, batch_size, d)


def load_vae(path: str) -> ReaLSVAE:
    """A ReaLS VAE directory, as a StageError when it is not one."""
    try:
        return ReaLSVAE.from_pretrained(path)
    except (ReaLSError, OSError) as e:
        raise StageError(f"cannot load the ReaLS VAE {path}: {e}") from None


# ---------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------

def build_model(name: str, latent_shape: tuple[int, int, int], num_classes: int, class_dropout: float):
    """The SiT or DiT ``name`` for latents ``latent_shape``; a StageError naming both shapes when it cannot fit."""
    c, h, w = latent_shape
    if name not in MODELS:
        raise StageError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    if h != w:
        raise StageError(f"{model_family(name)} takes square latents; the store holds {shape_str(latent_shape)}")
    try:
        return create_model(name, input_size=h, in_channels=c, num_classes=num_classes,
                            class_dropout_prob=class_dropout)
    except ReaLSError as e:
        raise StageError(f"{name} cannot take the store's latents {shape_str(latent_shape)}: {e}") from None


class Trainer(TrainingLoop):
    """One training run of SiT or DiT: the model, its EMA and optimiser, and the step the shared loop drives."""

    def __init__(self, cfg: TrainSiTConfig, d: Dist):
        self.cfg, self.stage = cfg, f"train-{cfg.family.lower()}"
        if cfg.global_batch_size % d.world:
            raise StageError(f"--global-batch-size {cfg.global_batch_size} is not divisible by {d.world} ranks")
        self.batch_size = cfg.global_batch_size // d.world
        self.source = open_source(cfg, self.batch_size, d)
        self.latent_shape = self.source.latent_shape
        if self.source.steps_per_epoch == 0:
            raise StageError(f"{cfg.store} has {self.source.rows_done} usable rows, fewer than one global batch "
                             f"of {cfg.global_batch_size}: lower --global-batch-size")
        super().__init__(cfg.output, d, Schedule(
            max_steps=cfg.max_steps, max_epochs=cfg.epochs, steps_per_epoch=self.source.steps_per_epoch,
            log_every=cfg.log_every, ckpt_every=cfg.ckpt_every, sample_every=cfg.sample_every,
            exact_epochs=self.source.exact_epochs, show_progress=cfg.show_progress,
            batch_size=cfg.global_batch_size))

        torch.manual_seed(cfg.seed)  # the same initial weights (and EMA) on every rank
        self.model = build_model(cfg.model, self.latent_shape, self.source.num_classes,
                                 cfg.class_dropout).to(d.device)
        self.ema = ema_copy(self.model)
        try:  # the training objective: DiT's diffusion or SiT's transport, both with training_losses
            self.objective = (GaussianDiffusion() if self.model.family == "DiT"
                              else create_transport(cfg.path_type, cfg.prediction))
        except ReaLSError as e:
            raise StageError(str(e)) from None
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

        self.begin(cfg.seed * 1_000_003 + d.rank + 1, cfg.resume)  # noise, times and dropout differ across ranks
        self.grid_vae, self.grids = self._grid_vae() if d.main else (None, "")

        self.train_model = wrap_ddp(self.model, d)
        if cfg.compile:
            self.train_model = torch.compile(self.train_model)
        use_bf16 = d.device.type == "cuda" and cfg.mixed_precision
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else nullcontext()
        if d.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    # -- checkpoints ----------------------------------------------------------------------------------

    def restore(self, ckpt: dict) -> None:
        old = ckpt["args"]
        check_resumable(self.output, old, self.cfg, RESUME_KEYS)
        mc = ckpt["model_config"]
        trained = (mc["in_channels"], mc["input_size"], mc["input_size"])
        if trained != self.latent_shape:
            raise StageError(f"cannot resume {self.output}: its {old['model']} takes latents {shape_str(trained)}, "
                             f"the store holds {shape_str(self.latent_shape)}")
        if mc["num_classes"] != self.source.num_classes:
            raise StageError(f"cannot resume {self.output}: its model has {mc['num_classes']} classes, the store "
                             f"{self.source.num_classes}")
        was, now = ckpt["store"].get("vae_fingerprint"), self.source.attrs.get("vae_fingerprint")
        if was != now:
            raise StageError(f"cannot resume {self.output}: it trained on latents of VAE {was}, the store holds "
                             f"VAE {now}'s")
        self.model.load_state_dict(ckpt["model"])
        self.ema.load_state_dict(ckpt["ema"])
        self.opt.load_state_dict(ckpt["opt"])
        for group in self.opt.param_groups:  # a resumed run may change these
            group["lr"], group["weight_decay"] = self.cfg.lr, self.cfg.weight_decay

    def checkpoint_state(self) -> dict:
        """model, ema, opt, args, the model's config and the store's provenance."""
        keep = ("vae_fingerprint", "vae_path", *CHANNEL_STATISTICS, *FORMER_CHANNEL_STATISTICS, "num_classes",
                "classes", "resolution", "source_fingerprint", "teacher")
        return {"model": self.model.state_dict(), "ema": self.ema.state_dict(), "opt": self.opt.state_dict(),
                "args": self.cfg.model_dump(), "model_config": self.model.init_config,
                "latent_shape": list(self.latent_shape), "source": self.source.kind,
                "store": {k: self.source.attrs[k] for k in keep if k in self.source.attrs}}

    # -- sample grids ---------------------------------------------------------------------------------

    def _grid_vae(self) -> tuple[ReaLSVAE | None, str]:
        """The VAE that decodes sample grids and where the grids go (or why there are none)."""
        cfg = self.cfg
        if not cfg.sample_every:
            return None, "off (--sample-every 0)"
        if self.source.vae is not None:
            return self.source.vae, join(self.output, "samples")
        path = cfg.vae_path or self.source.vae_path
        if not path:
            return None, "off: the store names no VAE; pass --vae-path"
        if not cfg.vae_path and not os.path.isdir(path):
            return None, f"off: the store's VAE {path} is not here; pass --vae-path"
        vae = load_vae(path)
        side = vae.resolution // vae.downsample_factor
        if (vae.latent_channels, side, side) != self.latent_shape:
            raise StageError(f"the VAE {path} makes latents {shape_str((vae.latent_channels, side, side))}, the "
                             f"store holds {shape_str(self.latent_shape)}")
        return vae.to(self.d.device), join(self.output, "samples")

    @torch.no_grad()
    def sample_grid(self) -> bytes | None:
        """A fixed-seed row of EMA samples over a handful of classes, decoded by the ReaLS VAE."""
        if self.grid_vae is None:
            return None
        k = self.source.num_classes
        idx = np.arange(GRID_SAMPLES)
        y = torch.tensor([i * k // GRID_SAMPLES for i in idx], device=self.d.device)
        if isinstance(self.objective, GaussianDiffusion):
            sampler = DDIMSampler(self.objective, GRID_STEPS - 1)
        else:
            sampler = ODESampler(self.objective, "heun", GRID_STEPS)
        generators = sample_generators(self.cfg.seed, idx, NOISE_STREAM)
        images, _ = sample_images(self.ema, self.grid_vae, sampler, y, generators,
                                  GRID_CFG_SCALE if self.cfg.class_dropout else 1.0)
        return image_grid(images, GRID_SAMPLES)

    # -- one step -------------------------------------------------------------------------------------

    def batches(self, epoch: int, skip: int):
        return self.source.batches(epoch, skip=skip)

    def train_batch(self, batch) -> dict[str, float]:
        x1, y = (t.to(self.d.device, non_blocking=True) for t in batch)
        loss, grad_norm = self.train_step(x1, y)
        return {"loss": loss, "grad_norm": grad_norm}

    def train_step(self, x1: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        """One optimiser step and EMA update; (loss, gradient norm before clipping)."""
        cfg = self.cfg
        with self.autocast:
            loss = self.objective.training_losses(self.train_model, x1, {"y": y})["loss"].mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip or float("inf"))
        self.stop_unless_finite(bool(torch.isfinite(loss.detach()) & torch.isfinite(grad_norm)),
                                lambda: f"loss {loss.item():.4g}, gradient norm {grad_norm.item():.4g}",
                                "resume with a lower --lr or check the latents")
        self.opt.step()
        update_ema(self.ema, self.model, cfg.ema_decay)
        return loss.item(), grad_norm.item()

    # -- the run --------------------------------------------------------------------------------------

    def fit(self) -> TrainSiTSummary:
        cfg, d, s = self.cfg, self.d, self.source
        if d.main and s.rows_done < s.rows_total:
            print(f"{self.stage}: training on the {s.rows_done} done rows of {s.rows_total} "
                  f"({s.rows_total - s.rows_done} not encoded yet)")
        start_step, t0 = self.step, time.perf_counter()
        self.train(f"{self.stage} {cfg.model}")
        seconds = time.perf_counter() - t0
        return TrainSiTSummary(
            output=self.output, checkpoint=self.last_checkpoint, steps=self.step, epoch=self.epoch,
            resumed_from=self.resumed_from, model=cfg.model, family=self.model.family,
            parameters=sum(p.numel() for p in self.model.parameters()), latent_shape=list(self.latent_shape),
            num_classes=s.num_classes, source=s.kind, rows_done=s.rows_done, rows_total=s.rows_total,
            world_size=d.world, global_batch_size=cfg.global_batch_size,
            steps_per_sec=round((self.step - start_step) / seconds, 4) if seconds > 0 else 0.0,
            final_loss=self.final.get("loss"), grids=self.grids)


def run(config: TrainSiTConfig) -> TrainSiTSummary:
    """Train SiT or DiT on a latent store (or shards encoded on the fly); returns rank 0's summary."""
    if config.max_steps is None and config.epochs is None:
        raise StageError(f"train-{config.family.lower()} needs --epochs or --max-steps")
    with distributed(config.device) as d:
        return Trainer(config, d).fit()


# ---------------------------------------------------------------------------------------------------
# Stage records
# ---------------------------------------------------------------------------------------------------

HELP = {"train-sit": "train SiT by flow matching on a latent store",
        "train-dit": "train DiT (DDPM: ε-prediction, learned variance, MSE + VLB) on a latent store"}


def show(s: TrainSiTSummary) -> None:
    if s.world_size > 1 and int(os.environ.get("RANK", "0")) != 0:
        return
    resumed = "" if s.resumed_from is None else f", resumed from {s.resumed_from}"
    loss = "n/a" if s.final_loss is None else f"{s.final_loss:.4f}"
    print(f"train-{s.family.lower()}: {s.model} ({s.parameters / 1e6:.1f}M parameters) on {s.source} latents "
          f"{shape_str(s.latent_shape)}, {s.num_classes} classes: {s.steps} steps ({s.epoch} epochs done){resumed}")
    print(f"  rows: {s.rows_done} of {s.rows_total}; {s.world_size} rank(s) x {s.global_batch_size // s.world_size} "
          f"per step; {s.steps_per_sec:.2f} steps/s; final loss {loss}")
    print(f"  checkpoint: {s.checkpoint}\n  grids: {s.grids}")


def report(config: TrainSiTConfig, save: Save) -> ReportPart | None:
    """The generator's last logged interval and loss curves."""
    family = config.model.split("-", 1)[0]
    return training_part(f"{family} training ({config.model})", config.output, f"train-{family.lower()}", save,
                         "loss_curves_sit.png")


STAGES = [Stage(name, cls, TrainSiTSummary, run, runs_on="train",
                missing=lambda c: training_missing(c.output, c.max_steps, c.epochs),
                progress=lambda c: training_progress(c.output, c.max_steps), show=show, report=report,
                reads={"store": "store"}, writes={"output": Output("generator_run", "sit")},
                chain=Chain("generator", "the generator: SiT (train-sit) or DiT (train-dit) training",
                            sets={"resume": True}),
                help=HELP[name], description=__doc__.split("\n\n")[0])
          for name, cls in (("train-sit", TrainSiTConfig), ("train-dit", TrainDiTConfig))]
