"""One Prefect flow per stage; each takes the stage's pydantic config, so the Prefect UI renders it as a form.

Batch stages (shard, encode, sample) run their driver as a task on the ``SharedRayTaskRunner`` (zero CPUs
reserved: the driver fans its units out to Ray itself); a transient storage error retries it, and the
stage skips the units already done. Training stages run in the flow's process, or under torchrun when
``nproc_per_node > 1``. Every flow publishes its summary as artifacts.
"""
from __future__ import annotations

import importlib
from contextlib import nullcontext

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect_ray.context import remote_options

from flows import artifacts
from flows.plan import progress_probe
from flows.runtime import SharedRayTaskRunner, retry_on_transient, run_torchrun
from pipelines.config import StageConfig
from pipelines.convert import ConvertConfig, ConvertSummary
from pipelines.downstream import DownstreamConfig, DownstreamSummary
from pipelines.encode import EncodeConfig, EncodeSummary
from pipelines.experiment import ExperimentConfig, ExperimentSummary
from pipelines.evaluate import EvaluateConfig, EvaluateSummary, MakeReferenceConfig, MakeReferenceSummary
from pipelines.report import loss_curves_png
from pipelines.sample import SampleConfig, SampleSummary
from pipelines.shard import ShardConfig, ShardSummary
from pipelines.synthetic import SyntheticConfig, SyntheticSummary
from pipelines.train_sit import TrainSiTConfig, TrainSiTSummary
from pipelines.train_vae import TrainVAEConfig, TrainVAESummary
from storage.fs import join, to_url, write_bytes_atomic

# stage -> (module, function): what a stage task runs.
STAGE_FUNCTIONS = {
    "synthetic": ("pipelines.synthetic", "run"),
    "shard": ("pipelines.shard", "run"),
    "train-vae": ("pipelines.train_vae", "run"),
    "convert": ("pipelines.convert", "run"),
    "encode": ("pipelines.encode", "run"),
    "train-sit": ("pipelines.train_sit", "run"),
    "sample": ("pipelines.sample", "run"),
    "make-reference": ("pipelines.evaluate", "make_reference"),
    "evaluate": ("pipelines.evaluate", "run"),
    "downstream": ("pipelines.downstream", "run"),
    "experiment": ("pipelines.experiment", "run"),
}
SUMMARIES = {"train-vae": TrainVAESummary, "train-sit": TrainSiTSummary}
RETRY_DELAYS = [10, 30, 90]


def stage_function(stage: str):
    module, name = STAGE_FUNCTIONS[stage]
    return getattr(importlib.import_module(module), name)


# ---------------------------------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------------------------------

@task(task_run_name="{stage}", cache_policy=NO_CACHE, persist_result=False, retries=len(RETRY_DELAYS),
      retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=retry_on_transient)
def batch_stage(stage: str, config: StageConfig):
    """A batch stage's driver (on Ray), with a live progress artifact; retried on transient storage errors."""
    probe = progress_probe(stage, config)
    with artifacts.progress(stage, f"{stage}: units done", probe) if probe else nullcontext():
        return stage_function(stage)(config)


@task(task_run_name="{stage}", cache_policy=NO_CACHE, persist_result=False)
def local_stage(stage: str, config: StageConfig, nproc_per_node: int = 1):
    """A stage in this process, or under torchrun with ``nproc_per_node`` processes (training stages)."""
    probe = progress_probe(stage, config)
    with artifacts.progress(stage, f"{stage}: steps done", probe) if probe else nullcontext():
        if nproc_per_node > 1:
            return SUMMARIES[stage].model_validate(run_torchrun(stage, config, nproc_per_node))
        return stage_function(stage)(config)


def on_ray(stage: str, config: StageConfig):
    """Run a batch stage's driver as a Ray task that reserves no CPU (its units take them)."""
    with remote_options(num_cpus=0):
        return batch_stage.submit(stage, config).result()


def summary_rows(summary) -> list[dict]:
    """A summary as (field, value) rows, long lists left out."""
    return [{"field": k, "value": v if isinstance(v, str | int | float | bool) or v is None else str(v)}
            for k, v in summary.model_dump().items() if not (isinstance(v, list) and len(v) > 16)]


def loss_curve(stage: str, run_url: str) -> str | None:
    """Plot a training run's log.jsonl to ``loss_curves.png`` in the run folder; its URL, or None."""
    from pipelines.checkpoints import read_log

    png = loss_curves_png(read_log(join(to_url(run_url), "log.jsonl")), stage)
    if png is None:
        return None
    url = join(to_url(run_url), "loss_curves.png")
    write_bytes_atomic(url, png)
    return url


# ---------------------------------------------------------------------------------------------------
# Flows
# ---------------------------------------------------------------------------------------------------

@flow(name="synthetic", log_prints=True)
def synthetic_flow(config: SyntheticConfig) -> SyntheticSummary:
    """Write a synthetic ImageNet-layout dataset."""
    summary = local_stage("synthetic", config)
    artifacts.table("synthetic", summary_rows(summary), "synthetic dataset written")
    return summary


@flow(name="shard", flow_run_name="shard-{config.split}", task_runner=SharedRayTaskRunner(), log_prints=True)
def shard_flow(config: ShardConfig) -> ShardSummary:
    """ImageNet-layout folder -> WebDataset shards + manifest.json, one Ray task per shard."""
    summary = on_ray("shard", config)
    artifacts.shard_artifacts(summary)
    return summary


@flow(name="train-vae", log_prints=True)
def train_vae_flow(config: TrainVAEConfig, nproc_per_node: int = 1) -> TrainVAESummary:
    """Train the ReaLS VAE with its alignment heads against a frozen teacher."""
    summary = local_stage("train-vae", config, nproc_per_node)
    artifacts.table("train-vae", summary_rows(summary), "train-vae: teacher, perceptual loss, final losses")
    curve = loss_curve("train-vae", config.output)
    if curve:
        artifacts.image("train-vae-loss-curves", curve, "train-vae loss and alignment curves")
    return summary


@flow(name="convert", log_prints=True)
def convert_flow(config: ConvertConfig) -> ConvertSummary:
    """train-vae checkpoint -> ReaLS VAE directory with latent statistics."""
    summary = local_stage("convert", config)
    artifacts.table("convert", summary_rows(summary), "converted ReaLS VAE")
    return summary


@flow(name="encode", task_runner=SharedRayTaskRunner(), log_prints=True)
def encode_flow(config: EncodeConfig) -> EncodeSummary:
    """Shards -> Zarr latent store version of this VAE, one Ray actor per worker; incremental."""
    summary = on_ray("encode", config)
    artifacts.encode_artifacts(summary)
    return summary


@flow(name="train-sit", log_prints=True)
def train_sit_flow(config: TrainSiTConfig, nproc_per_node: int = 1) -> TrainSiTSummary:
    """Train SiT by flow matching on the latent store."""
    summary = local_stage("train-sit", config, nproc_per_node)
    artifacts.table("train-sit", summary_rows(summary), "train-sit summary")
    curve = loss_curve("train-sit", config.output)
    if curve:
        artifacts.image("train-sit-loss-curves", curve, "train-sit loss curve")
    return summary


@flow(name="sample", task_runner=SharedRayTaskRunner(), log_prints=True)
def sample_flow(config: SampleConfig) -> SampleSummary:
    """Draw samples from a SiT checkpoint through the ReaLS VAE on Ray actors."""
    summary = on_ray("sample", config)
    artifacts.sample_artifacts(summary)
    return summary


@flow(name="make-reference", log_prints=True)
def make_reference_flow(config: MakeReferenceConfig) -> MakeReferenceSummary:
    """An ADM-layout reference .npz from held-out shards."""
    summary = local_stage("make-reference", config)
    artifacts.table("make-reference", summary_rows(summary), "reference batch")
    return summary


@flow(name="evaluate", log_prints=True)
def evaluate_flow(config: EvaluateConfig) -> EvaluateSummary:
    """Sample quality in every feature space available offline."""
    summary = local_stage("evaluate", config)
    artifacts.evaluate_artifacts(summary)
    return summary


@flow(name="downstream", log_prints=True)
def downstream_flow(config: DownstreamConfig) -> DownstreamSummary:
    """Training-free segmentation and depth from the alignment network's features, three sources side by side."""
    summary = local_stage("downstream", config)
    artifacts.downstream_artifacts(summary)
    return summary


@flow(name="experiment", log_prints=True)
def experiment_flow(config: ExperimentConfig) -> ExperimentSummary:
    """SiT on ReaLS latents vs on a plain VAE's latents over seeds (the driver here; its units on Ray)."""
    summary = local_stage("experiment", config)
    artifacts.markdown("experiment-results", summary.markdown, "ReaLS vs plain VAE: metrics over seeds")
    artifacts.image("experiment-loss-curves", summary.loss_curves, "loss curves of both arms")
    return summary


STAGE_FLOWS = {
    "synthetic": synthetic_flow, "shard": shard_flow, "train-vae": train_vae_flow, "convert": convert_flow,
    "encode": encode_flow, "train-sit": train_sit_flow, "sample": sample_flow,
    "make-reference": make_reference_flow, "evaluate": evaluate_flow, "downstream": downstream_flow,
}
TRAINING = ("train-vae", "train-sit")
