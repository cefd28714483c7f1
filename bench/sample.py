"""Benchmark `reals sample`: samples/s against the bare model forward (the limit), and FD_effnet against NFE.

Timings use the demo's sampler (ODE Heun, 50 steps, CFG 1.8 on the interval [0, 0.75], batch 32):
- ``model_forward_limit``: samples/s if only the SiT forward passes (CFG-doubled where guided) took time,
  measured inside an in-process sampling run;
- ``in_process``: one ``SampleWorker`` drawing batches (sampler, guidance, VAE decode), no Ray;
- ``stage``: ``reals sample`` end to end on Ray actors, by wall time (actor start-up included) and by the
  time the actors spent drawing.
With a demo run (``--demo``, default runs/demo: ``sit/`` checkpoints, ``vae-reals/``, ``reference/val.npz``)
also FD_effnet (Frechet distance in EfficientNet-Lite0 space, not FID) of the demo model against NFE for
Euler, Heun, dopri5 and the SDE. Without one, a random SiT-T/2 and demo VAE give the timings only.
Prints one JSON document.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np
import torch

TIMING = dict(mode="ODE", sampling_method="heun", num_sampling_steps=50, cfg_scale=1.8, guidance_interval=(0.0, 0.75),
              per_proc_batch_size=32, labels="balanced")
SWEEP = [("ODE", "euler", [4, 8, 16, 32, 64]), ("ODE", "heun", [2, 4, 8, 16, 32]),
         ("ODE", "dopri5", [1e-1, 1e-2, 1e-3]), ("SDE", None, [8, 16, 32, 64, 128])]


def device_note() -> dict:
    if torch.cuda.is_available():
        return {"device": torch.cuda.get_device_name(0), "cuda": torch.version.cuda}
    return {"device": f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})",
            "torch_threads": torch.get_num_threads()}


def random_setup(root: str) -> dict:
    """A random SiT-T/2 state_dict and a random demo ReaLS VAE (4x8x8 latents at 32 px): timings only."""
    from reals.align import AlignNet
    from reals.sit import create_sit
    from reals.vae import ReaLSVAE, build_vae

    torch.manual_seed(0)
    ReaLSVAE(build_vae("demo"), AlignNet(4, 8, 8, 1), provenance={"resolution": 32}).save_pretrained(f"{root}/vae")
    torch.save(create_sit("SiT-T/2", input_size=8, in_channels=4, num_classes=10).state_dict(), f"{root}/sit.pt")
    return {"ckpt": f"{root}/sit.pt", "vae": f"{root}/vae", "model": "SiT-T/2", "reference": None}


def demo_setup(demo: str) -> dict | None:
    """The demo run's checkpoint, VAE dir and reference batch, or None when it has not been run."""
    from pipelines import StageError
    from pipelines.checkpoints import resolve_checkpoint

    vae, reference = os.path.join(demo, "vae-reals"), os.path.join(demo, "reference", "val.npz")
    try:
        ckpt = resolve_checkpoint(os.path.join(demo, "sit"))
    except StageError:
        return None
    if not (os.path.isdir(vae) and os.path.isfile(reference)):
        return None
    return {"ckpt": ckpt, "vae": vae, "model": None, "reference": reference}


def make_worker(setup: dict, output: str, **settings):
    """An in-process SampleWorker for ``settings`` (SampleConfig fields)."""
    from pipelines.checkpoints import load_checkpoint
    from pipelines.generator_checkpoint import model_spec
    from pipelines.stages.sample import SampleConfig, SampleWorker, sample_spec

    config = SampleConfig(ckpt=setup["ckpt"], vae_path=setup["vae"], output=output, model=setup["model"], **settings)
    ckpt = load_checkpoint(setup["ckpt"])
    name, kw = model_spec(ckpt, setup["model"])
    return SampleWorker({**sample_spec(config, setup["ckpt"], ckpt, name, kw, "bench"), "device": "auto"}), kw


class Timed(torch.nn.Module):
    """A model wrapper adding up the seconds spent in forward passes."""

    def __init__(self, model):
        super().__init__()
        self.model, self.num_classes, self.seconds = model, model.num_classes, 0.0
        # what sample_images and guided_model read
        self.family, self.in_channels, self.input_size = model.family, model.in_channels, model.input_size

    def forward(self, x, t, y):
        start = time.perf_counter()
        out = self.model(x, t, y)
        if out.is_cuda:
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - start
        return out


def timings(setup: dict, root: str, batches: int, stage_samples: int, workers: int) -> dict:
    """Samples/s: forward-only limit, in-process worker, and the stage on Ray."""
    from pipelines.stages.sample import SampleConfig
    from pipelines.stages.sample import run as sample

    worker, _ = make_worker(setup, f"{root}/t.npz", **TIMING)
    timed = worker.model = Timed(worker.model)
    b = TIMING["per_proc_batch_size"]
    worker.sample(np.arange(b))  # warm-up
    timed.seconds = 0.0
    start = time.perf_counter()
    for i in range(1, batches + 1):
        worker.sample(np.arange(i * b, (i + 1) * b))
    total = time.perf_counter() - start
    n = batches * b
    summary = sample(SampleConfig(ckpt=setup["ckpt"], vae_path=setup["vae"], model=setup["model"],
                                  output=f"{root}/stage.npz", num_fid_samples=stage_samples, unit_size=2 * b,
                                  workers=workers, show_progress=False, **TIMING))
    drawing = [json.load(open(f"{root}/stage.npz.parts/{p}")) for p in sorted(os.listdir(f"{root}/stage.npz.parts"))
               if p.endswith(".json")]
    busy = sum(m["seconds"] for m in drawing) / summary.workers
    return {
        "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in TIMING.items()},
        "nfe_per_batch": worker.sampler.nfe,
        "samples_per_sec": {
            "model_forward_limit": round(n / timed.seconds, 2),
            "in_process": round(n / total, 2),
            "stage_wall": summary.samples_per_sec,
            "stage_drawing": round(stage_samples / busy, 2),
        },
        "forward_share_in_process": round(timed.seconds / total, 3),
        "stage": {"samples": stage_samples, "workers": summary.workers, "parts": summary.parts,
                  "seconds": summary.seconds},
    }


def fd_sweep(setup: dict, root: str, samples: int) -> list[dict]:
    """FD_effnet against NFE for every sampler in ``SWEEP``, on ``samples`` class-balanced samples."""
    from reals.metrics.features import effnet_features
    from reals.metrics.frechet import activation_statistics, frechet_distance
    from reals.metrics.reference import iter_images

    extractor = effnet_features("cuda" if torch.cuda.is_available() else "cpu")
    ref = np.concatenate([extractor(x)["global"] for x in iter_images(setup["reference"], 64)])
    mu_r, sigma_r = activation_statistics(ref)
    rows = []
    for mode, method, values in SWEEP:
        for v in values:
            settings = dict(TIMING, mode=mode)
            if method == "dopri5":
                settings.update(sampling_method=method, rtol=v, atol=v * 1e-3)
            elif method:
                settings.update(sampling_method=method, num_sampling_steps=v)
            else:
                settings.update(num_sampling_steps=v)
            worker, _ = make_worker(setup, f"{root}/fd.npz", **settings)
            b, start, nfe, images = settings["per_proc_batch_size"], time.perf_counter(), 0, []
            for s in range(0, samples, b):
                images.append(worker.sample(np.arange(s, min(s + b, samples)))[0])
                nfe += worker.sampler.nfe
            feats = np.concatenate([extractor(x)["global"] for x in np.array_split(np.concatenate(images), 8)])
            rows.append({"mode": mode, "method": method or "euler-maruyama",
                         **({"rtol": v} if method == "dopri5" else {"steps": v}),
                         "nfe_per_batch": round(nfe / -(-samples // b), 1),
                         "fd_effnet": round(frechet_distance(*activation_statistics(feats), mu_r, sigma_r), 3),
                         "seconds": round(time.perf_counter() - start, 1)})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demo", default="runs/demo", help="demo run root (default runs/demo)")
    p.add_argument("--batches", type=int, default=3, help="timed in-process batches of 32 (default 3)")
    p.add_argument("--stage-samples", type=int, default=256, help="samples the stage draws (default 256)")
    p.add_argument("--workers", type=int, default=2, help="Ray actors for the stage (default 2)")
    p.add_argument("--fd-samples", type=int, default=None,
                   help="samples per FD point (default: as many as the reference holds)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads in this process (default 1)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from pipelines.parallel import ensure_ray

    ensure_ray()
    with tempfile.TemporaryDirectory(prefix="bench-sample-") as root:
        demo = demo_setup(args.demo)
        setup = demo or random_setup(root)
        out = {**device_note(), "torch": torch.__version__,
               "model": "demo run " + setup["ckpt"] if demo else "random SiT-T/2 + random demo VAE (timings only)",
               "timings": timings(setup, root, args.batches, args.stage_samples, args.workers)}
        if demo:
            from reals.metrics.reference import image_shape

            n = args.fd_samples or image_shape(demo["reference"])[0]
            out["fd_effnet_vs_nfe"] = {"samples": n, "reference": demo["reference"],
                                       "note": "FD in EfficientNet-Lite0 space, not FID; few samples: compare rows, "
                                               "not absolute values", "rows": fd_sweep(demo, root, n)}
        else:
            out["fd_effnet_vs_nfe"] = f"skipped: no demo run under {args.demo} (run `reals demo` first)"
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
