"""reals train-dit: a tiny DiT learns a two-mode latent distribution and samples both modes; family refusals."""
from __future__ import annotations

import numpy as np
import torch

from pipelines.checkpoints import load_checkpoint, read_log
from pipelines.cli import main
from pipelines.generator_checkpoint import load_model, model_spec
from pipelines.stages.train_sit import TrainDiTConfig, run
from reals.diffusion import DDPMSampler, GaussianDiffusion
from test_train_sit import K, make_store

MODE = 1.5  # the two modes: every latent value +1.5, or every value -1.5
SHAPE = (4, 2, 2)  # one 2x2 patch of 4 channels: a single DiT-T/2 token


def two_mode_latents(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Half the rows at +MODE, half at -MODE; labels independent of the mode."""
    sign = np.where(np.arange(n) % 2 == 0, 1.0, -1.0)[:, None, None, None]
    latents = np.broadcast_to(MODE * sign, (n, *SHAPE))
    return latents.astype(np.float32), np.random.default_rng(seed).integers(0, K, n)


def test_tiny_dit_learns_two_modes_and_samples_both(tmp_path):
    store = make_store(str(tmp_path / "store"), *two_mode_latents(64), std=0.0)
    summary = run(TrainDiTConfig(data_path=store, output=str(tmp_path / "run"), model="DiT-T/2",
                                 global_batch_size=64, max_steps=600, lr=5e-4, ema_decay=0.95, log_every=50,
                                 ckpt_every=1000, sample_every=0, show_progress=False))
    assert (summary.family, summary.steps) == ("DiT", 600)
    losses = [e["loss"] for e in read_log(str(tmp_path / "run" / "log.jsonl"))]
    assert losses[-1] < 0.5 * losses[0], losses

    ckpt = load_checkpoint(summary.checkpoint)
    assert ckpt["args"]["model"] == "DiT-T/2" and ckpt["model_config"]["learn_sigma"] is True
    name, kw = model_spec(ckpt)
    model = load_model(ckpt, name, kw, use_ema=True, device="cpu")
    x_T = torch.randn(64, *SHAPE, generator=torch.Generator().manual_seed(0))
    z = DDPMSampler(GaussianDiffusion(), num_steps=50)(x_T, model, y=torch.arange(64) % K)
    means = z.mean(dim=(1, 2, 3))
    near = (means.abs() - MODE).abs() < 0.5
    assert near.float().mean() > 0.6, means  # ε-prediction needs more steps than SiT to reach all of them
    upper = (means > 0).float().mean().item()
    assert 0.2 < upper < 0.8, means  # both modes, neither collapsed


def test_each_command_trains_its_own_family(tmp_path, capsys):
    store = make_store(str(tmp_path / "store"), *two_mode_latents(16), std=0.0)
    common = ["--data-path", store, "--global-batch-size", "8", "--max-steps", "1", "--no-progress"]
    assert main(["train-dit", "--output", str(tmp_path / "a"), "--model", "SiT-T/2", *common]) == 2
    assert "SiT-T/2 is a SiT: train it with reals train-sit" in capsys.readouterr().err
    assert main(["train-sit", "--output", str(tmp_path / "b"), "--model", "DiT-T/2", *common]) == 2
    assert "DiT-T/2 is a DiT: train it with reals train-dit" in capsys.readouterr().err
    assert main(["train-dit", "--output", str(tmp_path / "c"), "--model", "DiT-T/2", *common]) == 0
    assert "train-dit: DiT-T/2" in capsys.readouterr().out
