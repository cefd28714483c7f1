"""Stage `sample`: draw images from a SiT or DiT checkpoint through the ReaLS VAE, in parallel on Ray actors.

SiT (flow matching) samples by ``ODE`` or ``SDE``; DiT (DDPM with learned variance) by ``DDPM`` (ancestral, the
learned variance; 250 respaced steps as DiT's ``sample_ddp.py``) or ``DDIM`` (DiT's ``ddim_sample_loop``;
``--eta``, 0 deterministic). A checkpoint of one family given to the other's sampler is refused by name.

Every sample ``i`` is a pure function of ``(global_seed, i)`` and the settings: its label, its initial noise
and its SDE/DDPM noise come from its own generators, and index ranges are cut into batches the same way whatever
the number of workers, so the result does not depend on how many workers drew it. The work is split into
units of ``--unit-size`` indices; each Ray actor loads the model and the VAE once and writes a unit as
``<output>.parts/{start:08d}-{end:08d}.npz`` (``arr_0`` uint8 NHWC images, ``arr_1`` labels, optionally
``latents``) followed by its done-marker ``.json``. A re-run skips units whose marker agrees with the
settings and the part's bytes. The driver then merges the parts into ``<output>`` in the ADM layout that the
ADM evaluator reads (``arr_0`` uint8 NHWC, ``arr_1`` int64 labels; ``latents`` float32 normalised latents
with ``--save-latents``) and writes a PNG grid of the first 64 samples next to it. Once the merged file reads
back whole (every member's CRC and shape), the parts are removed (``--keep-parts`` keeps them, so that a later
run with a larger ``--num-fid-samples`` or a re-run reuses them).
"""
from __future__ import annotations

import math
import time
from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import BaseModel, Field, field_validator, model_validator

from pipelines import StageError
from pipelines.checkpoints import resolve_checkpoint
from pipelines.config import Cli, ShowProgress, StageConfig
from pipelines.devices import ray_uses_gpu, torch_device
from pipelines.generator_checkpoint import (check_weights_fit, checkpoint_weights, load_model, load_recognised,
                                            model_spec, sde_diffusion_form)
from pipelines.npz import write_npz
from pipelines.parallel import ActorPool, pool_size
from pipelines.registry import Chain, Output, Stage
from pipelines.render import image_grid
from pipelines.report_parts import Card, ReportPart, Save, image, table
from pipelines.sample_parts import merge_parts, part_is_done, parts_url, verify_merged, write_part
from pipelines.sampling import NOISE_STREAM, check_mode, make_sampler, sample_generators, sample_images, sample_labels
from reals import ReaLSError
from reals.transport.sampling import SDE_METHODS
from reals.vae import ReaLSVAE
from storage.fs import filesystem, list_files, remove, to_url, write_bytes_atomic
from storage.markers import fingerprint

GRID_SAMPLES = 64


# ---------------------------------------------------------------------------------------------------
# Config and summary
# ---------------------------------------------------------------------------------------------------

class SampleConfig(StageConfig):
    """Inputs of `reals sample`."""

    mode: Annotated[Literal["ODE", "SDE", "DDPM", "DDIM"], Cli(positional=True, parse=str.upper)] = Field(
        description="SiT: ODE (the probability-flow ODE) or SDE (the reverse-time SDE), SiT's sample_ddp.py modes; "
                    "DiT: DDPM (ancestral, the learned variance) or DDIM")
    ckpt: str = Field(description="model checkpoint: a train-sit/train-dit .pt (or its run folder), a SiT/DiT/REPA "
                                  "train.py checkpoint, or a bare SiT/DiT/REPA state dict (see `reals import-checkpoint`)")
    vae_path: str = Field(description="ReaLS VAE directory that decodes the latents (local)")
    output: str = Field(description="samples file (.npz, ADM layout), local or s3://")
    model: str | None = Field(None, description="model name, e.g. SiT-XL/2 or DiT-XL/2 (default: the checkpoint's)")
    cfg_scale: float = Field(1.5, ge=0, description="classifier-free guidance scale (1: no guidance)")
    guidance_interval: Annotated[tuple[float, float] | None, Cli(metavar=("LO", "HI"))] = Field(
        None, description="guide only where LO <= tau <= HI, tau the noise level (tau=1 pure noise, tau=0 data): "
                          "1 - t for SiT's time t, t / 1000 for DiT's timestep t; ReaLS uses 0 0.75 (the noisiest "
                          "quarter unguided); default: guide everywhere")
    cfg_channels: str = Field("all", pattern=r"^(all|[1-9]\d*)$",
                              description="latent channels guided: all, or the first N (3 as in DiT/SiT)")
    num_sampling_steps: int = Field(
        250, ge=2, description="time grid points linspace(t0, t1, N) as in SiT's sample_ddp.py: N - 1 steps (SDE: "
                               "N - 1 noisy steps and the last step). REPA's --num-steps N is N + 1 here for ODE, "
                               "N for SDE. DDPM/DDIM: N respaced timesteps of the 1000 (N model evaluations), DiT's "
                               "create_diffusion(str(N)) as in its sample_ddp.py")
    sampling_method: Literal["euler", "heun", "heun-repa", "dopri5"] | None = Field(
        None, description="ODE: euler, heun (default), heun-repa (REPA's: no corrector on the last step, its "
                          "guidance decided at the current time) or dopri5 (adaptive; its steps depend on the whole "
                          "batch); SDE: euler (Euler-Maruyama, default) or heun (SiT's stochastic Heun)")
    atol: float = Field(1e-6, gt=0, description="dopri5 absolute tolerance")
    rtol: float = Field(1e-3, gt=0, description="dopri5 relative tolerance")
    diffusion_norm: float = Field(1.0, ge=0, description="SDE diffusion scale: D(t) = norm * the diffusion form "
                                                          "(drift v + D * score, noise sqrt(2 D dt))")
    diffusion_form: Literal["sigma", "linear"] | None = Field(
        None, description="SDE diffusion form (SiT's --diffusion-form): sigma (D = norm * sigma_t) or linear "
                          "(D = norm * (1 - t), REPA's 2t in its time); default: linear for a checkpoint imported "
                          "from REPA, else sigma")
    last_step: Literal["mean", "euler", "tweedie", "none"] = Field(
        "mean", description="SDE last step (SiT's --last-step): mean (along the SDE drift), euler (along the "
                            "velocity), tweedie (the denoised estimate) or none")
    last_step_size: float = Field(0.04, gt=0, lt=1, description="SDE last step size (the grid ends at 1 - it)")
    eta: float = Field(0.0, ge=0, description="DDIM noise scale (0: deterministic)")
    ddim_spacing: Literal["dit", "trailing"] = Field(
        "dit", description="DDIM timesteps: dit (DiT's ddim_sample_loop on create_diffusion(str(N))) or trailing "
                           "(diffusers' 999, 999 - 1000/N, ...; N must divide 1000)")
    path_type: Literal["Linear", "GVP"] | None = Field(None, description="transport path (default: the checkpoint's)")
    prediction: Literal["velocity", "score", "noise"] | None = Field(
        None, description="what the model predicts (default: the checkpoint's)")
    num_fid_samples: int = Field(50000, ge=1, description="number of samples")
    num_classes: int | None = Field(None, ge=1, description="classes (default: from the checkpoint)")
    labels: Literal["random", "balanced"] = Field(
        "random", description="random: each sample's label from its own seed; balanced: label i mod K")
    per_proc_batch_size: int = Field(32, ge=1, description="samples per batch in each worker")
    unit_size: int = Field(128, ge=1, description="samples per unit of work (one part file)")
    global_seed: int = Field(0, ge=0, description="seed; sample i uses the seeds (global_seed, i)")
    use_ema: Annotated[bool, Cli(negative="--no-ema")] = Field(True, description="use the checkpoint's EMA weights")
    save_latents: bool = Field(False, description="also store the normalised latents as `latents` in the .npz")
    keep_parts: bool = Field(False, description="keep the parts folder (the output's name + .parts) after the merge "
                                                "(removed by default once the merged file is verified)")
    workers: int | None = Field(None, ge=1, description="Ray actors (default: one per GPU, else one per CPU)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where the workers run the models")
    show_progress: ShowProgress = Field(True, description="show a progress bar")

    @field_validator("output")
    @classmethod
    def _npz(cls, v: str) -> str:
        if not v.endswith(".npz"):
            raise ValueError(f"must end with .npz, got {v!r}")
        return v

    @field_validator("guidance_interval")
    @classmethod
    def _interval(cls, v):
        if v is not None and not 0 <= v[0] <= v[1] <= 1:
            raise ValueError(f"needs 0 <= LO <= HI <= 1, got {list(v)}")
        return v

    @model_validator(mode="after")
    def _method_of_mode(self):
        """The integrator defaults per mode (ODE: heun, SDE: euler); an SDE takes euler or heun only; DDPM and
        DDIM take none."""
        if self.mode in ("DDPM", "DDIM"):
            if self.sampling_method is not None:
                raise ValueError(f"sampling_method does not apply to {self.mode}")
        elif self.sampling_method is None:
            self.sampling_method = "heun" if self.mode == "ODE" else "euler"
        elif self.mode == "SDE" and self.sampling_method not in SDE_METHODS:
            raise ValueError(f"sampling_method {self.sampling_method} is an ODE method; SDE takes "
                             f"{' or '.join(SDE_METHODS)}")
        return self


class SampleSummary(BaseModel):
    """What `reals sample` did."""

    output: str
    grid: str
    num_samples: int
    image_shape: list[int]
    parts: int
    parts_sampled: int
    parts_reused: int
    samples_sampled: int
    seconds: float
    samples_per_sec: float = Field(description="newly drawn samples per second of wall time, actors included")
    nfe: int = Field(description="model evaluations per batch of the last part drawn (0 when all were reused)")
    workers: int
    checkpoint: str
    model: str
    weights: str
    label_counts: list[int]


# ---------------------------------------------------------------------------------------------------
# One unit of work: an index range (runs in a Ray actor)
# ---------------------------------------------------------------------------------------------------

class SampleWorker:
    """Holds a SiT or DiT, its sampler and the ReaLS VAE; draws whole index ranges into part files."""

    def __init__(self, spec: dict):
        self.spec = spec
        self.device = torch_device(spec["device"])
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        ckpt = load_recognised(spec["ckpt"], spec["model"]).checkpoint
        self.model = load_model(ckpt, spec["model"], spec["model_kwargs"], spec["use_ema"], self.device)
        del ckpt
        self.vae = ReaLSVAE.from_pretrained(spec["vae_path"]).to(self.device).eval()
        self.sampler = make_sampler(spec)
        self.guidance = (spec["cfg_scale"], None if spec["cfg_channels"] == "all" else int(spec["cfg_channels"]),
                         tuple(spec["guidance_interval"]) if spec["guidance_interval"] else None)

    def sample(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(uint8 NHWC images, labels, normalised latents) of the samples ``indices`` (one batch)."""
        s = self.spec
        y = sample_labels(s["labels"], s["num_classes"], s["global_seed"], indices)
        gens = sample_generators(s["global_seed"], indices, NOISE_STREAM)
        images, z = sample_images(self.model, self.vae, self.sampler, y, gens, *self.guidance)
        return images, y.numpy(), z.float().cpu().numpy()

    def sample_range(self, unit: dict) -> dict:
        """Draw indices ``[start, end)`` in batches, write the part file, then its marker."""
        start, end, batch = unit["start"], unit["end"], self.spec["per_proc_batch_size"]
        t0 = time.perf_counter()
        out = [self.sample(np.arange(b, min(b + batch, end))) for b in range(start, end, batch)]
        arrays = {"arr_0": np.concatenate([o[0] for o in out]), "arr_1": np.concatenate([o[1] for o in out])}
        if self.spec["save_latents"]:
            arrays["latents"] = np.concatenate([o[2] for o in out])
        return write_part(self.spec["parts"], start, end, arrays, self.spec["run"], nfe=self.sampler.nfe,
                          seconds=round(time.perf_counter() - t0, 3))


# ---------------------------------------------------------------------------------------------------
# Stage
# ---------------------------------------------------------------------------------------------------

def _check_vae(vae, name: str, kw: dict, ckpt: dict, vae_path: str) -> None:
    """Refuse a VAE whose latents differ from the model's, or one other than the VAE the model learned."""
    side = vae.resolution // vae.downsample_factor
    model_shape = [kw["in_channels"], kw["input_size"], kw["input_size"]]
    vae_shape = [vae.latent_channels, side, side]
    if model_shape != vae_shape:
        raise StageError(f"{name} in the checkpoint takes latents {'x'.join(map(str, model_shape))}, the VAE "
                         f"{vae_path} makes {'x'.join(map(str, vae_shape))}")
    trained_on = (ckpt.get("store") or {}).get("vae_fingerprint")
    if trained_on and trained_on != vae.fingerprint:
        raise StageError(f"the model was trained on latents of VAE {trained_on}, but {vae_path} is VAE "
                         f"{vae.fingerprint}: pass the VAE the latent store was encoded with")


SAMPLE_KEYS = ("mode", "cfg_scale", "guidance_interval", "cfg_channels", "num_sampling_steps", "labels",
               "per_proc_batch_size", "global_seed", "use_ema", "save_latents")
METHOD_KEYS = {"ODE": ("sampling_method", "atol", "rtol"),
               "SDE": ("sampling_method", "diffusion_norm", "diffusion_form", "last_step", "last_step_size"),
               "DDPM": (), "DDIM": ("eta", "ddim_spacing")}
# Bumped when the meaning of a setting changes, so parts drawn under the old meaning are not reused.
# "sit": num_sampling_steps counts grid points and the SDE noise is SiT's sqrt(2 D dt); "dit": DDPM/DDIM
# timesteps are DiT's space_timesteps.
CONVENTIONS = {"ODE": "sit", "SDE": "sit", "DDPM": "dit", "DDIM": "dit"}


def sample_spec(config: SampleConfig, ckpt_url: str, ckpt: dict, name: str, kw: dict, vae_fp: str) -> dict:
    """Everything a worker needs, with ``run``: the fingerprint of every setting that changes the samples."""
    args = ckpt.get("args") if isinstance(ckpt.get("args"), dict) else {}
    fs, path = filesystem(ckpt_url)
    spec = {**config.model_dump(), "ckpt": ckpt_url, "model": name, "model_kwargs": kw,
            "num_classes": kw["num_classes"], "vae_path": str(config.vae_path), "vae_fingerprint": vae_fp,
            "path_type": config.path_type or args.get("path_type", "Linear"),
            "prediction": config.prediction or args.get("prediction", "velocity"),
            "diffusion_form": config.diffusion_form or sde_diffusion_form(ckpt),
            "ckpt_identity": [to_url(ckpt_url), str(fs.checksum(path))], "conventions": CONVENTIONS[config.mode],
            "parts": parts_url(config.output)}
    keys = SAMPLE_KEYS + METHOD_KEYS[config.mode] + ("model", "model_kwargs", "vae_fingerprint", "path_type",
                                                     "prediction", "ckpt_identity", "conventions")
    spec["run"] = fingerprint({k: spec[k] for k in keys})
    return spec


def run(config: SampleConfig) -> SampleSummary:
    """Draw ``num_fid_samples`` samples (skipping units already done), merge them, write a grid."""
    output = to_url(config.output)
    ckpt_url = resolve_checkpoint(config.ckpt)
    ckpt = load_recognised(ckpt_url, config.model).checkpoint
    name, kw = model_spec(ckpt, config.model, config.num_classes, ckpt_url)
    check_mode(config.mode, name)
    state, which = checkpoint_weights(ckpt, config.use_ema)
    check_weights_fit(name, kw, state)
    try:
        vae = ReaLSVAE.from_pretrained(config.vae_path)
    except ReaLSError as e:
        raise StageError(str(e)) from None
    _check_vae(vae, name, kw, ckpt, config.vae_path)
    if config.cfg_scale != 1.0 and not kw["class_dropout_prob"]:
        raise StageError("the model was trained without class dropout (no null class): use --cfg-scale 1")
    spec = sample_spec(config, ckpt_url, ckpt, name, kw, vae.fingerprint)
    make_sampler(spec)  # settings the sampler refuses fail here, before any worker starts
    parts = spec["parts"]
    del ckpt, state, vae

    n = config.num_fid_samples
    units = [{"start": s, "end": min(s + config.unit_size, n)} for s in range(0, n, config.unit_size)]
    todo = [u for u in units if not part_is_done(parts, u["start"], u["end"], spec["run"])]
    results: list[dict] = []
    workers = 0
    t0 = time.perf_counter()
    if todo:
        count = pool_size(config.workers, len(todo), one_per_gpu=True)
        gpu = ray_uses_gpu(config.device)
        with ActorPool(SampleWorker, (dict(spec, device="cuda" if gpu else "cpu"),), count, gpu) as pool:
            results = pool.map("sample_range", todo, f"sample {config.mode}", show_progress=config.show_progress)
            workers = len(pool.actors)
    seconds = time.perf_counter() - t0
    arrays = merge_parts(parts, units, config.save_latents)
    write_npz(output, lambda f: np.savez(f, **arrays))
    verify_merged(output, arrays)
    if not config.keep_parts:
        remove(parts)
    grid = output[: -len(".npz")] + ".png"
    shown = arrays["arr_0"][:GRID_SAMPLES]
    write_bytes_atomic(grid, image_grid(shown, math.ceil(math.sqrt(len(shown)))))
    drawn = sum(r["count"] for r in results)
    return SampleSummary(
        output=output, grid=grid, num_samples=n, image_shape=list(arrays["arr_0"].shape[1:]), parts=len(units),
        parts_sampled=len(results), parts_reused=len(units) - len(results), samples_sampled=drawn,
        seconds=round(seconds, 3), samples_per_sec=round(drawn / seconds, 3) if drawn else 0.0,
        nfe=results[-1]["nfe"] if results else 0, workers=workers, checkpoint=ckpt_url, model=name,
        weights=which, label_counts=np.bincount(arrays["arr_1"], minlength=kw["num_classes"]).tolist(),
    )


# ---------------------------------------------------------------------------------------------------
# Stage record
# ---------------------------------------------------------------------------------------------------

def missing_outputs(config: SampleConfig) -> str | None:
    """Whether the merged samples file holds ``num_fid_samples`` samples."""
    from pipelines.npz import npz_shape

    shape = npz_shape(config.output)
    if shape is None:
        return "no samples file"
    return None if shape[0] == config.num_fid_samples else f"{shape[0]} of {config.num_fid_samples} samples"


def progress(config: SampleConfig):
    """A function giving the fraction of parts whose marker is written."""
    total = math.ceil(config.num_fid_samples / config.unit_size)
    return lambda: len(list_files(parts_url(config.output), ".json")) / total


def show(s: SampleSummary) -> None:
    reused = f", {s.parts_reused} reused" if s.parts_reused else ""
    print(f"sample: {s.num_samples} samples of {'x'.join(map(str, s.image_shape))} from {s.model} ({s.weights} "
          f"weights) -> {s.output}")
    print(f"  {s.parts_sampled} of {s.parts} parts drawn by {s.workers} workers{reused}: {s.samples_sampled} "
          f"samples in {s.seconds:.1f} s ({s.samples_per_sec:.2f} samples/s, {s.nfe} NFE per batch)")
    print(f"  grid: {s.grid}")


def cards(summary: SampleSummary) -> list[Card]:
    """What was drawn, and the grid of the first samples."""
    return [table("sample-summary", [{
        "samples": summary.num_samples, "image shape": "x".join(map(str, summary.image_shape)),
        "model": summary.model, "weights": summary.weights, "parts drawn": summary.parts_sampled,
        "parts reused": summary.parts_reused, "samples/s": summary.samples_per_sec, "output": summary.output,
    }], "samples drawn"), image("sample-grid", summary.grid, f"the first samples of {summary.output}")]


def report(config: SampleConfig, save: Save) -> ReportPart | None:
    """A grid of the samples, one row per class."""
    from pipelines.npz import npz_head, npz_shape
    from pipelines.render import class_grid

    shape = npz_shape(config.output)
    if not shape:
        return None
    pool = npz_head(config.output, "arr_0", 2048)
    labels = npz_head(config.output, "arr_1", len(pool)) if npz_shape(config.output, "arr_1") else \
        np.zeros(len(pool), np.int64)
    name = save("samples_grid.png", class_grid(pool, labels, classes=10, per_class=8))
    return ReportPart(["## Samples", "", f"{shape[0]} samples of {'x'.join(map(str, shape[1:]))} in "
                       f"`{to_url(config.output)}`; one row per class:", "", f"![samples]({name})", ""])


STAGES = [Stage("sample", SampleConfig, SampleSummary, run, runs_on="ray", missing=missing_outputs, progress=progress,
                show=show, cards=cards, report=report, reads={"ckpt": "generator_run", "vae_path": "vae_dir"},
                writes={"output": (Output("samples", "samples/samples.npz"),
                                   Output("sample_latents", "samples/samples.npz", when="save_latents"))},
                chain=Chain("sample", "sampling", sets={"mode": "ODE"}),
                help="draw samples from a SiT or DiT checkpoint through the ReaLS VAE (ADM .npz + PNG grid)",
                description=__doc__.split("\n\n")[0],
                epilog="Time convention: SiT's t runs from 0 (noise) to 1 (data), DiT's timestep from 999 (noise) to "
                       "0; --guidance-interval LO HI is on the noise level tau = 1 - t (SiT) or t / 1000 (DiT), so "
                       "`--guidance-interval 0 0.75` guides all but the noisiest quarter.")]
