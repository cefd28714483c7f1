"""Stage `train-vae`: train (or fine-tune) the ReaLS VAE with its alignment heads against a frozen teacher.

loss = rec + perceptual_weight * LPIPS + kl_weight * KL + align_weight * alignment
       (+ adaptive-weighted hinge GAN from ``disc_start``; the discriminator trains with the hinge loss).
``align_weight: 0`` is the unaligned baseline: the heads then train as a probe on detached latents,
so the latents see no alignment gradient but the cosine alignment is still measured.

Outputs under ``--output`` (local or object store): ``{step:07d}.pt`` checkpoints and a ``latest.json``
pointer, ``log.jsonl`` (losses and cosine alignment, averaged over each logging interval),
``samples/{step:07d}.png`` (originals above reconstructions of a fixed batch) and ``config.json``.

Resuming is exact on CPU: the data order is a pure function of (seed, epoch, rank), checkpoints hold the
RNG states of every rank and the data position (epoch, batches consumed), and a resumed run skips the
consumed batches. Distributed training starts by itself under torchrun or Ray Train (torch.distributed
environment variables): gloo on CPU, NCCL on CUDA; shards are split across ranks.
"""
from __future__ import annotations

import itertools
import os
import posixpath
from collections.abc import Iterator
from contextlib import nullcontext
from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import Field

from pipelines import StageError
from pipelines.checkpoints import check_resumable, training_missing, training_progress
from pipelines.config import Cli, Shards, ShowProgress, Teacher, TeacherInputSize
from pipelines.distributed import Dist, distributed, wrap_ddp
from pipelines.placement import Placed
from pipelines.ray_train import RayTrainSettings
from pipelines.registry import Chain, Output, Stage
from pipelines.render import image_grid
from pipelines.report_parts import ReportPart, Save, training_part
from pipelines.training import Schedule, TrainingLoop, ema_copy
from reals.align import AlignNet, alignment_loss, check_compatible
from reals.discriminator import NLayerDiscriminator
from reals.ema import update_ema
from reals.images import to_model_images, to_uint8
from reals.losses import AutoencoderLoss, PerceptualLoss, hinge_d_loss
from reals.teachers import build_teacher
from reals.vae import ReaLSVAE, build_vae, downsample_factor, load_weights
from storage.fs import join, list_files, read_bytes, to_url
from storage.markers import write_json
from storage.shards import iter_shard, iter_shards, read_manifest, shard_urls

SAMPLE_IMAGES = 8
RESUME_KEYS = ("shards", "split", "vae_config", "teacher", "teacher_input_size", "teacher_layer", "batch_size", "seed",
               "align_hidden_dim", "align_layers", "disc_channels", "disc_layers", "shuffle_buffer")


# ---------------------------------------------------------------------------------------------------
# Config and summary
# ---------------------------------------------------------------------------------------------------

class TrainVAEConfig(RayTrainSettings):
    """Inputs of `reals train-vae`."""

    shards: Shards = Field(description="shards URL (a folder with manifest.json, from `reals shard`)")
    output: str = Field(description="run URL for checkpoints, log.jsonl and sample grids (local or s3://)")
    split: str = Field("train", description="shard split to train on")
    vae_config: str = Field("demo",
        description="VAE architecture: sd-f8c4, demo or tiny (ignored when --vae-ckpt is a diffusers dir)")
    vae_ckpt: str | None = Field(None,
        description="initial VAE weights (local): a diffusers AutoencoderKL dir or a state_dict file")
    disc_ckpt: str | None = Field(None, description="initial discriminator weights (local state_dict file)")
    teacher: Teacher = Field("efficientnet_lite0",
        description="teacher: efficientnet_lite0 (offline), dinov2_vitb14 (ReaLS), ...")
    teacher_input_size: TeacherInputSize = Field(None, gt=0, description="teacher input size in px (default: the teacher's own)")
    teacher_weights_dir: str | None = Field(None,
        description="folder holding DINOv2 teacher weights (default: $REALS_DINOV2_DIR, HF cache)")
    teacher_layer: int | None = Field(None, ge=1,
        description="the teacher layer aligned to: a DINOv2 block (1-depth) or an EfficientNet stage (2-8 MBConv, "
                    "9 the head; the paper's numbering); default: the last")
    cache_teacher: bool = Field(False,
        description="compute the teacher's features of every image of the split once, in memory, before training "
                    "(small sets: without augmentation every epoch recomputes the same features); refused when "
                    "they would take more than a quarter of the memory")
    align_weight: float = Field(0.5, ge=0,
        description="weight of the alignment loss; 0 = unaligned baseline (heads as a probe)")
    align_hidden_dim: int = Field(1024, gt=0, description="hidden width of the alignment heads")
    align_layers: int = Field(3, gt=0, description="layers per alignment head")
    patch_weight: float = Field(1.0, ge=0, description="weight of the patch-token cosine term")
    global_weight: float = Field(1.0, ge=0, description="weight of the global-token cosine term")
    margin: float = Field(0.0, ge=0, description="cosine margin of the alignment terms")
    distmat_weight: float = Field(0.0, ge=0, description="weight of the distance-matrix term (VA-VAE)")
    distmat_margin: float = Field(0.25, ge=0, description="margin of the distance-matrix term")
    rec_loss: Literal["l1", "mse"] = Field("l1", description="pixel reconstruction loss")
    perceptual: Literal["lpips", "random", "none"] = Field(
        "lpips", description="lpips (needs the backbone in the torch hub cache), random (random backbone, "
                             "not the LPIPS metric) or none")
    perceptual_net: Literal["vgg", "alex", "squeeze"] = Field("vgg", description="LPIPS backbone")
    perceptual_weight: float = Field(1.0, ge=0, description="weight of the perceptual loss")
    kl_weight: float = Field(1e-6, ge=0, description="weight of the KL term")
    disc_start: int = Field(50001, ge=0, description="step from which the GAN terms run")
    disc_weight: float = Field(0.5, ge=0, description="GAN weight (times the adaptive weight); 0 disables the GAN")
    disc_channels: int = Field(64, gt=0, description="discriminator base width")
    disc_layers: int = Field(3, gt=0, description="discriminator stride-2 stages")
    lr: float = Field(5e-5, gt=0, description="learning rate of the VAE and heads (Adam)")
    disc_lr: float | None = Field(None, gt=0, description="discriminator learning rate (default: --lr)")
    betas: tuple[float, float] = Field((0.5, 0.9), description="Adam betas (LDM's)")
    batch_size: int = Field(8, gt=0, description="images per step per process")
    max_epoch: Annotated[int | None, Cli(group="length")] = Field(None, gt=0, description="stop after this many epochs")
    max_steps: Annotated[int | None, Cli(group="length")] = Field(None, gt=0,
        description="stop after this many steps (with --max-epoch too: whichever comes first)")
    ema_decay: float = Field(0.9999, ge=0, le=1, description="EMA decay of the VAE and heads")
    shuffle_buffer: int = Field(1000, ge=1, description="sample shuffle buffer size (1 = shard order)")
    seed: int = Field(0, description="seed of initialisation, data order and posterior noise")
    log_every: int = Field(50, gt=0, description="append averaged losses to log.jsonl every N steps")
    sample_every: int = Field(1000, gt=0, description="save a reconstruction grid every N steps")
    ckpt_every: int = Field(1000, gt=0, description="save a checkpoint every N steps")
    resume: bool = Field(False, description="continue from the latest checkpoint under --output")
    device: str = Field("auto", description="torch device: auto, cpu, cuda")
    mixed_precision: bool = Field(True, description="bf16 autocast on CUDA (ignored on CPU)")
    show_progress: ShowProgress = Field(True, description="show a progress bar")


class TrainVAESummary(Placed):
    output: str
    checkpoint: str | None = Field(description="URL of the last checkpoint written")
    steps: int
    epoch: int = Field(description="epochs completed")
    resumed_from: int | None
    teacher: str
    perceptual: str
    alignment: str
    vae_config: str
    latent_shape: list[int]
    final: dict[str, float] = Field(description="losses of the last logging interval")
    skipped: int = Field(description="undecodable samples skipped")
    teacher_cached: int = Field(0, description="images whose teacher features were computed once (--cache-teacher)")
    world_size: int


# ---------------------------------------------------------------------------------------------------
# Data: the order is a pure function of (seed, epoch, rank)
# ---------------------------------------------------------------------------------------------------

def epoch_shards(urls: list[str], seed: int, epoch: int) -> list[str]:
    """The shard order of an epoch (the same on every rank; ranks then take every world-th shard)."""
    perm = np.random.default_rng([seed, epoch]).permutation(len(urls))
    return [urls[i] for i in perm]


def buffer_shuffle(samples: Iterator[dict], size: int, rng: np.random.Generator) -> Iterator[dict]:
    """Shuffle a stream through a buffer of ``size`` samples with ``rng``."""
    buf: list[dict] = []
    for s in samples:
        if len(buf) < size:
            buf.append(s)
            continue
        i = int(rng.integers(size))
        buf[i], s = s, buf[i]
        yield s
    for i in rng.permutation(len(buf)):
        yield buf[i]


def epoch_batches(urls: list[str], cfg: TrainVAEConfig, epoch: int, d: Dist,
                  skipped: list) -> Iterator[tuple[np.ndarray, np.ndarray, list[str]]]:
    """Batches (uint8 images [B, H, W, 3], labels [B], sample ids) of one epoch for this rank; the last partial
    one dropped."""
    samples = iter_shards(epoch_shards(urls, cfg.seed, epoch), shuffle=0, split_by_node=d.enabled,
                          split_by_worker=False, skipped=skipped)
    rng = np.random.default_rng([cfg.seed, epoch, d.rank])
    batch: list[dict] = []
    for s in buffer_shuffle(samples, cfg.shuffle_buffer, rng):
        batch.append(s)
        if len(batch) == cfg.batch_size:
            yield (np.stack([b["image"] for b in batch]), np.array([b["cls"] for b in batch]),
                   [sample_id(b) for b in batch])
            batch = []


def sample_id(sample: dict) -> str:
    """A sample's identity across shards: its shard URL and key."""
    return f"{sample['__url__']}#{sample['__key__']}"


# ---------------------------------------------------------------------------------------------------
# Teacher features computed once (--cache-teacher)
# ---------------------------------------------------------------------------------------------------

class TeacherCache:
    """The teacher's (patch, global) features of every image of the shards, by ``sample_id``, computed in stored
    order with a fixed batch size, so a resumed run reads the very same features."""

    BATCH = 64

    def __init__(self, teacher, urls: list[str], count: int, device: torch.device, autocast):
        gh, gw = teacher.grid
        need = count * teacher.width * (gh * gw + 1) * 4
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        if need > memory // 4:
            raise StageError(f"--cache-teacher needs {need / 2**30:.1f} GiB for {count} images, more than a quarter "
                             f"of this machine's {memory / 2**30:.0f} GiB: train without it")
        self.index: dict[str, int] = {}
        patches, globals_ = [], []
        samples = iter_shards(urls, shuffle=0, split_by_worker=False, skipped=[])
        while chunk := list(itertools.islice(samples, self.BATCH)):
            images = to_model_images(np.stack([s["image"] for s in chunk]), device)
            with torch.no_grad(), autocast:
                patch, glob = teacher((images + 1) / 2)
            patches.append(patch.cpu())
            globals_.append(glob.cpu())
            self.index.update((sample_id(s), len(self.index)) for s in chunk)
        self.patch, self.glob = torch.cat(patches), torch.cat(globals_)

    def __len__(self) -> int:
        return len(self.index)

    def lookup(self, ids: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.tensor([self.index[i] for i in ids])
        return self.patch[rows].to(device), self.glob[rows].to(device)


# ---------------------------------------------------------------------------------------------------
# Sample grids
# ---------------------------------------------------------------------------------------------------

def fixed_batch(urls: list[str], n: int) -> np.ndarray:
    """The first ``n`` images of the first shard, in stored order (the same in every run)."""
    return np.stack([s["image"] for s in itertools.islice(iter_shard(urls[0]), n)])


@torch.no_grad()
def reconstruction_grid(model: ReaLSVAE, images: np.ndarray, device: torch.device) -> bytes:
    """Originals above the reconstructions of their posterior means."""
    x = to_model_images(images, device)
    return image_grid(np.concatenate([images, to_uint8(model.decode(model.encode(x)[0]))]), len(images))


# ---------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------

def load_discriminator_state(path: str) -> dict:
    """Discriminator weights from a state_dict file or a train-vae checkpoint (its ``disc``)."""
    if not os.path.isfile(path):
        raise StageError(f"discriminator checkpoint not found: {path}")
    state = load_weights(path)
    return state.get("disc", state)


class Trainer(TrainingLoop):
    """One training run of the ReaLS VAE: models, optimisers, and the step the shared loop drives."""

    def __init__(self, cfg: TrainVAEConfig, d: Dist):
        self.cfg = cfg
        self.urls = shard_urls(cfg.shards, cfg.split)
        if not self.urls:
            raise StageError(f"no {cfg.split} shards under {cfg.shards}")
        if d.enabled and len(self.urls) < d.world:
            raise StageError(f"{len(self.urls)} {cfg.split} shards for {d.world} ranks: re-shard with a smaller "
                             "--shard-size so that every rank gets at least one shard")
        manifest = read_manifest(cfg.shards)
        self.resolution = int(manifest["resolution"])
        self.count = int(manifest["splits"][cfg.split]["count"])
        super().__init__(cfg.output, d, Schedule(
            max_steps=cfg.max_steps, max_epochs=cfg.max_epoch,
            steps_per_epoch=max(1, self.count // (cfg.batch_size * d.world)), log_every=cfg.log_every,
            ckpt_every=cfg.ckpt_every, sample_every=cfg.sample_every, show_progress=cfg.show_progress,
            batch_size=cfg.batch_size * d.world))

        torch.manual_seed(cfg.seed)
        vae = build_vae(cfg.vae_config, cfg.vae_ckpt)
        f = downsample_factor(vae)
        if self.resolution % f:
            raise StageError(f"image size {self.resolution} is not a multiple of the VAE's downsampling factor {f}")
        side = self.resolution // f
        self.latent_shape = [vae.config.latent_channels, side, side]
        self.teacher = build_teacher(cfg.teacher, cfg.teacher_input_size, cfg.teacher_weights_dir,
                                     cfg.teacher_layer).to(d.device)
        check_compatible((side, side), self.teacher.grid)
        align = AlignNet(vae.config.latent_channels, self.teacher.width, cfg.align_hidden_dim, cfg.align_layers)
        self.model = ReaLSVAE(vae, align).to(d.device)
        self.ema = ema_copy(self.model)
        self.disc = NLayerDiscriminator(3, cfg.disc_channels, cfg.disc_layers).to(d.device)
        if cfg.disc_ckpt:
            self.disc.load_state_dict(load_discriminator_state(cfg.disc_ckpt))
        self.criterion = AutoencoderLoss(PerceptualLoss(cfg.perceptual, cfg.perceptual_net), cfg.rec_loss,
                                         cfg.perceptual_weight, cfg.kl_weight, cfg.disc_weight,
                                         cfg.disc_start).to(d.device)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, betas=cfg.betas)
        self.opt_d = torch.optim.Adam(self.disc.parameters(), lr=cfg.disc_lr or cfg.lr, betas=cfg.betas)
        self.probe = cfg.align_weight == 0
        self.teacher_cache: TeacherCache | None = None
        self.skipped: list = []
        self.samples: np.ndarray | None = None

        self.begin(cfg.seed * 1_000_003 + d.rank + 1, cfg.resume)
        self.train_model, self.train_disc = wrap_ddp(self.model, d), wrap_ddp(self.disc, d)
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                         if d.device.type == "cuda" and cfg.mixed_precision else nullcontext())

    # -- checkpoints ----------------------------------------------------------------------------------

    def restore(self, ckpt: dict) -> None:
        check_resumable(self.output, ckpt["config"], self.cfg, RESUME_KEYS)
        self.model.vae.load_state_dict(ckpt["vae"])
        self.model.align_net.load_state_dict(ckpt["align_net"])
        self.ema.vae.load_state_dict(ckpt["ema"]["vae"])
        self.ema.align_net.load_state_dict(ckpt["ema"]["align_net"])
        self.disc.load_state_dict(ckpt["disc"])
        self.opt.load_state_dict(ckpt["opt"])
        self.opt_d.load_state_dict(ckpt["opt_d"])

    def checkpoint_state(self) -> dict:
        """VAE, heads, their EMA and configs, discriminator, optimisers, config, teacher and data provenance."""
        return {
            "vae": self.model.vae.state_dict(), "align_net": self.model.align_net.state_dict(),
            "ema": {"vae": self.ema.vae.state_dict(), "align_net": self.ema.align_net.state_dict()},
            "vae_config": {k: v for k, v in dict(self.model.vae.config).items() if not k.startswith("_")},
            "align_config": self.model.align_net.init_config,
            "disc": self.disc.state_dict(), "disc_config": self.disc.init_config,
            "opt": self.opt.state_dict(), "opt_d": self.opt_d.state_dict(),
            "config": self.cfg.model_dump(),
            "resolution": self.resolution, "latent_shape": self.latent_shape,
            "teacher": self.teacher.describe(),
            "perceptual": self.criterion.perceptual.describe(),
            "data_fingerprint": read_manifest(self.cfg.shards).get("fingerprint"),
        }

    # -- one step -------------------------------------------------------------------------------------

    def batches(self, epoch: int, skip: int):
        return itertools.islice(epoch_batches(self.urls, self.cfg, epoch, self.d, self.skipped), skip, None)

    def train_batch(self, batch) -> dict[str, float]:
        images, _, ids = batch
        targets = self.teacher_cache.lookup(ids, self.d.device) if self.teacher_cache is not None else None
        return self.train_step(to_model_images(images, self.d.device), targets)

    def train_step(self, images: torch.Tensor,
                   targets: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, float]:
        """One generator (VAE + heads) step and, once the GAN is on, one discriminator step; ``targets``: the
        teacher's (patch, global) features of ``images`` when already computed."""
        cfg = self.cfg
        gan = self.criterion.gan_active(self.step)
        with self.autocast:
            if targets is None:
                with torch.no_grad():
                    targets = self.teacher((images + 1) / 2)
            t_patch, t_global = targets
            out = self.train_model(images, detach_heads=self.probe)
            logits_fake = self.disc(out["rec"]) if gan else None
            terms = self.criterion(images, out, logits_fake, self.model.vae.decoder.conv_out.weight)
            align = alignment_loss(out["patch"], out["global"], t_patch, t_global, cfg.patch_weight,
                                   cfg.global_weight, cfg.margin, cfg.distmat_weight, cfg.distmat_margin)
        loss = terms["loss"] + (1.0 if self.probe else cfg.align_weight) * align["loss"]
        self.stop_unless_finite(bool(torch.isfinite(loss)),
                                lambda: f"rec={terms['rec'].item():.4g}, align={align['loss'].item():.4g}",
                                "resume with a lower --lr")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        update_ema(self.ema, self.model, cfg.ema_decay)

        stats = {k: float(v.detach()) for k, v in terms.items()}
        stats.update(align=float(align["loss"].detach()), patch_cos=float(align["patch_cos"]),
                     global_cos=float(align["global_cos"]), loss=float(loss.detach()))
        if gan:
            self.opt_d.zero_grad(set_to_none=True)
            with self.autocast:
                d_loss = hinge_d_loss(self.train_disc(images), self.train_disc(out["rec"].detach()))
            d_loss.backward()
            self.opt_d.step()
            stats["d_loss"] = float(d_loss.detach())
        return stats

    def sample_grid(self) -> bytes:
        return reconstruction_grid(self.model, self.samples, self.d.device)

    def empty_epoch(self) -> str:
        return (f"no full batch of {self.cfg.batch_size} images in {self.cfg.shards} ({self.count} listed, "
                f"{len(self.skipped)} undecodable): lower --batch-size")

    # -- the run --------------------------------------------------------------------------------------

    def fit(self) -> TrainVAESummary:
        cfg, d = self.cfg, self.d
        if d.main:
            write_json(join(self.output, "config.json"), cfg.model_dump())
            self.samples = fixed_batch(self.urls, min(SAMPLE_IMAGES, cfg.batch_size))
        if cfg.cache_teacher and not self.done():
            self.teacher_cache = TeacherCache(self.teacher, self.urls, self.count, d.device, self.autocast)
        self.train("train-vae")
        return TrainVAESummary(
            output=self.output, checkpoint=self.last_checkpoint, steps=self.step, epoch=self.epoch,
            resumed_from=self.resumed_from, teacher=self.teacher.description,
            perceptual=self.criterion.perceptual.describe(),
            alignment=("unaligned baseline (align_weight 0): heads trained as a probe on detached latents"
                       if self.probe else f"aligned, weight {cfg.align_weight}"),
            vae_config=cfg.vae_config if not cfg.vae_ckpt else f"{cfg.vae_config} from {cfg.vae_ckpt}",
            latent_shape=self.latent_shape, final=self.final, skipped=len({k for k, _ in self.skipped}),
            teacher_cached=len(self.teacher_cache) if self.teacher_cache else 0,
            world_size=d.world)


def run(config: TrainVAEConfig) -> TrainVAESummary:
    """Train the ReaLS VAE; returns the summary (rank 0's view under DDP)."""
    if config.max_steps is None and config.max_epoch is None:
        raise StageError("train-vae needs --max-steps or --max-epoch")
    with distributed(config.device) as d:
        return Trainer(config, d).fit()


# ---------------------------------------------------------------------------------------------------
# Stage record
# ---------------------------------------------------------------------------------------------------

SUMMARY_TERMS = ("rec", "perceptual", "kl", "align", "patch_cos", "global_cos", "g", "d_loss")


def show(s: TrainVAESummary) -> None:
    if int(os.environ.get("RANK", "0")) != 0:
        return
    final = ", ".join(f"{k} {v:.4g}" for k, v in s.final.items() if k in SUMMARY_TERMS)
    resumed = "" if s.resumed_from is None else f", resumed from {s.resumed_from}"
    print(f"train-vae: {s.steps} steps ({s.epoch} epochs done{resumed}); latents {'x'.join(map(str, s.latent_shape))}")
    print(f"  teacher: {s.teacher}\n  perceptual: {s.perceptual}\n  alignment: {s.alignment}")
    if s.teacher_cached:
        print(f"  teacher features: computed once for {s.teacher_cached} images (--cache-teacher)")
    print(f"  final: {final}\n  checkpoint: {s.checkpoint}")
    if s.skipped:
        print(f"  skipped {s.skipped} undecodable samples")


def report(config: TrainVAEConfig, save: Save) -> ReportPart | None:
    """The last logged interval, the loss curves and the latest reconstructions."""
    part = training_part("VAE training", config.output, "train-vae", save, "loss_curves_vae.png")
    if part is None:
        return None
    grids = list_files(join(to_url(config.output), "samples"), ".png")
    if grids:
        name = save("vae_reconstructions.png", read_bytes(grids[-1]))
        step = posixpath.basename(grids[-1]).removesuffix(".png").lstrip("0") or 0
        part.lines.extend([f"Originals (top) and reconstructions (bottom) at step {step}:", "",
                           f"![VAE reconstructions]({name})", ""])
    return part


STAGES = [Stage("train-vae", TrainVAEConfig, TrainVAESummary, run, runs_on="train",
                missing=lambda c: training_missing(c.output, c.max_steps, c.max_epoch),
                progress=lambda c: training_progress(c.output, c.max_steps), show=show, report=report,
                reads={"shards": "shards/train", "vae_ckpt": "vae_weights"},
                writes={"output": Output("vae_run", "vae")},
                chain=Chain("train_vae", "VAE training", sets={"resume": True}),
                help="train the ReaLS VAE (AutoencoderKL + alignment heads) on shards",
                description=__doc__.split("\n\n")[0])]
