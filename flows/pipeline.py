"""The end-to-end ``reals_pipeline`` flow (stages whose outputs are complete are skipped) and ``reencode``."""
from __future__ import annotations

import posixpath

from prefect import flow, tags, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from flows import artifacts
from flows.executors import Executor, Subflows, run_step
from flows.runtime import add_tags, run_name, started
from pipelines import StageError
from pipelines.chain import Step, check_inputs, produced, reading
from pipelines.pipeline_config import PipelineConfig, layout, pipeline_steps
from pipelines.report import ReportConfig, ReportStep, ReportSummary, write_report
from storage.fs import join
from storage.markers import read_json


class PipelineSummary(BaseModel):
    """What a pipeline run did: one row per stage run, the report and its metrics."""

    output: str
    stages: list[dict]
    report: str
    page: str
    metrics: dict[str, float]


@task(task_run_name="report", cache_policy=NO_CACHE, persist_result=False)
def report_task(config: ReportConfig) -> ReportSummary:
    """Write the markdown run report with its plots."""
    return write_report(config)


def root_tag(root: str) -> str:
    """The tag every flow run of one run root carries: ``root:<url>``."""
    return f"root:{root}"


HTML = "text/html; charset=utf-8"


def publish_report(summary: ReportSummary) -> None:
    """The report as one markdown card with its pictures inside, and a link to its page (``report.html``, pictures
    inside, opened by the browser) where one works."""
    folder = posixpath.dirname(summary.report)
    artifacts.markdown("reals-report", artifacts.embed_images(summary.markdown, folder),
                       f"run report, pictures included; written to {summary.report} and {summary.page}")
    artifacts.link("reals-report-page", summary.page, "report.html", "the run report as a page, pictures inside",
                   content_type=HTML)


@flow(name="reals-pipeline", flow_run_name=run_name(lambda c: f"pipeline {c['output']}"), log_prints=True)
def reals_pipeline(config: PipelineConfig) -> PipelineSummary:
    """From a dataset folder to metrics: every stage in order, those already complete skipped."""
    steps = pipeline_steps(config)
    root = layout(config).root
    add_tags(root_tag(root))
    with tags(root_tag(root)):
        return run_pipeline(config, steps, root)


def run_pipeline(config: PipelineConfig, steps: list[Step], root: str) -> PipelineSummary:
    executor: Executor = Subflows(root, config.nproc_per_node)
    records = executor.run(steps)
    rows = [{"stage": name, "status": r["status"], "seconds": round(r["seconds"], 1), "reason": r["reason"]}
            for name, r in records.items()]
    artifacts.table("pipeline-stages", rows, "stages of this run: ran or skipped (complete), and why")
    report = report_task(ReportConfig(
        output=join(root, "report"), title=f"ReaLS run report: {root}", stages=rows,
        steps=[ReportStep(stage=s.stage, config=s.config.model_dump(mode="json")) for s in steps]))
    publish_report(report)
    return PipelineSummary(output=root, stages=rows, report=report.report, page=report.page,
                           metrics=report.metrics)


@flow(name="reencode", flow_run_name=lambda: f"reencode {started()}", log_prints=True)
def reencode(config: PipelineConfig, vae_paths: list[str] | None = None) -> list[BaseModel]:
    """Nightly: shard new training images, then encode what the store lacks for every VAE version.

    The plan's steps towards the latent store, from the VAE directory that is there: shards whose inputs did not
    change and store rows already encoded are skipped by the stages; a VAE directory with new weights (a new
    fingerprint) gets its own store version.
    """
    at = layout(config)
    vae_dir = next(produced(s)["vae_dir"] for s in pipeline_steps(config) if "vae_dir" in produced(s))
    add_tags(root_tag(at.root))
    summaries = []
    with tags(root_tag(at.root)):
        for step in pipeline_steps(config, provided={"vae_dir": vae_dir}, ends={"store"}):
            field = reading(step, "vae_dir")
            if field is None:
                try:
                    check_inputs(step)
                except StageError as e:
                    print(f"{step.name}: {e}; encoding the shards there are")
                    continue
                run_step(step, config.nproc_per_node)
                continue
            for vae in [getattr(step.config, field), *(vae_paths or [])]:
                provenance = read_json(join(vae, "provenance.json"))
                if not provenance:
                    print(f"{step.name}: {vae} is not a converted VAE directory yet; skipped")
                    continue
                version = provenance.get("fingerprint") or posixpath.basename(vae.rstrip("/"))  # saved, not converted
                store = posixpath.basename(produced(step)["store"].rstrip("/"))
                summaries.append(run_step(Step(step.name, step.stage, step.config.model_copy(update={field: vae})),
                                          config.nproc_per_node, f"{step.name} {store} {version[:8]}"))
    return summaries
