"""The ``reals`` command: one subcommand per stage; each stage module registers its own parser.

Every stage module exposes ``add_cli(subparsers)`` which adds its subcommand(s) and sets
``handler=fn(args) -> int``. Errors a user can act on print as one line and exit non-zero;
``REALS_DEBUG=1`` shows the traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys



def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reals",
        description="ReaLS latent pipeline: ImageNet folder -> shards -> aligned VAE -> latent store -> SiT -> FID.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from pipelines.registry import STAGE_MODULES

    for name in [*STAGE_MODULES, "pipelines.orchestrate"]:
        module = importlib.import_module(name)
        if hasattr(module, "add_cli"):
            module.add_cli(sub)
    return parser


def user_errors() -> tuple[type[BaseException], ...]:
    from pipelines import StageError
    from reals import ReaLSError
    from storage import StorageError

    return (StageError, ReaLSError, StorageError, FileNotFoundError, NotADirectoryError, PermissionError)


def main(argv: list[str] | None = None) -> int:
    # Before torch loads: idle OpenMP threads sleep rather than spin (2 cores shared with Ray workers).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("interrupted: re-run the same command to resume", file=sys.stderr)
        return 130
    except user_errors() as e:
        if os.environ.get("REALS_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
