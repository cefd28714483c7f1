"""``python -m flows serve`` (the deployments) and ``python -m flows run-stage`` (a training stage under torchrun)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def run_stage(stage: str, config_file: str, summary_file: str) -> int:
    """Run one stage from a JSON config in this (torchrun) process; rank 0 writes the summary."""
    from pipelines.registry import stage as record_of

    record = record_of(stage)
    summary = record.run(record.config.model_validate_json(Path(config_file).read_text()))
    if int(os.environ.get("RANK", "0")) == 0:
        Path(summary_file).write_text(summary.model_dump_json())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="serve the pipeline, stage and reencode deployments")
    p.add_argument("--config", help="pipeline YAML whose settings pre-fill the deployments (default configs/demo.yaml)")
    p.add_argument("--output", help="run root of the deployments (default: $REALS_RUNS_URL/<name>, else the config's)")
    p.add_argument("--local-dir", help="local folder shared by the Ray nodes (needed when the run root is on S3)")
    p.add_argument("--with-server", action="store_true", help="first start a local Prefect server on 127.0.0.1:4200")
    p.add_argument("--reencode-cron", help="cron schedule of reencode, UTC (default nightly: 0 3 * * *)")
    p = sub.add_parser("run-stage", help="run a training stage from a JSON config (used by torchrun)")
    p.add_argument("stage", help="training stage (train-vae, train-sit)")
    p.add_argument("config_file", help="JSON file of the stage's config")
    p.add_argument("--summary", required=True, help="file rank 0 writes the summary JSON to")
    args = parser.parse_args(argv)
    if args.command == "serve":
        from flows.deployments import DEFAULT_REENCODE_CRON, serve_config, serve_deployments
        from pipelines import StageError

        try:
            serve_deployments(serve_config(args.config, args.output, args.local_dir), args.with_server,
                              args.reencode_cron or DEFAULT_REENCODE_CRON)
        except StageError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    return run_stage(args.stage, args.config_file, args.summary)


if __name__ == "__main__":
    sys.exit(main())
