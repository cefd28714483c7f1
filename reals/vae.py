"""ReaLS VAE: a diffusers ``AutoencoderKL`` whose latents are aligned to a teacher by ``AlignNet`` heads.

A converted ReaLS VAE directory holds what plain ``diffusers.AutoencoderKL.from_pretrained(dir)`` loads
(``config.json`` + ``diffusion_pytorch_model.safetensors``), plus ``align_net.safetensors`` and
``align_net.json`` (the alignment heads; absent for a stock VAE such as SD-VAE, whose directory then serves
latents only), ``mean_std.json`` (the channel statistics ``latents_mean`` and ``latents_std``) and
``provenance.json`` (teacher, training run, code version, the files' sizes and hashes).

``config.json`` states the same normalisation in diffusers' terms: ``latents_mean``/``latents_std`` with
``scaling_factor`` 1 (diffusers' pipelines compute ``(z - latents_mean) * scaling_factor / latents_std``), or,
for statistics of the DiT kind (mean 0, one std ``1 / s`` for every channel), ``scaling_factor`` s alone.

Latent normalisation (what the diffusion model sees), channel-wise with ``latents_mean``/``latents_std`` of
shape [C] (not to be confused with the posterior's own mean and std, which vary per image)::

    z_norm = (z - latents_mean) / latents_std          z = z_norm * latents_std + latents_mean

where ``z`` is the un-normalised VAE latent (posterior mean or sample), ``latents_mean_c = E[z_c]`` and
``latents_std_c = sqrt(E[(z_c - latents_mean_c)^2])`` over all training images and latent positions.
"""
from __future__ import annotations

import hashlib
import json
import pickle
from functools import cached_property
from pathlib import Path

import torch
from torch import nn

from reals import ReaLSError

MEAN_STD_FILE = "mean_std.json"
PROVENANCE_FILE = "provenance.json"
# The channel statistics' keys in mean_std.json and in a latent store's attrs, and in older stores' attrs (where
# they share their names with the rows' posterior moments ``mean``/``std``).
CHANNEL_STATISTICS = ("latents_mean", "latents_std")
FORMER_CHANNEL_STATISTICS = ("mean", "std")


def read_channel_statistics(record: dict) -> tuple[list[float], list[float]]:
    """``(latents_mean, latents_std)`` from ``mean_std.json`` or a latent store's attrs (older ones: mean/std)."""
    keys = CHANNEL_STATISTICS if CHANNEL_STATISTICS[0] in record else FORMER_CHANNEL_STATISTICS
    return record[keys[0]], record[keys[1]]


def _sha256_file(f: Path) -> str:
    with open(f, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def file_records(path: Path) -> dict[str, dict]:
    """``{name: {"bytes", "sha256"}}`` of the files in a directory (``provenance.json`` excepted)."""
    files = sorted(p for p in Path(path).iterdir() if p.is_file() and p.name != PROVENANCE_FILE)
    return {f.name: {"bytes": f.stat().st_size, "sha256": _sha256_file(f)} for f in files}


def damaged_files(path: Path, records: dict[str, dict], hashes: bool = True) -> list[str]:
    """Recorded files that are missing or differ in size (and, with ``hashes``, in sha256) from the record."""
    problems = []
    for name, want in records.items():
        f = Path(path) / name
        if not f.is_file():
            problems.append(f"{name} is missing")
        elif f.stat().st_size != want["bytes"]:
            problems.append(f"{name} is {f.stat().st_size} bytes, {want['bytes']} were written")
        elif hashes and _sha256_file(f) != want["sha256"]:
            problems.append(f"{name} differs from the sha256 written with it")
    return problems


#################################################################################
#                               AutoencoderKL Configs                           #
#################################################################################

def _autoencoder_kl(block_out_channels: tuple[int, ...], layers_per_block: int, latent_channels: int,
                    norm_num_groups: int, sample_size: int) -> dict:
    """Keyword arguments of a diffusers ``AutoencoderKL`` with one down/up block per width."""
    n = len(block_out_channels)
    return dict(
        in_channels=3, out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
        block_out_channels=list(block_out_channels), layers_per_block=layers_per_block, act_fn="silu",
        latent_channels=latent_channels, norm_num_groups=norm_num_groups, sample_size=sample_size,
    )


def SD_f8c4() -> dict:
    """Stable Diffusion's VAE (kl-f8): 4 x 32 x 32 latents at 256 px, ~84M parameters."""
    return _autoencoder_kl((128, 256, 512, 512), 2, 4, 32, 256)


def Demo_f4c4() -> dict:
    """A small f4 VAE for 2-CPU demos: 4 x 8 x 8 latents at 32 px."""
    return _autoencoder_kl((32, 64, 64), 1, 4, 16, 32)


def Tiny_f4c4() -> dict:
    """The smallest working f4 VAE (tests): 4 x 8 x 8 latents at 32 px."""
    return _autoencoder_kl((8, 16, 16), 1, 4, 4, 32)


VAE_CONFIGS = {"sd-f8c4": SD_f8c4, "demo": Demo_f4c4, "tiny": Tiny_f4c4}


def vae_config(config: str | dict) -> dict:
    """``AutoencoderKL`` kwargs for a registry name, or a dict of kwargs (block types filled in when absent)."""
    if isinstance(config, str):
        if config not in VAE_CONFIGS:
            raise ReaLSError(f"unknown VAE config {config!r}; choose one of {', '.join(VAE_CONFIGS)}")
        return VAE_CONFIGS[config]()
    cfg = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    n = len(cfg.get("block_out_channels", (64,)))
    cfg.setdefault("down_block_types", ["DownEncoderBlock2D"] * n)
    cfg.setdefault("up_block_types", ["UpDecoderBlock2D"] * n)
    return cfg


def load_weights(path: str | Path):
    """``torch.load(path, weights_only=True)`` on the CPU; a file that is not plain weights (a pickle that would
    run code, or no pickle at all) is refused in one line."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        reason = next((ln for ln in lines if "GLOBAL" in ln), lines[-1] if lines else type(e).__name__)
        raise ReaLSError(f"refusing {path}: not a plain weights file ({reason.rstrip('.')})") from None


def load_state_dict_file(path: str | Path) -> dict:
    """A state_dict from ``.safetensors`` or a torch file (``weights_only``); a wrapping dict is unwrapped."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = load_weights(path)
    for key in ("state_dict", "vae"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state


LDM_PREFIXES = ("", "first_stage_model.", "vae.")  # a bare VAE file, a full Stable Diffusion checkpoint


def is_ldm_layout(state: dict) -> bool:
    """Whether a state dict is in the original LDM/CompVis layout (``encoder.down.0.block.0...``), as the
    single-file SD-VAE weights (``vae-ft-mse-840000-ema-pruned.safetensors`` / ``.ckpt``) are."""
    return any(k.startswith(f"{p}encoder.down.") for k in state for p in LDM_PREFIXES)


def build_vae(config: str | dict = "sd-f8c4", ckpt: str | Path | None = None):
    """An ``AutoencoderKL``: from a diffusers directory, a state_dict file, or from scratch (``config``).

    A diffusers directory brings its own config; a state_dict must fit ``config`` exactly. A state dict in the
    LDM layout is converted by diffusers' single-file utilities against ``config`` (local, nothing downloaded).
    """
    from diffusers import AutoencoderKL

    if ckpt is not None and Path(ckpt).is_dir():
        if not (Path(ckpt) / "config.json").is_file():
            raise ReaLSError(f"VAE checkpoint dir {ckpt} has no config.json (not a diffusers AutoencoderKL dir)")
        return AutoencoderKL.from_pretrained(str(ckpt), low_cpu_mem_usage=False)
    vae = AutoencoderKL(**vae_config(config))
    if ckpt is not None:
        if not Path(ckpt).is_file():
            raise ReaLSError(f"VAE checkpoint not found: {ckpt}")
        name = config if isinstance(config, str) else "dict"
        state = load_state_dict_file(ckpt)
        if is_ldm_layout(state):
            from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

            state = convert_ldm_vae_checkpoint(state, vae_config(config))
        try:
            result = vae.load_state_dict(state, strict=False)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[-1].strip()
            raise ReaLSError(f"VAE checkpoint {ckpt} does not fit config {name}: {first}") from None
        if result.missing_keys or result.unexpected_keys:
            bad = (result.missing_keys + result.unexpected_keys)[:3]
            raise ReaLSError(f"VAE checkpoint {ckpt} does not fit config {name}: {len(result.missing_keys)} "
                             f"missing, {len(result.unexpected_keys)} unexpected keys (e.g. {', '.join(bad)})")
    return vae


def downsample_factor(vae) -> int:
    """Image side / latent side of an ``AutoencoderKL``."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


#################################################################################
#                                   ReaLS VAE                                   #
#################################################################################

def weights_fingerprint(modules: dict[str, nn.Module], latents_mean: torch.Tensor, latents_std: torch.Tensor) -> str:
    """sha256 (16 hex) over every tensor's name, dtype, shape and bytes, plus the channel statistics (hashed
    under their first names, ``mean`` and ``std``, so that fingerprints of existing VAEs stay the same)."""
    h = hashlib.sha256()
    for prefix, module in sorted(modules.items()):
        for name, t in sorted(module.state_dict().items()):
            t = t.detach().cpu().contiguous()
            h.update(f"{prefix}.{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    h.update(json.dumps({"mean": latents_mean.tolist(), "std": latents_std.tolist()}).encode())
    return h.hexdigest()[:16]


class ReaLSVAE(nn.Module):
    """AutoencoderKL + alignment heads + channel statistics (``z_norm = (z - latents_mean) / latents_std``).

    ``forward`` is the training path (encode, sample, decode, heads); the other methods serve inference.
    """

    def __init__(self, vae, align_net: nn.Module | None, latents_mean: torch.Tensor | None = None,
                 latents_std: torch.Tensor | None = None, provenance: dict | None = None):
        super().__init__()
        self.vae = vae
        self.align_net = align_net
        c = vae.config.latent_channels
        mean = torch.zeros(c) if latents_mean is None else torch.as_tensor(latents_mean, dtype=torch.float32)
        std = torch.ones(c) if latents_std is None else torch.as_tensor(latents_std, dtype=torch.float32)
        if mean.shape != (c,) or std.shape != (c,):
            raise ReaLSError(f"latents_mean/latents_std must have {c} channels, got {tuple(mean.shape)} / "
                             f"{tuple(std.shape)}")
        if not bool((std > 0).all()):
            raise ReaLSError(f"latents_std must be positive, got {std.tolist()}")
        self.register_buffer("latents_mean", mean)
        self.register_buffer("latents_std", std)
        self.provenance = dict(provenance or {})

    # -- loading and saving ---------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ReaLSVAE:
        """Load a converted VAE directory (local); the alignment heads are loaded when present."""
        from diffusers import AutoencoderKL

        from reals.align import AlignNet

        path = Path(path)
        missing = [f for f in ("config.json", MEAN_STD_FILE) if not (path / f).is_file()]
        if missing:
            raise ReaLSError(f"{path} is not a VAE directory of this pipeline (missing {', '.join(missing)}); make "
                             "one with `reals convert` (`--from-diffusers DIR` for a diffusers AutoencoderKL directory)")
        provenance_file = path / PROVENANCE_FILE
        provenance = json.loads(provenance_file.read_text()) if provenance_file.is_file() else {}
        weights = {k: v for k, v in provenance.get("files", {}).items() if k.endswith(".safetensors")}
        damaged = damaged_files(path, weights, hashes=False)
        if damaged:
            raise ReaLSError(f"ReaLS VAE dir {path} is damaged ({damaged[0]}); re-run `reals convert`")
        try:
            mean, std = read_channel_statistics(json.loads((path / MEAN_STD_FILE).read_text()))
            heads = AlignNet.from_pretrained(path) if (path / AlignNet.config_name).is_file() else None
            model = cls(AutoencoderKL.from_pretrained(str(path), low_cpu_mem_usage=False), heads, mean, std,
                        provenance)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise ReaLSError(f"cannot load the ReaLS VAE dir {path}: {type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}; re-run `reals convert`") from e
        return model.eval()

    def save_pretrained(self, path: str | Path, provenance: dict | None = None) -> None:
        """Write the directory ``from_pretrained`` reads; ``provenance.json`` last (it marks the dir done)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.vae.register_to_config(**self.diffusers_normalisation())
        self.vae.save_pretrained(str(path), safe_serialization=True)
        if self.align_net is not None:
            self.align_net.save_pretrained(path)
        stats = {"latents_mean": self.latents_mean.tolist(), "latents_std": self.latents_std.tolist(),
                 "formula": "z_norm = (z - latents_mean) / latents_std, channel-wise"}
        (path / MEAN_STD_FILE).write_text(json.dumps(stats, indent=2) + "\n")
        if provenance is not None:
            self.provenance = dict(provenance)
        self.provenance["files"] = file_records(path)
        (path / PROVENANCE_FILE).write_text(json.dumps(self.provenance, indent=2, sort_keys=True, default=str) + "\n")

    def diffusers_normalisation(self) -> dict:
        """``config.json`` fields under which diffusers' ``(z - latents_mean) * scaling_factor / latents_std``
        equals ours: a single scaling factor where the statistics are of that kind."""
        mean, std = self.latents_mean, self.latents_std
        if not bool(mean.any()) and bool((std == std[0]).all()):
            return {"scaling_factor": float(1 / std[0]), "latents_mean": None, "latents_std": None}
        return {"scaling_factor": 1.0, "latents_mean": mean.tolist(), "latents_std": std.tolist()}

    @property
    def has_heads(self) -> bool:
        return self.align_net is not None

    def require_heads(self, what: str) -> None:
        """Refuse ``what`` (a stage or use) by name when this VAE has no alignment heads."""
        if self.align_net is None:
            raise ReaLSError(f"{what} needs the VAE's alignment heads (align_net.json), but this VAE has none "
                             "(a stock diffusers VAE gives latents only)")

    @cached_property
    def fingerprint(self) -> str:
        """Stable hash of the VAE and head weights and the latent statistics (computed once)."""
        modules = {"vae": self.vae} | ({"align_net": self.align_net} if self.align_net is not None else {})
        return weights_fingerprint(modules, self.latents_mean, self.latents_std)

    # -- shape facts ----------------------------------------------------------------------------------

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    @property
    def downsample_factor(self) -> int:
        return downsample_factor(self.vae)

    @property
    def resolution(self) -> int:
        """Training image side in pixels (provenance, else the VAE's ``sample_size``)."""
        return int(self.provenance.get("resolution") or self.vae.config.sample_size)

    # -- inference ------------------------------------------------------------------------------------

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images in [-1, 1] -> (posterior mean, posterior std), un-normalised."""
        posterior = self.vae.encode(images).latent_dist
        return posterior.mean, posterior.std

    def _stat(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return t.to(device=z.device, dtype=z.dtype).view(1, -1, 1, 1)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """z_norm = (z - latents_mean) / latents_std, channel-wise."""
        return (z - self._stat(self.latents_mean, z)) / self._stat(self.latents_std, z)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """z = z_norm * latents_std + latents_mean, channel-wise."""
        return z * self._stat(self.latents_std, z) + self._stat(self.latents_mean, z)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Un-normalised latents -> images in [-1, 1] (not clamped)."""
        return self.vae.decode(z).sample

    def semantic_features(self, z_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised latents -> the heads' teacher-space (patch [B, D, h, w], global [B, D])."""
        self.require_heads("semantic features")
        return self.align_net(self.denormalize(z_norm))

    # -- training -------------------------------------------------------------------------------------

    def forward(self, images: torch.Tensor, sample_posterior: bool = True, detach_heads: bool = False) -> dict:
        """Training pass: images in [-1, 1] -> reconstruction, posterior (mean, logvar), latent, head outputs.

        ``detach_heads`` trains the heads as a probe on frozen latents (the unaligned baseline).
        """
        posterior = self.vae.encode(images).latent_dist
        z = posterior.sample() if sample_posterior else posterior.mean
        rec = self.vae.decode(z).sample
        patch, global_ = self.align_net(z.detach() if detach_heads else z)
        return {"rec": rec, "mean": posterior.mean, "logvar": posterior.logvar, "z": z,
                "patch": patch, "global": global_}
