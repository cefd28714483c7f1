"""The docs' examples for other projects (docs/how-to/latent-dataset.md) run as written and agree with the
pipeline's own encoding."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

PAGE = Path(__file__).resolve().parents[1] / "docs" / "how-to" / "latent-dataset.md"


def page_block(containing: str) -> str:
    """The page's fenced python block that contains ``containing``."""
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)
    found = [b for b in blocks if containing in b]
    assert len(found) == 1, f"expected one python block with {containing!r} in {PAGE.name}, found {len(found)}"
    return found[0]


def test_plain_torch_example_reproduces_latents_and_semantic_features(tiny_vae_dir):
    from helpers import TINY_TEACHER
    from pipelines.encoding import encode_images
    from reals.teachers import build_teacher
    from reals.vae import ReaLSVAE

    code = page_block("align_net.safetensors")
    assert '"runs/demo/vae-dir"' in code
    pixels = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255 * 2 - 1
    scope = {"images": images}
    exec(compile(code.replace('"runs/demo/vae-dir"', repr(tiny_vae_dir)), str(PAGE), "exec"), scope)

    vae = ReaLSVAE.from_pretrained(tiny_vae_dir)
    teacher = build_teacher(TINY_TEACHER["name"], input_size=TINY_TEACHER["input_size"])
    rows = encode_images(vae, teacher, pixels, flip=False, teacher_patch=False)  # what `reals encode` stores
    stored = torch.from_numpy(rows["mean"]).float()
    assert scope["z_norm"].shape == stored.shape == (3, 4, 8, 8)
    assert torch.allclose(scope["z_norm"], stored, rtol=1e-3, atol=1e-3)  # float16 in the store
    with torch.no_grad():
        z_norm = vae.normalize(vae.encode(images)[0])
        patch, cls = vae.semantic_features(z_norm)
    assert torch.allclose(scope["z_norm"], z_norm, atol=1e-6)
    assert scope["patch"].shape == patch.shape == (3, 32, 8, 8) and scope["cls"].shape == cls.shape == (3, 32)
    assert torch.allclose(scope["patch"], patch, atol=1e-5) and torch.allclose(scope["cls"], cls, atol=1e-5)


def test_latent_dataset_example_runs_on_a_store(tiny_store, tiny_vae_dir):
    from reals.vae import ReaLSVAE
    from storage.latent_store import LatentStore

    code = page_block("LatentDataset(")
    assert '"s3://bucket/run/latents"' in code
    scope: dict = {}
    exec(compile(code.replace('"s3://bucket/run/latents"', repr(tiny_store.url)), str(PAGE), "exec"), scope)
    store = LatentStore.open(tiny_store.url)
    assert len(scope["data"]) == int(store.done_rows().sum()) > 0
    z, y = scope["z"], scope["y"]
    assert z.shape[1:] == store.latent_shape and z.dtype == torch.float32 and y.dtype == torch.int64
    assert scope["data"].attrs["latents_std"] == ReaLSVAE.from_pretrained(tiny_vae_dir).latents_std.tolist()
