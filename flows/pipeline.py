"""The end-to-end ``reals_pipeline`` flow (stages whose outputs are complete are skipped) and ``reencode``."""
from __future__ import annotations

import posixpath
import time

from prefect import flow, tags, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed
from pydantic import BaseModel

from flows import artifacts
from flows.plan import PipelineConfig, Step, layout, missing, plan_steps, write_record
from flows.runtime import add_tags, run_name, started
from flows.stages import STAGE_FLOWS
from pipelines.stages.encode import EncodeSummary
from pipelines.registry import stage
from pipelines.report import ReportConfig, ReportSummary, write_report
from storage.fs import exists, join, to_url
from storage.markers import read_json

SKIPPED = "skipped (complete)"


class PipelineSummary(BaseModel):
    """What a pipeline run did: one row per stage run, the report and its metrics."""

    output: str
    stages: list[dict]
    report: str
    page: str
    metrics: dict[str, float]


@task(task_run_name="{name}: skipped (complete)", cache_policy=NO_CACHE, persist_result=False)
def skipped(name: str):
    """Shows in the run that a stage was not started because its outputs are complete."""
    return Completed(name="Skipped", message=f"{name}: {SKIPPED}")


@task(task_run_name="report", cache_policy=NO_CACHE, persist_result=False)
def report_task(config: ReportConfig) -> ReportSummary:
    """Write the markdown run report with its plots."""
    return write_report(config)


def root_tag(root: str) -> str:
    """The tag every flow run of one run root carries: ``root:<url>``."""
    return f"root:{root}"


def output_of(fields: dict) -> str:
    """Where a stage config writes (its ``output`` or ``output_dir``)."""
    return fields.get("output") or fields.get("output_dir") or ""


def run_step(step: Step, nproc_per_node: int, name: str | None = None):
    """Start the stage flow of ``step`` as a subflow tagged with its stage, named ``name`` or
    ``<step> <output> <start>`` (the step is the stage, or ``shard-train`` / ``shard-val``)."""
    stage_flow = STAGE_FLOWS[step.stage].with_options(
        flow_run_name=name or run_name(lambda c: f"{step.name} {output_of(c)}".rstrip()))
    with tags(f"stage:{step.stage}"):
        if stage(step.stage).runs_on == "train":
            return stage_flow(step.config, nproc_per_node=nproc_per_node)
        return stage_flow(step.config)


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
    steps = plan_steps(config)
    at = layout(config)
    add_tags(root_tag(at.root))
    with tags(root_tag(at.root)):
        return run_pipeline(config, steps, at)


def run_pipeline(config: PipelineConfig, steps: list[Step], at) -> PipelineSummary:
    ran: set[str] = set()
    rows: list[dict] = []
    for step in steps:
        upstream = [name for name in step.after if name in ran]
        why = f"{upstream[0]} ran" if upstream else missing(config.output, step)
        if why is None:
            skipped(step.name)
            print(f"{step.name}: {SKIPPED}")
            rows.append({"stage": step.name, "status": SKIPPED, "seconds": 0.0, "reason": ""})
            continue
        print(f"{step.name}: running ({why})")
        t0 = time.perf_counter()
        summary = run_step(step, config.nproc_per_node)
        seconds = time.perf_counter() - t0
        write_record(config.output, step, seconds, summary)
        ran.add(step.name)
        rows.append({"stage": step.name, "status": "ran", "seconds": round(seconds, 1), "reason": why})
    artifacts.table("pipeline-stages", rows, "stages of this run: ran or skipped (complete), and why")
    configs = {s.name: s.config for s in steps}
    report = report_task(ReportConfig(
        output=at.report, title=f"ReaLS run report: {at.root}", shards=at.shards,
        vae_run=configs["train-vae"].output, vae_dir=configs["convert"].output_dir, store=configs["encode"].output,
        sit_run=configs["train-sit"].output, model=configs["train-sit"].model, samples=configs["sample"].output,
        metrics=configs["evaluate"].output,
        downstream=configs["downstream"].output if "downstream" in configs else None, stages=rows))
    publish_report(report)
    return PipelineSummary(output=at.root, stages=rows, report=report.report, page=report.page,
                           metrics=report.metrics)


@flow(name="reencode", flow_run_name=lambda: f"reencode {started()}", log_prints=True)
def reencode(config: PipelineConfig, vae_paths: list[str] | None = None) -> list[EncodeSummary]:
    """Nightly: shard new training images, then encode what the store lacks for every VAE version.

    Shards whose inputs did not change and store rows already encoded are skipped by the stages; a VAE
    directory with new weights (a new fingerprint) gets its own store version.
    """
    steps = {s.name: s for s in plan_steps(config)}
    root = root_tag(layout(config).root)
    add_tags(root)
    shard = steps["shard-train"].config
    summaries = []
    with tags(root):
        if exists(join(shard.images, "train")):
            run_step(steps["shard-train"], config.nproc_per_node)
        else:
            print(f"shard-train: no {join(shard.images, 'train')} folder; encoding the shards there are")
        base = steps["encode"].config
        for vae in [base.vae_path, *(vae_paths or [])]:
            provenance = read_json(join(vae, "provenance.json"))
            if not provenance:
                print(f"encode: {vae} is not a converted VAE directory yet; skipped")
                continue
            version = provenance.get("fingerprint") or posixpath.basename(vae.rstrip("/"))  # saved, not converted
            name = f"encode {posixpath.basename(to_url(base.output).rstrip('/'))} {version[:8]}"
            step = Step("encode", "encode", base.model_copy(update={"vae_path": vae}), ())
            summaries.append(run_step(step, config.nproc_per_node, name))
    return summaries
