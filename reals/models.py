"""One registry of the latent generators of both families: SiT (flow matching) and DiT (DDPM, learned Σ)."""
from __future__ import annotations

from reals import ReaLSError
from reals.dit import DiT_models
from reals.sit import SiT, SiT_models

MODELS = {**SiT_models, **DiT_models}


def model_family(name: str) -> str:
    """"SiT" or "DiT": the family of the registered model ``name``."""
    if name not in MODELS:
        raise ReaLSError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    return name.split("-", 1)[0]


def create_model(name: str, **kwargs) -> SiT:
    """Build the registered model ``name`` ("SiT-XL/2", "DiT-B/4", ...) with constructor ``kwargs``."""
    model_family(name)
    return MODELS[name](**kwargs)
