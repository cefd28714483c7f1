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

import io
import math
import posixpath
import time
import zipfile
from collections.abc import Callable
from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import BaseModel, Field, field_validator, model_validator

from pipelines import StageError
from pipelines.checkpoints import resolve_checkpoint
from pipelines.config import Cli, ShowProgress, StageConfig
from pipelines.stages.import_checkpoint import load_recognised, sde_diffusion_form
from pipelines.npz import write_npz
from pipelines.registry import Chain, Output, Stage
from pipelines.render import image_grid
from pipelines.sampling import NOISE_STREAM, decode_latents, guided_model, sample_generators, sample_labels
from reals import ReaLSError
from reals.diffusion import DDIMSampler, DDPMSampler, GaussianDiffusion
from reals.models import create_model, model_family
from reals.transport import ODESampler, SDESampler, create_transport, randn_per_sample
from reals.transport.sampling import SDE_METHODS
from reals.vae import ReaLSVAE
from storage.fs import filesystem, join, list_files, read_bytes, remove, to_url, write_bytes_atomic
from storage.markers import fingerprint, read_json, sha256_bytes, write_json
from pipelines.report_parts import Card, ReportPart, Save, image, table

GRID_SAMPLES = 64
FAMILY_MODES = {"SiT": ("ODE", "SDE"), "DiT": ("DDPM", "DDIM")}


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
# Models from checkpoints
# ---------------------------------------------------------------------------------------------------

def checkpoint_weights(ckpt: dict, use_ema: bool) -> tuple[dict, str]:
    """``(state_dict, which)`` from a training checkpoint (``ema`` or ``model``) or a bare SiT/DiT state_dict."""
    if isinstance(ckpt.get("model"), dict):
        if use_ema and isinstance(ckpt.get("ema"), dict):
            return ckpt["ema"], "ema"
        return ckpt["model"], "model"
    if "x_embedder.proj.weight" not in ckpt:
        raise StageError("the checkpoint holds neither a training state nor a SiT/DiT state_dict")
    return ckpt, "state_dict"


def model_spec(ckpt: dict, model: str | None = None, num_classes: int | None = None,
               ckpt_url: str | None = None) -> tuple[str, dict]:
    """``(model name, constructor keyword arguments)`` of a checkpoint: its recorded config, else inferred from
    shapes. A bare state dict whose file is named after one family ("DiT-XL-2-256x256.pt") is refused as the other."""
    args = ckpt.get("args") if isinstance(ckpt.get("args"), dict) else {}
    recorded = args.get("model")
    if model and recorded and model != recorded:
        raise StageError(f"--model {model} disagrees with the checkpoint, which holds a {recorded}")
    name = model or recorded
    if not name:
        raise StageError("the checkpoint does not name its model: pass --model (e.g. SiT-XL/2 or DiT-XL/2)")
    try:
        family = model_family(name)
    except ReaLSError as e:
        raise StageError(str(e)) from None
    named = posixpath.basename(ckpt_url or "").split("-", 1)[0]
    if not recorded and named in FAMILY_MODES and named != family:
        raise StageError(f"--model {name} is a {family}, but {posixpath.basename(ckpt_url)} is named as a {named} "
                         "checkpoint")
    if isinstance(ckpt.get("model_config"), dict):
        kw = {k: ckpt["model_config"][k] for k in ("input_size", "in_channels", "num_classes",
                                                    "class_dropout_prob", "learn_sigma")}
    else:
        state, _ = checkpoint_weights(ckpt, False)
        _, c, p, _ = state["x_embedder.proj.weight"].shape
        side = math.isqrt(state["pos_embed"].shape[1]) * p
        rows = state["y_embedder.embedding_table.weight"].shape[0]
        out = state["final_layer.linear.weight"].shape[0] // (p * p)
        has_null = num_classes is None or rows == num_classes + 1
        kw = {"input_size": side, "in_channels": c, "num_classes": rows - 1 if has_null else rows,
              "class_dropout_prob": 0.1 if has_null else 0.0, "learn_sigma": out == 2 * c}
    if num_classes is not None and num_classes != kw["num_classes"]:
        raise StageError(f"--num-classes {num_classes} disagrees with the checkpoint's {kw['num_classes']} classes")
    return name, kw


def check_mode(mode: str, name: str) -> None:
    """Refuse a sampler of the other family: SiT samples by ODE/SDE, DiT by DDPM/DDIM."""
    family = model_family(name)
    if mode not in FAMILY_MODES[family]:
        other = next(f for f, modes in FAMILY_MODES.items() if mode in modes)
        raise StageError(f"{mode} samples a {other}, but the checkpoint holds {name}, a {family}: sample it with "
                         f"{' or '.join(FAMILY_MODES[family])}")


def check_weights_fit(name: str, kw: dict, state: dict) -> None:
    """Refuse a state_dict whose tensors do not fit model ``name`` (checked on the meta device, no memory)."""
    try:
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in create_model(name, **kw).state_dict().items()}
    except ReaLSError as e:
        raise StageError(str(e)) from None
    missing = sorted(set(shapes) - set(state))
    unexpected = sorted(set(state) - set(shapes))
    wrong = [k for k in shapes if k in state and tuple(state[k].shape) != shapes[k]]
    if missing or unexpected or wrong:
        first = (missing + unexpected + wrong)[0]
        raise StageError(f"the checkpoint does not fit {name}: {len(missing)} missing, {len(unexpected)} unexpected, "
                         f"{len(wrong)} mis-shaped tensors (e.g. {first}); is --model right?")


def load_model(ckpt: dict, name: str, kw: dict, use_ema: bool, device) -> torch.nn.Module:
    """The SiT or DiT of a checkpoint (EMA weights when asked and present) in eval mode on ``device``."""
    model = create_model(name, **kw)
    model.load_state_dict(checkpoint_weights(ckpt, use_ema)[0])
    return model.to(device).eval()


def make_sampler(spec: dict):
    """The sampler of ``spec["mode"]`` with the spec's settings."""
    mode, steps = spec["mode"], spec["num_sampling_steps"]
    try:
        if mode == "ODE":
            return ODESampler(create_transport(spec["path_type"], spec["prediction"]), spec["sampling_method"], steps,
                              spec["atol"], spec["rtol"])
        if mode == "SDE":
            return SDESampler(create_transport(spec["path_type"], spec["prediction"]), steps, spec["diffusion_norm"],
                              spec["last_step_size"], spec["sampling_method"], spec["last_step"],
                              spec["diffusion_form"])
        if mode == "DDPM":
            return DDPMSampler(GaussianDiffusion(), steps)
        return DDIMSampler(GaussianDiffusion(), steps, spec["eta"], spec["ddim_spacing"])
    except ReaLSError as e:
        raise StageError(str(e)) from None


# ---------------------------------------------------------------------------------------------------
# One unit of work: an index range (runs in a Ray actor)
# ---------------------------------------------------------------------------------------------------

def parts_url(output: str) -> str:
    """The folder of a samples file's parts: ``<output>.parts``."""
    return to_url(output) + ".parts"


def part_url(parts: str, start: int, end: int, ext: str) -> str:
    return join(parts, f"{start:08d}-{end:08d}.{ext}")


def part_is_done(parts: str, start: int, end: int, run_fp: str) -> bool:
    """Whether the unit's marker exists, belongs to these settings and agrees with the part's bytes."""
    marker = read_json(part_url(parts, start, end, "json"))
    if not marker or marker.get("run") != run_fp or marker.get("count") != end - start:
        return False
    try:
        return sha256_bytes(read_bytes(part_url(parts, start, end, "npz"))) == marker.get("sha256")
    except FileNotFoundError:
        return False


class SampleWorker:
    """Holds a SiT or DiT, its sampler and the ReaLS VAE; draws whole index ranges into part files."""

    def __init__(self, spec: dict):
        self.spec = spec
        device = spec["device"]
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                   ("cpu" if device == "auto" else device))
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        ckpt = load_recognised(spec["ckpt"], spec["model"]).checkpoint
        self.model = load_model(ckpt, spec["model"], spec["model_kwargs"], spec["use_ema"], self.device)
        del ckpt
        self.vae = ReaLSVAE.from_pretrained(spec["vae_path"]).to(self.device).eval()
        self.sampler = make_sampler(spec)
        channels = None if spec["cfg_channels"] == "all" else int(spec["cfg_channels"])
        interval = tuple(spec["guidance_interval"]) if spec["guidance_interval"] else None
        self.fn = guided_model(self.model, spec["cfg_scale"], channels, interval)
        m = self.model
        self.latent_shape = (m.in_channels, m.input_size, m.input_size)

    @torch.no_grad()
    def sample(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(uint8 NHWC images, labels, normalised latents) of the samples ``indices`` (one batch)."""
        s = self.spec
        y = sample_labels(s["labels"], s["num_classes"], s["global_seed"], indices)
        gens = sample_generators(s["global_seed"], indices, NOISE_STREAM)
        x0 = randn_per_sample(gens, self.latent_shape, device=self.device)
        y = y.to(self.device)
        if s["mode"] in ("SDE", "DDPM", "DDIM"):
            z = self.sampler(x0, self.fn, generators=gens, y=y)
        else:
            z = self.sampler(x0, self.fn, y=y)
        return decode_latents(self.vae, z), y.cpu().numpy(), z.float().cpu().numpy()

    def sample_range(self, unit: dict) -> dict:
        """Draw indices ``[start, end)`` in batches, write the part file, then its marker."""
        start, end, parts = unit["start"], unit["end"], self.spec["parts"]
        t0 = time.perf_counter()
        out = [self.sample(np.arange(b, min(b + self.spec["per_proc_batch_size"], end)))
               for b in range(start, end, self.spec["per_proc_batch_size"])]
        arrays = {"arr_0": np.concatenate([o[0] for o in out]), "arr_1": np.concatenate([o[1] for o in out])}
        if self.spec["save_latents"]:
            arrays["latents"] = np.concatenate([o[2] for o in out])
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        data = buf.getvalue()
        write_bytes_atomic(part_url(parts, start, end, "npz"), data)
        marker = {"start": start, "end": end, "count": end - start, "run": self.spec["run"],
                  "sha256": sha256_bytes(data), "nfe": self.sampler.nfe,
                  "seconds": round(time.perf_counter() - t0, 3)}
        write_json(part_url(parts, start, end, "json"), marker)
        return marker


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


def _start_workers(spec: dict, n: int, device: str) -> tuple[list, Callable]:
    import ray

    from pipelines.parallel import ensure_ray

    ensure_ray()
    gpus = ray.cluster_resources().get("GPU", 0)
    if device == "cuda" and not gpus:
        raise StageError("--device cuda: the Ray cluster has no GPU")
    use_gpu = device == "cuda" or (device == "auto" and gpus)
    # A lost actor is replaced by map_actors (its unit re-submitted), not restarted by Ray.
    options = {"num_cpus": 1, "num_gpus": (min(1.0, gpus / n) if use_gpu else 0), "max_restarts": 0,
               "max_task_retries": 0}
    spec = dict(spec, device="cuda" if use_gpu else "cpu")
    cls = ray.remote(SampleWorker).options(**options)
    return [cls.remote(spec) for _ in range(n)], lambda: cls.remote(spec)


def _default_workers() -> int:
    import ray

    from pipelines.parallel import ensure_ray

    ensure_ray()
    res = ray.cluster_resources()
    return int(res.get("GPU", 0)) or max(1, int(res.get("CPU", 1)))


def merge_parts(parts: str, units: list[dict], save_latents: bool) -> dict[str, np.ndarray]:
    """The full arrays from every unit's part file, in index order."""
    arrays: dict[str, np.ndarray] = {}
    for u in units:
        with np.load(io.BytesIO(read_bytes(part_url(parts, u["start"], u["end"], "npz")))) as part:
            names = ["arr_0", "arr_1"] + (["latents"] if save_latents else [])
            for name in names:
                a = part[name]
                if name not in arrays:
                    arrays[name] = np.empty((units[-1]["end"], *a.shape[1:]), a.dtype)
                arrays[name][u["start"]:u["end"]] = a
    return arrays


def verify_merged(url: str, arrays: dict[str, np.ndarray]) -> None:
    """Read the merged ``.npz`` back from storage: every member's CRC holds and each array has its shape."""
    from reals.metrics.reference import array_shape

    fs, path = filesystem(url)
    with fs.open(path, "rb") as f:
        with zipfile.ZipFile(f) as z:
            bad = z.testzip()
            names = sorted(n.removesuffix(".npy") for n in z.namelist())
        if bad is not None or names != sorted(arrays):
            raise StageError(f"{url} did not read back whole ({f'member {bad} fails its CRC' if bad else names}); "
                             f"its parts are kept: re-run the same command")
        for name, a in arrays.items():
            if tuple(array_shape(f, name)) != a.shape:
                raise StageError(f"{url}: {name} reads back with another shape; its parts are kept: re-run")


def run(config: SampleConfig) -> SampleSummary:
    """Draw ``num_fid_samples`` samples (skipping units already done), merge them, write a grid."""
    import ray

    from pipelines.parallel import map_actors

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
    workers = []
    t0 = time.perf_counter()
    if todo:
        count = min(config.workers or _default_workers(), len(todo))
        try:
            workers, spawn = _start_workers(spec, count, config.device)
            results = map_actors(workers, "sample_range", todo, f"sample {config.mode}",
                                 show_progress=config.show_progress, spawn=spawn)
        finally:
            for w in workers:
                ray.kill(w)
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
        nfe=results[-1]["nfe"] if results else 0, workers=len(workers), checkpoint=ckpt_url, model=name,
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
