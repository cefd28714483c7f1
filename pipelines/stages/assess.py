"""Stage `assess`: one run's own measurements beside `evaluate`: domain-space metrics of its samples and the
reconstruction quality of its VAE (PSNR, rFD_domain, LPIPS when its backbone weights exist).

The assessment .json holds the summary and the config; a re-run with the same config reads it back.
"""
from __future__ import annotations

import numpy as np
import torch
from pydantic import Field

from pipelines import StageError
from pipelines.config import StageConfig
from pipelines.placement import Placed, task_resources
from pipelines.registry import Chain, Output, Stage
from storage.fs import read_bytes, to_url
from storage.markers import read_json, write_json


class AssessConfig(StageConfig):
    """Inputs of one run's own measurements: domain-space metrics of samples and VAE reconstruction quality."""

    evaluator: str = Field(description="domain evaluator folder (`reals train-evaluator`)")
    ref_batch: str = Field(description="reference .npz (held-out images, ADM layout)")
    sample_batch: str = Field(description="samples .npz (arr_0 images, arr_1 conditioning labels)")
    vae_path: str = Field(description="ReaLS VAE directory whose reconstructions are measured")
    output: str = Field(description="assessment .json to write")
    nearest_k: int = Field(3, ge=1, description="k of the k-NN manifolds for precision/recall")
    batch_size: int = Field(64, ge=1, description="images per batch")
    reconstruction_images: int | None = Field(None, ge=1, description="reference images to reconstruct (default: all)")


class AssessSummary(Placed):
    output: str
    metrics: dict[str, float]
    vae_parameters: int
    noise_to_signal: list[float] = Field(description="per latent channel: E[posterior var] / Var(posterior mean)")
    notes: list[str]


def _load_npz(url: str) -> dict[str, np.ndarray]:
    import io

    with np.load(io.BytesIO(read_bytes(url))) as f:
        return {k: f[k] for k in f.files if k in ("arr_0", "arr_1")}


@torch.no_grad()
def reconstruct(vae, images: np.ndarray, batch_size: int) -> tuple[np.ndarray, list[float]]:
    """uint8 reconstructions of uint8 NHWC images from their posterior means, and the posterior's
    noise-to-signal ratio per latent channel, ``E[std^2] / Var(mean)`` (what a posterior sample adds)."""
    from reals.images import to_model_images, to_uint8

    out, means, variances = [], [], []
    for i in range(0, len(images), batch_size):
        mean, std = vae.encode(to_model_images(images[i:i + batch_size], torch.device("cpu")))
        rec = vae.decode(mean)
        out.append(to_uint8(rec))
        means.append(mean.double().transpose(0, 1).flatten(1))
        variances.append(std.double().square().transpose(0, 1).flatten(1))
    ratio = torch.cat(variances, 1).mean(1) / torch.cat(means, 1).var(1).clamp_min(1e-12)
    return np.concatenate(out), ratio.tolist()


def psnr(images: np.ndarray, reconstructions: np.ndarray) -> float:
    """Mean over images of ``10 log10(255^2 / MSE)`` (uint8 pixels, MSE over each image)."""
    err = (images.astype(np.float64) - reconstructions.astype(np.float64)) ** 2
    mse = np.maximum(err.reshape(len(images), -1).mean(axis=1), 1e-10)
    return float(np.mean(10 * np.log10(255.0 ** 2 / mse)))


def _lpips(images: np.ndarray, reconstructions: np.ndarray, batch_size: int) -> tuple[float | None, str]:
    """Mean LPIPS (AlexNet) when its ImageNet backbone is on disk, else None and why not."""
    from reals.losses import PerceptualLoss, lpips_backbone_file

    backbone = lpips_backbone_file("alex")
    if not backbone.is_file():
        return None, (f"LPIPS not computed: its ImageNet AlexNet backbone is not at {backbone} (this machine cannot "
                      "download it); PSNR and rFD_domain measure reconstruction instead")
    from reals.images import to_model_images

    metric, cpu = PerceptualLoss("lpips", "alex"), torch.device("cpu")
    with torch.no_grad():
        values = [metric(to_model_images(images[i:i + batch_size], cpu),
                         to_model_images(reconstructions[i:i + batch_size], cpu))
                  for i in range(0, len(images), batch_size)]
    return float(torch.cat(values).mean()), f"LPIPS v0.1 AlexNet backbone from {backbone}"


def assess(config: AssessConfig) -> AssessSummary:
    """Domain metrics of the samples vs the reference, and reconstruction quality of the VAE on the reference."""
    from reals.evaluator import DomainFeatures, domain_metrics
    from reals.vae import ReaLSVAE

    done = read_json(config.output)
    if done and done.get("config") == config.model_dump(mode="json"):
        return AssessSummary(**{k: done[k] for k in AssessSummary.model_fields})
    ref, smp = _load_npz(config.ref_batch), _load_npz(config.sample_batch)
    if "arr_1" not in smp:
        raise StageError(f"{config.sample_batch} has no arr_1 labels: conditional accuracy needs them")
    features = DomainFeatures(config.evaluator)
    metrics = domain_metrics(features, ref["arr_0"], smp["arr_0"], smp["arr_1"], config.nearest_k, config.batch_size)
    vae = ReaLSVAE.from_pretrained(config.vae_path).eval()
    originals = ref["arr_0"][:config.reconstruction_images]
    recon, noise_to_signal = reconstruct(vae, originals, config.batch_size)
    metrics["PSNR"] = psnr(originals, recon)
    metrics["rFD_domain"] = domain_metrics(features, originals, recon, k=config.nearest_k)["FD_domain"]
    value, note = _lpips(originals, recon, config.batch_size)
    if value is not None:
        metrics["LPIPS"] = value
    summary = AssessSummary(output=to_url(config.output), metrics=metrics, noise_to_signal=noise_to_signal,
                            vae_parameters=sum(p.numel() for p in vae.vae.parameters()), notes=[note])
    write_json(config.output, {**summary.model_dump(mode="json"), "config": config.model_dump(mode="json"),
                               "domain_space": features.description, "reconstructed_images": len(originals)})
    return summary


def missing_outputs(config: AssessConfig) -> str | None:
    """Whether the assessment .json was written with this config."""
    done = read_json(config.output)
    if not done:
        return "no assessment"
    return None if done.get("config") == config.model_dump(mode="json") else "assessed with other settings"


STAGES = [Stage("assess", AssessConfig, AssessSummary, assess, missing=missing_outputs, runs_on="task",
                resources=lambda c: task_resources("cpu"),
                reads={"evaluator": "evaluator", "ref_batch": "reference", "sample_batch": "samples",
                       "vae_path": "vae_dir"},
                writes={"output": Output("assessment", "assessment.json")},
                chain=Chain("assess", "when set, domain-space metrics and reconstruction quality (trains the domain "
                                      "evaluator first)", optional=True, target=True),
                help="domain-space metrics of samples and reconstruction quality of a VAE",
                description=__doc__.split("\n\n")[0])]
