"""Stages `convert` (train-vae checkpoint -> ReaLS VAE directory) and `extract-ema` (EMA VAE state_dict).

The directory loads with plain ``diffusers.AutoencoderKL.from_pretrained(dir)`` and with
``reals.vae.ReaLSVAE.from_pretrained(dir)``; it holds the EMA weights unless ``--no-ema``.
``--from-diffusers DIR`` takes any diffusers ``AutoencoderKL`` directory instead (SD-VAE ``sd-vae-ft-ema``, or a
ReaLS VAE released without our statistics): its weights, its ``align_net.*`` heads when it has them (stages that
need heads refuse a VAE without), and statistics from ``--data-path`` or, DiT-style, ``--scaling-factor s``
(mean 0, std 1/s).

Latent statistics in ``mean_std.json``: over the posterior means ``z`` of the first ``--num-samples``
training images (manifest order), channel-wise over all images and latent positions::

    mean_c = E[z_c]        std_c = sqrt(E[(z_c - mean_c)^2])

accumulated in float64 as sums of ``z`` and ``z^2``. The diffusion model sees ``(z - mean) / std``.
``provenance.json`` is written last and marks the directory complete: a re-run with the same checkpoint,
weights choice, data and sample count skips the work.
"""
from __future__ import annotations

import io
import itertools
import json
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, Field, model_validator

from pipelines import StageError
from pipelines.config import OptionalShards, ShowProgress, StageConfig
from pipelines.devices import torch_device
from pipelines.registry import Chain, Output, Stage
from pipelines.parallel import progress_bar
from pipelines.checkpoints import load_checkpoint, resolve_checkpoint
from pipelines.report_parts import ReportPart, Save
from reals.align import AlignNet
from reals.images import to_model_images
from reals.vae import (MEAN_STD_FILE, PROVENANCE_FILE, ReaLSVAE, damaged_files, downsample_factor,
                       read_channel_statistics)
from storage.fs import apply_umask, join, local_path, to_url, write_bytes_atomic
from storage.markers import read_json, sha256_url
from storage.shards import iter_shards, read_manifest, shard_urls

STATS_FORMULA = "mean_c = E[z_c], std_c = sqrt(E[(z_c - mean_c)^2]) over posterior means, all images and positions"


# ---------------------------------------------------------------------------------------------------
# Configs and summaries
# ---------------------------------------------------------------------------------------------------

class ConvertConfig(StageConfig):
    """Inputs of `reals convert`."""

    ckpt: str | None = Field(None, description="train-vae checkpoint URL (.pt), or a run folder (its latest.json)")
    from_diffusers: str | None = Field(None, description="a diffusers AutoencoderKL directory (local) to convert "
                                                         "instead of a checkpoint; its align_net.* heads are kept")
    scaling_factor: float | None = Field(None, gt=0, description="with --from-diffusers: DiT-style statistics, mean 0 "
                                                                 "and std 1/s in every channel (SD-VAE: 0.18215)")
    resolution: int | None = Field(None, gt=0, description="with --from-diffusers: image side the VAE serves (default: "
                                                           "the shards', else the VAE config's sample_size)")
    output_dir: str = Field(description="ReaLS VAE directory to write; local only (diffusers loads local dirs)")
    shards: OptionalShards = Field(None, description="shards URL whose training images give the latent mean/std")
    split: str = Field("train", description="shard split for the latent statistics")
    num_samples: int = Field(10000, gt=0, description="images for the latent statistics (the first N)")
    ema: bool = Field(True, description="convert the EMA weights (False: the raw training weights)")
    batch_size: int = Field(32, gt=0, description="images per encoding batch")
    device: str = Field("auto", description="torch device: auto, cpu, cuda")
    show_progress: ShowProgress = Field(True, description="show a progress bar")


    @model_validator(mode="after")
    def _one_source(self):
        if (self.ckpt is None) == (self.from_diffusers is None):
            raise ValueError("give exactly one of --ckpt (a train-vae checkpoint) or --from-diffusers DIR")
        if self.ckpt is not None and (self.scaling_factor is not None or self.resolution is not None):
            raise ValueError("--scaling-factor and --resolution apply to --from-diffusers only")
        if self.shards is None and self.scaling_factor is None:
            raise ValueError("--data-path is required (the latent statistics), unless --scaling-factor is given")
        return self


class ConvertSummary(BaseModel):
    output_dir: str
    fingerprint: str
    checkpoint: str
    step: int
    weights: str = Field(description="ema or raw")
    latents_mean: list[float]
    latents_std: list[float]
    num_images: int
    skipped: bool = Field(description="the directory was already converted from the same inputs")


class ExtractEMAConfig(StageConfig):
    """Inputs of `reals extract-ema`."""

    ckpt: str = Field(description="train-vae checkpoint URL (.pt), or a run folder (its latest.json)")
    output: str = Field(description="state_dict URL to write (.pt torch file, or .safetensors)")


class ExtractEMASummary(BaseModel):
    output: str
    checkpoint: str
    step: int
    tensors: int
    vae_config: str


# ---------------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------------

def code_version() -> str:
    try:
        return metadata.version("reals-pipeline")
    except metadata.PackageNotFoundError:
        return "unknown"


def model_from_checkpoint(ckpt: dict, ema: bool = True) -> ReaLSVAE:
    """The ReaLS VAE (unit statistics) held by a train-vae checkpoint: EMA or raw weights."""
    from diffusers import AutoencoderKL

    weights = ckpt["ema"] if ema else {"vae": ckpt["vae"], "align_net": ckpt["align_net"]}
    vae = AutoencoderKL(**ckpt["vae_config"])
    vae.load_state_dict(weights["vae"])
    align = AlignNet.from_init_config(ckpt["align_config"])
    align.load_state_dict(weights["align_net"])
    return ReaLSVAE(vae, align).eval()


@torch.no_grad()
def measure_channel_statistics(model: ReaLSVAE, urls: list[str], num_samples: int, batch_size: int,
                               device: torch.device, show_progress: bool = False
                               ) -> tuple[list[float], list[float], int]:
    """``(latents_mean, latents_std, images used)``: the channel statistics of the posterior-mean latents of the
    first ``num_samples`` images."""
    c = model.latent_channels
    total, total_sq, values, images = torch.zeros(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64), 0, 0
    samples = itertools.islice(iter_shards(urls, shuffle=0, split_by_worker=False), num_samples)
    with progress_bar(disable=not show_progress) as bar:
        task = bar.add_task("latent statistics", total=num_samples)
        while batch := list(itertools.islice(samples, batch_size)):
            x = to_model_images(np.stack([s["image"] for s in batch]), device)
            z = model.encode(x)[0].double().cpu()
            total += z.sum(dim=(0, 2, 3))
            total_sq += z.square().sum(dim=(0, 2, 3))
            values += z.shape[0] * z.shape[2] * z.shape[3]
            images += len(batch)
            bar.advance(task, len(batch))
    if images == 0:
        raise StageError("no decodable images for the latent statistics")
    mean = total / values
    std = (total_sq / values - mean.square()).clamp_min(1e-12).sqrt()
    return mean.tolist(), std.tolist(), images


def _converted(out: Path, source: dict) -> tuple[dict, list, list] | None:
    """(provenance, latents_mean, latents_std) of an intact directory already converted from ``source``; else
    None (and it is redone)."""
    done = out / PROVENANCE_FILE
    if done.is_file() and (out / MEAN_STD_FILE).is_file():
        prov = json.loads(done.read_text())
        same = all(prov.get("conversion", {}).get(k) == v for k, v in source.items())
        damaged = _damaged(out, prov)
        if same and damaged:
            print(f"convert: redoing {out}: {damaged[0]}")
        if same and not damaged:
            return prov, *read_channel_statistics(json.loads((out / MEAN_STD_FILE).read_text()))
        done.unlink()
    return None


def run(config: ConvertConfig) -> ConvertSummary:
    """Write the ReaLS VAE directory for a checkpoint (skipped when it exists from the same inputs)."""
    out = local_path(config.output_dir)
    if out is None:
        raise StageError(f"--output-dir must be a local directory (diffusers loads local dirs), got {config.output_dir}")
    out = Path(out).resolve()
    if config.from_diffusers is not None:
        return run_from_diffusers(config, out)
    ckpt_url = resolve_checkpoint(to_url(config.ckpt))
    ckpt_sha = sha256_url(ckpt_url)
    manifest = read_manifest(config.shards)
    source = {"checkpoint_sha256": ckpt_sha, "weights": "ema" if config.ema else "raw",
              "num_samples": config.num_samples, "data_fingerprint": manifest.get("fingerprint"),
              "split": config.split}

    if found := _converted(out, source):
        prov, mean, std = found
        return ConvertSummary(output_dir=str(out), fingerprint=prov["fingerprint"], checkpoint=ckpt_url,
                              step=prov["training"]["step"], weights=source["weights"], latents_mean=mean,
                              latents_std=std, num_images=prov["latent_statistics"]["num_images"], skipped=True)

    ckpt = load_checkpoint(ckpt_url)
    device = torch_device(config.device)
    model = model_from_checkpoint(ckpt, config.ema).to(device)
    urls = shard_urls(config.shards, config.split)
    mean, std, n = measure_channel_statistics(model, urls, config.num_samples, config.batch_size, device,
                                              config.show_progress)
    model = ReaLSVAE(model.vae.cpu(), model.align_net.cpu(), mean, std)
    train_cfg = ckpt["config"]
    provenance = {
        "fingerprint": model.fingerprint,
        "teacher": ckpt["teacher"],
        "vae_config": train_cfg.get("vae_config"),
        "autoencoder_kl": ckpt["vae_config"],
        "align_net": ckpt["align_config"],
        "align_weight": train_cfg.get("align_weight"),
        "perceptual": ckpt.get("perceptual"),
        "resolution": ckpt["resolution"],
        "latent_shape": ckpt["latent_shape"],
        "downsample_factor": downsample_factor(model.vae),
        "training": {"run": train_cfg.get("output"), "checkpoint": ckpt_url, "step": ckpt["step"],
                     "shards": train_cfg.get("shards", train_cfg.get("data_path")), "data_fingerprint": ckpt.get("data_fingerprint"),
                     "config": train_cfg},
        "latent_statistics": {"num_images": n, "shards": to_url(config.shards), "formula": STATS_FORMULA,
                              "normalisation": "z_norm = (z - latents_mean) / latents_std, channel-wise"},
        "conversion": source,
        "code_version": code_version(),
    }
    model.save_pretrained(out, provenance)
    apply_umask(out)  # safetensors writes 0600
    return ConvertSummary(output_dir=str(out), fingerprint=model.fingerprint, checkpoint=ckpt_url,
                          step=ckpt["step"], weights=source["weights"], latents_mean=mean, latents_std=std, num_images=n,
                          skipped=False)


def run_from_diffusers(config: ConvertConfig, out: Path) -> ConvertSummary:
    """Write a VAE directory from a diffusers AutoencoderKL directory: its weights, heads if any, statistics."""
    from reals.vae import build_vae

    src = Path(config.from_diffusers).expanduser().resolve()
    if not (src / "config.json").is_file():
        raise StageError(f"--from-diffusers {src} is not a diffusers AutoencoderKL directory (no config.json)")
    weights = sorted(p for p in src.iterdir() if p.name.startswith("diffusion_pytorch_model"))
    if not weights:
        raise StageError(f"--from-diffusers {src} holds no diffusion_pytorch_model.* weights")
    manifest = read_manifest(config.shards) if config.scaling_factor is None else {}
    source = {"diffusers_dir": str(src), "weights_sha256": [sha256_url(to_url(str(p))) for p in weights],
              "scaling_factor": config.scaling_factor, "data_fingerprint": manifest.get("fingerprint"),
              "num_samples": None if config.scaling_factor else config.num_samples, "split": config.split}
    if found := _converted(out, source):
        prov, mean, std = found
        return ConvertSummary(output_dir=str(out), fingerprint=prov["fingerprint"], checkpoint=str(src), step=0,
                              weights="diffusers", latents_mean=mean, latents_std=std,
                              num_images=prov["latent_statistics"]["num_images"], skipped=True)
    try:
        vae = build_vae(ckpt=src)
    except (OSError, ValueError) as e:
        raise StageError(f"--from-diffusers {src}: cannot load it as an AutoencoderKL: {e}") from None
    heads = AlignNet.from_pretrained(src) if (src / AlignNet.config_name).is_file() else None
    model = ReaLSVAE(vae, heads).eval()
    c = model.latent_channels
    if config.scaling_factor is not None:
        mean, std, n = [0.0] * c, [1 / config.scaling_factor] * c, 0
        formula = f"DiT-style: mean 0, std 1/{config.scaling_factor} (--scaling-factor)"
    else:
        device = torch_device(config.device)
        mean, std, n = measure_channel_statistics(model.to(device), shard_urls(config.shards, config.split),
                                                  config.num_samples, config.batch_size, device,
                                                  config.show_progress)
        formula = STATS_FORMULA
    model = ReaLSVAE(vae.cpu(), heads.cpu() if heads is not None else None, mean, std)
    resolution = config.resolution or manifest.get("resolution") or vae.config.sample_size
    side = resolution // downsample_factor(vae)
    src_prov = json.loads((src / PROVENANCE_FILE).read_text()) if (src / PROVENANCE_FILE).is_file() else {}
    provenance = {
        "fingerprint": model.fingerprint,
        "teacher": src_prov.get("teacher") if heads is not None else None,
        "autoencoder_kl": {k: v for k, v in vae.config.items() if not k.startswith("_")},
        "align_net": heads.config if heads is not None else None,
        "resolution": resolution,
        "latent_shape": [c, side, side],
        "downsample_factor": downsample_factor(vae),
        "source": {"diffusers_dir": str(src), "heads": heads is not None, "provenance": src_prov or None},
        "latent_statistics": {"num_images": n, "shards": to_url(config.shards) if config.shards else None,
                              "formula": formula,
                              "normalisation": "z_norm = (z - latents_mean) / latents_std, channel-wise"},
        "conversion": source,
        "code_version": code_version(),
    }
    model.save_pretrained(out, provenance)
    apply_umask(out)
    return ConvertSummary(output_dir=str(out), fingerprint=model.fingerprint, checkpoint=str(src), step=0,
                          weights="diffusers", latents_mean=mean, latents_std=std, num_images=n,
                          skipped=False)


def missing_outputs(config: ConvertConfig) -> str | None:
    """What the VAE directory lacks to be this checkpoint's conversion with these settings, or None."""
    out = Path(local_path(config.output_dir) or config.output_dir)
    if not (out / PROVENANCE_FILE).is_file() or not (out / MEAN_STD_FILE).is_file():
        return "no converted VAE directory"
    prov = json.loads((out / PROVENANCE_FILE).read_text())
    conversion = prov.get("conversion", {})
    if config.from_diffusers is not None:
        src = str(Path(config.from_diffusers).expanduser().resolve())
        if (conversion.get("diffusers_dir"), conversion.get("scaling_factor")) != (src, config.scaling_factor):
            return "converted from another source or with other settings"
    else:
        if conversion.get("checkpoint_sha256") != sha256_url(resolve_checkpoint(to_url(config.ckpt))):
            return "converted from another checkpoint"
        if (conversion.get("num_samples"), conversion.get("weights")) != (config.num_samples,
                                                                          "ema" if config.ema else "raw"):
            return "converted with other settings"
    damaged = _damaged(out, prov)
    return f"damaged: {damaged[0]}" if damaged else None


def _damaged(out: Path, provenance: dict) -> list[str]:
    """The directory's files that differ from the sizes and sha256 recorded in its provenance."""
    return damaged_files(out, provenance["files"]) if provenance.get("files") else ["no file hashes recorded"]


def run_extract_ema(config: ExtractEMAConfig) -> ExtractEMASummary:
    """Write the EMA VAE weights of a checkpoint as a plain state_dict (usable as ``--vae-ckpt``)."""
    ckpt_url = resolve_checkpoint(to_url(config.ckpt))
    ckpt = load_checkpoint(ckpt_url)
    state = {k: v.contiguous() for k, v in ckpt["ema"]["vae"].items()}
    if config.output.endswith(".safetensors"):
        from safetensors.torch import save

        data = save(state, metadata={"format": "pt"})
    else:
        buf = io.BytesIO()
        torch.save(state, buf)
        data = buf.getvalue()
    write_bytes_atomic(to_url(config.output), data)
    return ExtractEMASummary(output=to_url(config.output), checkpoint=ckpt_url, step=ckpt["step"],
                             tensors=len(state), vae_config=str(ckpt["config"].get("vae_config")))


# ---------------------------------------------------------------------------------------------------
# Stage records
# ---------------------------------------------------------------------------------------------------

def _fmt(xs: list[float]) -> str:
    return "[" + ", ".join(f"{x:.4g}" for x in xs) + "]"


def show(s: ConvertSummary) -> None:
    verb = "already converted" if s.skipped else "converted"
    print(f"convert: {verb} {s.checkpoint} (step {s.step}, {s.weights} weights) -> {s.output_dir}")
    print(f"  fingerprint {s.fingerprint}; latents_mean {_fmt(s.latents_mean)}, latents_std {_fmt(s.latents_std)} "
          f"over {s.num_images} images")


def show_extract_ema(s: ExtractEMASummary) -> None:
    print(f"extract-ema: {s.tensors} EMA tensors of {s.checkpoint} (step {s.step}, vae config {s.vae_config}) "
          f"-> {s.output}")


def report(config: ConvertConfig, save: Save) -> ReportPart | None:
    """The VAE: architecture, teacher, alignment weight, perceptual loss, training and latent statistics."""
    prov = read_json(join(to_url(config.output_dir), "provenance.json"))
    if not prov:
        return None
    teacher = prov.get("teacher") or {}
    perceptual = prov.get("perceptual") or "unknown"
    lines = ["## VAE", "",
             f"- architecture: {prov.get('vae_config')}, latents {'x'.join(map(str, prov.get('latent_shape', [])))} "
             f"(downsampling x{prov.get('downsample_factor')}), fingerprint `{prov.get('fingerprint')}`",
             f"- teacher: {teacher.get('description', teacher) if isinstance(teacher, dict) else teacher}",
             f"- alignment weight: {prov.get('align_weight')}",
             f"- perceptual loss: {perceptual}"]
    if not perceptual.startswith("LPIPS"):
        lines.append("  (LPIPS was not used: its ImageNet backbone weights cannot be downloaded offline)")
    training = prov.get("training") or {}
    stats = prov.get("latent_statistics") or {}
    lines += [f"- trained for {training.get('step')} steps (`{training.get('run')}`)",
              f"- latent statistics over {stats.get('num_images')} images: {stats.get('normalisation')}", ""]
    return ReportPart(lines)


STAGES = [
    Stage("convert", ConvertConfig, ConvertSummary, run, missing=missing_outputs, show=show, report=report,
          reads={"ckpt": "vae_run", "shards": "shards/{split}"},
          writes={"output_dir": Output("vae_dir", "vae-dir", local=True)},
          chain=Chain("convert", "checkpoint to ReaLS VAE directory"),
          help="checkpoint -> ReaLS VAE dir (diffusers AutoencoderKL + align_net + mean_std.json)",
          description=__doc__.split("\n\n")[0]),
    Stage("extract-ema", ExtractEMAConfig, ExtractEMASummary, run_extract_ema, show=show_extract_ema,
          reads={"ckpt": "vae_run"}, writes={"output": Output("vae_weights", "vae-ema.safetensors")},
          help="write a checkpoint's EMA VAE weights as a state_dict",
          description="Write the EMA VAE weights of a train-vae checkpoint as a state_dict (usable as train-vae "
                      "--vae-ckpt with the same --vae-config)."),
]
