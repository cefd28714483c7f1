"""Benchmark a DiT training step beside SiT's at the paper's 256 px shapes (4x32x32 latents, 1000 classes).

For each size the same transformer is timed under both objectives: DiT's hybrid loss (ε MSE + VLB on the
learned variance) and SiT's flow-matching loss; ``dit_over_sit`` is the ratio of step times. ``full`` steps are
what ``Trainer.train_step`` does (loss, backward, clipping, AdamW, EMA); ``loss_backward`` leaves out the optimiser
and EMA (on CPU, XL/2's AdamW state would not fit beside the other jobs of a 24 GiB machine). CPU counts are tiny
(batch 2, 2 timed steps after a warm-up); with CUDA, bf16 autocast at per-GPU batches. Prints one JSON document.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from contextlib import nullcontext

import torch

from bench.train_sit import device_note

CPU_CASES = [{"size": "B/2", "batch": 2, "steps": 2, "kind": "full"},
             {"size": "XL/2", "batch": 2, "steps": 2, "kind": "loss_backward"}]
CUDA_CASES = [{"size": "B/2", "batch": 64, "steps": 20, "kind": "full"},
              {"size": "XL/2", "batch": 32, "steps": 20, "kind": "full"}]


def step_seconds(family: str, case: dict, device: torch.device) -> float:
    """Mean seconds of one training step of ``family``-``size`` after one warm-up step."""
    from reals.diffusion import GaussianDiffusion
    from reals.ema import update_ema
    from reals.models import create_model
    from reals.transport import create_transport

    torch.manual_seed(0)
    model = create_model(f"{family}-{case['size']}", input_size=32, in_channels=4, num_classes=1000).to(device)
    objective = GaussianDiffusion() if family == "DiT" else create_transport()
    full = case["kind"] == "full"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0) if full else None
    ema = copy.deepcopy(model).requires_grad_(False) if full else None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    x = torch.randn(case["batch"], 4, 32, 32, device=device)
    y = torch.randint(0, 1000, (case["batch"],), device=device)

    def step():
        with autocast:
            loss = objective.training_losses(model, x, {"y": y})["loss"].mean()
        model.zero_grad(set_to_none=True)
        loss.backward()
        if full:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            update_ema(ema, model, 0.9999)

    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(case["steps"]):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / case["steps"]


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = []
    for case in CUDA_CASES if device.type == "cuda" else CPU_CASES:
        dit, sit = step_seconds("DiT", case, device), step_seconds("SiT", case, device)
        results.append({**case, "latents": [4, 32, 32], "resolution": 256, "dit_step_s": round(dit, 4),
                        "sit_step_s": round(sit, 4), "dit_samples_per_s": round(case["batch"] / dit, 3),
                        "dit_over_sit": round(dit / sit, 3)})
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)  # each case as it ends
    print(json.dumps({"benchmark": "train_dit", **device_note(), "cases": results}, indent=2))


if __name__ == "__main__":
    main()
