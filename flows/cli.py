"""The ``reals`` command: every stage command (generated in ``pipelines.cli``) plus the flow commands here.

``reals pipeline`` runs the chain as one Prefect flow run, ``reals demo`` the embedded defaults
(configs/demo.yaml) from nothing to metrics under ./runs/demo (run it again and every complete stage is
skipped), ``reals serve`` the deployments, ``reals experiment`` the controlled comparison. Without
``PREFECT_API_URL`` the flows report to a local API started for the run (SQLite in ~/.prefect);
``reals serve --with-server`` keeps one up with its UI. Prefect and Ray load only for these commands.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from pydantic import BaseModel, Field

from pipelines import StageError
from pipelines.cli import add_config_arguments, config_from_args, flag_values
from pipelines.cli import main as stage_main
from pipelines.config import build, settings


class PipelineCommand(BaseModel):
    """``reals pipeline``."""

    config: str | None = Field(None, description="pipeline YAML: output, images and one section per stage "
                                                 "(default configs/demo.yaml)")
    output: str | None = Field(None, description="run root, overriding the config's output (local path or s3://)")
    local_dir: str | None = Field(None, description="local folder shared by the Ray nodes for the synthetic data "
                                                    "and the converted VAE (needed when the run root is on S3; "
                                                    "default: the run root)")


class DemoCommand(BaseModel):
    """``reals demo``."""

    output: str = Field("runs/demo", description="run root")


class ServeCommand(PipelineCommand):
    """``reals serve``."""

    config: str | None = Field(None, description="pipeline YAML whose settings pre-fill the deployments "
                                                 "(default configs/demo.yaml)")
    output: str | None = Field(None, description="run root of the deployments (default: $REALS_RUNS_URL/<config "
                                                 "output name> when set, else the config's output)")
    with_server: bool = Field(False, description="first start a local Prefect server (SQLite) on 127.0.0.1 and use "
                                                 "it; a Prefect server already answering on its port is used as it is")
    port: int | None = Field(None, ge=1, le=65535, description="port of the --with-server server (default 4200, or a "
                                                              "free port when 4200 is taken by something else)")
    reencode_cron: str | None = Field(None, description="cron schedule (UTC) of the incremental reencode deployment "
                                                        "(default nightly: 0 3 * * *)")


class ExperimentCommand(BaseModel):
    """``reals experiment`` (the other flags are ExperimentConfig's)."""

    quick: bool = Field(False, description="the ~10-minute preset (configs/experiment-quick.yaml)")
    config: str | None = Field(None, description="experiment YAML (default configs/experiment.yaml; flags override it)")
    sweep: str | None = Field(None, description="sweep YAML: `points` (a list of overrides) and/or `grid` (knob: "
                                                "[values]) of the ReaLS arm, all against one baseline "
                                                "(configs/sweep.yaml)")
    set: list[str] = Field(default_factory=list, description="KEY=VALUE settings over the config, KEY a field or "
                                                             "section.field, VALUE read as YAML (e.g. "
                                                             "generator.max_steps=1000 sample.num_fid_samples=500)")


def _quiet_defaults() -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


# ---------------------------------------------------------------------------------------------------
# Handlers
# ---------------------------------------------------------------------------------------------------

def _run_pipeline(config) -> int:
    from rich.console import Console
    from rich.table import Table

    from flows.pipeline import reals_pipeline
    from flows.runtime import prefect_api
    from pipelines.pipeline_config import pipeline_steps

    t0 = time.perf_counter()
    pipeline_steps(config)  # a bad config fails here, before any server starts
    with prefect_api() as api:
        summary = reals_pipeline(config)
    console = Console()
    table = Table(title=f"reals pipeline: {summary.output}")
    for col in ("stage", "status", "seconds"):
        table.add_column(col)
    for row in summary.stages:
        table.add_row(row["stage"], row["status"], f"{row['seconds']:.1f}")
    console.print(table)
    for name, value in summary.metrics.items():
        console.print(f"{name}: {value:.4f}", highlight=False)
    console.print(f"report: {summary.report}", highlight=False)
    if api:
        where = f"at {api.removesuffix('/api')}"
    else:
        from prefect.settings import PREFECT_HOME

        where = f"kept in {PREFECT_HOME.value()}: browse them with `make server` at http://127.0.0.1:4200"
    console.print(f"flow runs and artifacts {where}", highlight=False)
    console.print(f"{time.perf_counter() - t0:.0f} s in all", highlight=False)
    return 0


def pipeline(cmd: PipelineCommand) -> int:
    from pipelines.pipeline_config import load_pipeline_config

    return _run_pipeline(load_pipeline_config(cmd.config, output=cmd.output, local_dir=cmd.local_dir))


def demo(cmd: DemoCommand) -> int:
    from pipelines.pipeline_config import load_pipeline_config

    return _run_pipeline(load_pipeline_config(None, output=cmd.output))


def serve(cmd: ServeCommand) -> int:
    from flows.deployments import DEFAULT_REENCODE_CRON, serve_config, serve_deployments

    serve_deployments(serve_config(cmd.config, cmd.output, cmd.local_dir), cmd.with_server,
                      cmd.reencode_cron or DEFAULT_REENCODE_CRON, cmd.port)
    return 0


def experiment(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from flows.experiment import run
    from pipelines.experiment import ExperimentConfig, preset
    from pipelines.sweep import load_sweep

    cmd = build(ExperimentCommand, flag_values(ExperimentCommand, args), "")
    if cmd.config and cmd.quick:
        raise StageError("--quick picks configs/experiment-quick.yaml; give it or --config, not both")
    if not cmd.config and not os.path.isfile(preset(cmd.quick)):
        raise StageError(f"preset {preset(cmd.quick)} not found: pass --config FILE")
    args.config = cmd.config or preset(cmd.quick)
    config = config_from_args(ExperimentConfig, args, parser)
    if cmd.set:
        config = build(ExperimentConfig, settings(config.model_dump(), cmd.set), "experiment config ")
    if cmd.sweep:
        config = build(ExperimentConfig, {**config.model_dump(), **load_sweep(cmd.sweep)}, "experiment config ")
    s = run(config)
    print(s.markdown)
    if s.sweep_table:
        print(Path(s.sweep_table).read_text())
        print(f"  sweep: {s.sweep_table}\n  plots: {', '.join(s.sweep_plots)}")
    print(f"experiment: {s.units_run} units run, {s.units_reused} reused, {s.wall_seconds:.0f} s -> {s.output}")
    print(f"  table: {s.table}\n  results: {s.results}\n  loss curves: {s.loss_curves}")
    return 0


# ---------------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------------

def add_flow_commands(sub) -> None:
    """Register ``reals pipeline``, ``demo``, ``serve`` and ``experiment``."""
    commands = [
        ("pipeline", PipelineCommand, pipeline, "run the whole chain as one Prefect flow run (complete stages skipped)",
         "Run every stage in order as one Prefect flow run; stages whose outputs are complete are skipped."),
        ("demo", DemoCommand, demo, "the whole chain on the embedded CPU defaults, from nothing to metrics",
         "Run the whole chain on the embedded defaults (configs/demo.yaml): a synthetic dataset to metrics and a "
         "report, on local disk, local Ray and a local Prefect API. Run it again and every complete stage is "
         "skipped."),
        ("serve", ServeCommand, serve, "serve the Prefect deployments: pipeline, stages, nightly reencode",
         "Serve the deployments (reals-pipeline, one per stage, reencode on a cron schedule) until interrupted."),
    ]
    for name, model, handler, short, description in commands:
        p = sub.add_parser(name, help=short, description=description)
        add_config_arguments(p, model)
        p.set_defaults(handler=lambda args, model=model, handler=handler: _flow(
            handler, build(model, flag_values(model, args), "")))

    from pipelines.experiment import ExperimentConfig

    p = sub.add_parser("experiment", help="controlled experiment: SiT on ReaLS latents vs on a plain VAE's latents, "
                                          "over seeds",
                       description="Train a baseline VAE (align_weight 0) and a ReaLS VAE per seed on the same shards, "
                                   "encode, train the same SiT on each, sample alike, and measure both against "
                                   "held-out val images; writes results.md/.json, loss_curves.png and both arms' "
                                   "recorded configs. Re-runs resume.")
    add_config_arguments(p, ExperimentCommand)
    add_config_arguments(p, ExperimentConfig)
    p.set_defaults(handler=lambda args: _flow(lambda a: experiment(a, p), args))


def cluster(args: argparse.Namespace) -> int:
    """``reals cluster up|status|down``."""
    from flows.cluster import Cluster

    c = Cluster(args.dir)
    if args.action == "down":
        notes = c.down(purge=args.purge)
        print(f"stopped the cluster of {c.root}")
        for note in notes:
            print(f"  {note}")
        return 0
    if args.action == "status":
        rows = c.status()
        for name, alive, detail in rows:
            print(f"{name:<15} {'alive' if alive else 'DOWN':<6} {detail}")
        return 0 if all(alive for name, alive, _ in rows if name != "serve") else 1
    env = c.up(serve=not args.no_serve, config=args.config)
    print(f"UI: {env['PREFECT_API_URL'].removesuffix('/api')}; Ray dashboard: {env['RAY_API_SERVER_ADDRESS']}; "
          f"`reals cluster status --dir {args.dir}`; stop it with `reals cluster down --dir {args.dir}`")
    return 0


def add_cluster_command(sub) -> None:
    """Register ``reals cluster up|status|down``."""
    p = sub.add_parser("cluster", help="start, check or stop the production topology on this machine (no Docker)",
                       description="up: PostgreSQL (or SQLite), a Prefect server on it, a Ray head (dashboard on "
                                   "127.0.0.1) and one worker node, an S3 endpoint (MinIO or moto), a watchdog that "
                                   "starts a lost Ray node again, and the served deployments, on free ports; on a "
                                   "running cluster it starts only what is not alive. status: each component and "
                                   "whether it is alive. down: stop exactly what up started, keeping the run history "
                                   "unless --purge. S3 credentials come from this shell's AWS_ACCESS_KEY_ID and "
                                   "AWS_SECRET_ACCESS_KEY and are never written to the folder.")
    p.add_argument("action", choices=["up", "status", "down"], help="start, check or stop")
    p.add_argument("--dir", default="runs/cluster", help="the cluster's folder: state, logs, data (default runs/cluster)")
    p.add_argument("--config", help="pipeline YAML that pre-fills the deployments (default configs/demo.yaml)")
    p.add_argument("--no-serve", action="store_true", help="start the services but not `reals serve`")
    p.add_argument("--purge", action="store_true", help="down: also delete the run history (PostgreSQL's data) and "
                                                        "MinIO's folder")
    p.set_defaults(handler=lambda args: _flow(cluster, args))


def _flow(handler, arg) -> int:
    _quiet_defaults()
    return handler(arg)


def main(argv: list[str] | None = None) -> int:
    """The ``reals`` entry point."""
    return stage_main(argv, commands=[add_flow_commands, add_cluster_command])


if __name__ == "__main__":
    sys.exit(main())
