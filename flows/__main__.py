"""``python -m flows run-stage`` (a training stage under torchrun); any other command is ``reals``'s (``python -m flows serve``)."""
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
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] != ["run-stage"]:
        from flows.cli import main as reals

        return reals(argv)
    parser = argparse.ArgumentParser(prog="python -m flows run-stage", description=run_stage.__doc__)
    parser.add_argument("stage", help="training stage (train-vae, train-sit)")
    parser.add_argument("config_file", help="JSON file of the stage's config")
    parser.add_argument("--summary", required=True, help="file rank 0 writes the summary JSON to")
    args = parser.parse_args(argv[1:])
    return run_stage(args.stage, args.config_file, args.summary)


if __name__ == "__main__":
    sys.exit(main())
