"""``reals pipeline``, ``reals demo`` and ``reals serve``: the chain as Prefect flows (``flows`` is imported lazily).

``reals demo`` runs the embedded defaults (configs/demo.yaml) from nothing to metrics under ./runs/demo;
run it again and every complete stage is skipped. Without ``PREFECT_API_URL`` the flows report to a local
API started for the run (SQLite in ~/.prefect); ``reals serve --with-server`` keeps one up with its UI.
"""
from __future__ import annotations

import argparse
import os
import time

from rich.console import Console
from rich.table import Table


def _quiet_defaults() -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def _run(config) -> int:
    from flows.pipeline import reals_pipeline
    from flows.plan import plan_steps
    from flows.runtime import prefect_api

    t0 = time.perf_counter()
    plan_steps(config)  # a bad config fails here, before any server starts
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


def _pipeline(args: argparse.Namespace) -> int:
    _quiet_defaults()
    from flows.plan import load_pipeline_config

    return _run(load_pipeline_config(args.config, output=args.output, local_dir=args.local_dir))


def _demo(args: argparse.Namespace) -> int:
    _quiet_defaults()
    from flows.plan import load_pipeline_config

    return _run(load_pipeline_config(None, output=args.output))


def _serve(args: argparse.Namespace) -> int:
    _quiet_defaults()
    from flows.deployments import serve_config, serve_deployments

    serve_deployments(serve_config(args.config, args.output, args.local_dir), args.with_server, args.reencode_cron)
    return 0


def add_cli(subparsers) -> None:
    """Register ``reals pipeline``, ``reals demo`` and ``reals serve``."""
    p = subparsers.add_parser("pipeline", help="run the whole chain as one Prefect flow run (complete stages skipped)",
                              description="Run every stage in order as one Prefect flow run; stages whose outputs "
                                          "are complete are skipped.")
    p.add_argument("--config", help="pipeline YAML: output, data_path and one section per stage "
                                    "(default configs/demo.yaml)")
    p.add_argument("--output", help="run root, overriding the config's output (local path or s3://)")
    p.add_argument("--local-dir", help="local folder shared by the Ray nodes for the synthetic data and the converted "
                                       "VAE (needed when the run root is on S3; default: the run root)")
    p.set_defaults(handler=_pipeline)

    p = subparsers.add_parser("demo", help="the whole chain on the embedded CPU defaults, from nothing to metrics",
                              description="Run the whole chain on the embedded defaults (configs/demo.yaml): a "
                                          "synthetic dataset to metrics and a report, on local disk, local Ray "
                                          "and a local Prefect API. Run it again and every complete stage is "
                                          "skipped.")
    p.add_argument("--output", default="runs/demo", help="run root (default runs/demo)")
    p.set_defaults(handler=_demo)

    p = subparsers.add_parser("serve", help="serve the Prefect deployments: pipeline, stages, nightly reencode",
                              description="Serve the deployments (reals-pipeline, one per stage, reencode on a cron "
                                          "schedule) until interrupted.")
    p.add_argument("--config", help="pipeline YAML whose settings pre-fill the deployments (default configs/demo.yaml)")
    p.add_argument("--output", help="run root of the deployments (default: $REALS_RUNS_URL/<config output name> when "
                                    "set, else the config's output)")
    p.add_argument("--local-dir", help="local folder shared by the Ray nodes (needed when the run root is on S3)")
    p.add_argument("--with-server", action="store_true",
                   help="first start a local Prefect server (SQLite) on 127.0.0.1:4200 and use it")
    p.add_argument("--reencode-cron", default="0 3 * * *",
                   help="cron schedule (UTC) of the incremental reencode deployment (default nightly: 0 3 * * *)")
    p.set_defaults(handler=_serve)
