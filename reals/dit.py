"""DiT: diffusion transformers (Peebles & Xie) over latents, the ε-prediction DDPM family beside SiT.

The network is SiT's (``reals.sit``: the same blocks, adaLN-Zero, embeddings and state-dict layout, so the official
``DiT-XL-2-256x256.pt`` loads as is) with learned variance: it returns ``2C`` channels, the noise ε in the first
``C`` and the variance interpolation values v in [-1, 1] in the last ``C`` (see ``reals.diffusion``). Time is the
DDPM timestep ``t`` in [0, T) (T = 1000), embedded as is, as DiT does.

The weights alone do not tell DiT from a learned-sigma SiT: a run's checkpoint names its model (``args.model``);
a bare state dict is recognised as this layout by ``architecture_of`` and named by the caller (``dit_name``).
"""
from __future__ import annotations

from functools import partial

from reals import ReaLSError
from reals.sit import ARCHITECTURES, SiT, architecture_of


class DiT(SiT):
    """Class-conditional diffusion transformer predicting ε and the learned-range variance values."""

    family = "DiT"
    returns_sigma = True
    config_name = "dit.json"
    weights_name = "dit.safetensors"

    def __init__(self, learn_sigma: bool = True, **kwargs):
        super().__init__(learn_sigma=learn_sigma, **kwargs)


DiT_models = {f"DiT-{arch}": partial(DiT, **kw) for arch, kw in ARCHITECTURES.items()}


def create_dit(name: str, **kwargs) -> DiT:
    """Build the registered DiT ``name`` (e.g. "DiT-XL/2") with constructor ``kwargs``."""
    if name not in DiT_models:
        raise ReaLSError(f"unknown DiT model {name!r}; choose one of: {', '.join(DiT_models)}")
    return DiT_models[name](**kwargs)


def dit_name(state: dict) -> str | None:
    """The registered DiT name ("DiT-XL/2") of a DiT/SiT-layout state dict with learned variance, else None."""
    arch = architecture_of(state)
    if arch is None:
        return None
    c = state["x_embedder.proj.weight"].shape[1]
    p = ARCHITECTURES[arch]["patch_size"]
    return f"DiT-{arch}" if state["final_layer.linear.weight"].shape[0] == 2 * c * p * p else None
