"""Deployments served by ``reals serve``: the pipeline, every stage, and ``reencode`` on a cron schedule."""
from __future__ import annotations

import os
from pathlib import PurePosixPath

from prefect import serve
from prefect.deployments.runner import EntrypointType
from pydantic import ValidationError

from flows.pipeline import reals_pipeline, reencode
from flows.runtime import local_server, wait_for_api
from flows.experiment import experiment_flow
from flows.forms import form_schema
from flows.stages import STAGE_FLOWS
from pipelines import StageError
from pipelines.experiment import load_experiment_config
from pipelines.pipeline_config import PipelineConfig, load_pipeline_config, pipeline_steps
from pipelines.registry import stages
from storage.fs import join

DEFAULT_REENCODE_CRON = "0 3 * * *"  # nightly at 03:00 UTC
TAGS = ["reals"]


def deployment(flow_, name: str, tags: tuple[str, ...] = (), **kwargs):
    """``flow_`` as a deployment whose entrypoint is its module path (``flows.stages.shard_flow``): a worker
    imports it as part of the package, so Ray workers can unpickle its tasks (a file path would load it as
    a top-level module they cannot import). Its form keeps the declared field order on any database and takes
    the former field names (``flows.forms``)."""
    d = flow_.to_deployment(name, tags=[*TAGS, *tags], entrypoint_type=EntrypointType.MODULE_PATH, **kwargs)
    schema = d._parameter_openapi_schema  # Prefect keeps the schema it sends in this attribute
    form_schema(flow_, {"properties": schema.properties, "definitions": schema.definitions})
    return d


def check_cron(cron: str) -> None:
    """Refuse a cron expression Prefect cannot schedule, in one line."""
    from prefect.client.schemas.schedules import CronSchedule

    try:
        CronSchedule(cron=cron)
    except ValidationError as e:
        raise StageError(f"invalid reencode cron {cron!r}: {e.errors()[0]['msg']}") from None


def build_deployments(config: PipelineConfig, reencode_cron: str = DEFAULT_REENCODE_CRON) -> list:
    """The deployments ``serve`` runs: the pipeline, reencode, every registered stage (the forms of those in the
    pipeline's plan pre-filled with its settings) and the experiment."""
    check_cron(reencode_cron)
    params = {"config": config.model_dump(mode="json")}
    deployments = [deployment(reals_pipeline, "reals-pipeline", ("pipeline",), parameters=params,
                              description="the whole chain; complete stages are skipped"),
                   deployment(reencode, "reencode", ("reencode",), cron=reencode_cron, parameters=params,
                              description="incremental encode: new shards and new VAE versions")]
    planned = {}
    for step in pipeline_steps(config):
        planned.setdefault(step.stage, step.config)
    for name, record in stages().items():  # every stage; those in the plan pre-filled with its settings
        stage_params = {"config": planned[name].model_dump(mode="json")} if name in planned else {}
        if record.runs_on == "train":
            stage_params["nproc_per_node"] = config.nproc_per_node
        deployments.append(deployment(STAGE_FLOWS[name], name, (f"stage:{name}",), parameters=stage_params,
                                      description=record.help))
    deployments.append(deployment(
        experiment_flow, "experiment", ("experiment",),
        parameters={"config": load_experiment_config(None, quick=True).model_dump(mode="json")},
        description="ReaLS vs plain VAE over seeds (quick preset; edit the form for the default)"))
    return deployments


def serve_config(config_file: str | None = None, output: str | None = None,
                 local_dir: str | None = None) -> PipelineConfig:
    """The pipeline config the deployments are pre-filled with; without ``output``, runs go under
    ``$REALS_RUNS_URL`` (when set) in a folder named like the config's own output."""
    config = load_pipeline_config(config_file, output=output, local_dir=local_dir)
    runs = os.environ.get("REALS_RUNS_URL")
    if output is None and runs:
        config = config.model_copy(update={"output": join(runs, PurePosixPath(config.output).name)})
    return config


def serve_deployments(config: PipelineConfig, with_server: bool = False,
                      reencode_cron: str = DEFAULT_REENCODE_CRON, port: int | None = None) -> None:
    """Serve every deployment until interrupted (with ``with_server``: on a local Prefect server on ``port``,
    default 4200 or a free port when that is taken; one already answering there is used)."""
    from prefect.settings import PREFECT_API_URL

    pipeline_steps(config)  # a bad config fails before anything is served
    if with_server:
        with local_server(port=port):
            serve(*build_deployments(config, reencode_cron))
        return
    api = PREFECT_API_URL.value()
    if not api:
        raise StageError("reals serve needs a Prefect server: set PREFECT_API_URL or pass --with-server")
    wait_for_api(api.rstrip("/"))
    serve(*build_deployments(config, reencode_cron))
