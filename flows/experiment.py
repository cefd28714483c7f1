"""The controlled experiment (``reals experiment``) as a Prefect flow."""
from __future__ import annotations

from prefect import flow

from flows import artifacts
from pipelines.experiment import ExperimentConfig, ExperimentSummary, run


@flow(name="experiment", log_prints=True)
def experiment_flow(config: ExperimentConfig) -> ExperimentSummary:
    """SiT on ReaLS latents vs on a plain VAE's latents over seeds (the driver here; its units on Ray)."""
    summary = run(config)
    artifacts.experiment_artifacts(summary)
    return summary
