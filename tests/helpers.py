"""Builders shared by the tests: a converted tiny ReaLS VAE directory."""
from __future__ import annotations

import torch

TINY_TEACHER = {"name": "tiny-dinov2", "input_size": 28}


def make_vae_dir(path, seed: int = 0, resolution: int = 32) -> str:
    """A converted tiny ReaLS VAE dir: 4 x resolution/4 x resolution/4 latents, heads onto tiny-dinov2's 32-d tokens."""
    from reals.align import AlignNet
    from reals.vae import ReaLSVAE, build_vae

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = ReaLSVAE(build_vae("tiny"), AlignNet(4, 32, hidden_dim=16, num_layers=1),
                       torch.tensor([0.1, 0.0, -0.1, 0.2]), torch.tensor([1.0, 2.0, 0.5, 1.5]))
    vae.save_pretrained(path, {"teacher": TINY_TEACHER, "resolution": resolution, "run": f"test-{seed}"})
    return str(path)
