"""The stage commands of ``reals``, generated from the stage registry and the stages' pydantic configs.

One subcommand per registered stage and one flag per config field: ``--field-name``, or the ReaLS flag a field
declares with ``Cli`` (``--data-path``, ``--dino-model``); help texts are the fields' descriptions; a boolean
gets ``--x`` and ``--no-x``; a ``Literal`` lists its choices. ``--config FILE`` reads a YAML mapping of fields
(or the stage's section of a pipeline YAML); flags override it. Errors a user can act on print as one line
and exit 2; ``REALS_DEBUG=1`` shows the traceback. ``flows.cli`` adds the flow commands (``reals pipeline``...).
"""
from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
import threading
import types
import typing
from collections.abc import Callable, Iterable

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from pipelines import ray_train, user_errors
from pipelines.config import Cli, build, load_yaml, section_names

DESCRIPTION = "ReaLS latent pipeline: ImageNet folder -> shards -> aligned VAE -> latent store -> SiT -> FID."


# ---------------------------------------------------------------------------------------------------
# Flags from config fields
# ---------------------------------------------------------------------------------------------------

def _cli(field: FieldInfo) -> Cli:
    return next((m for m in field.metadata if isinstance(m, Cli)), Cli())


def flag(name: str, field: FieldInfo) -> str:
    """The (first) flag of a config field."""
    return (_cli(field).flags or (f"--{name.replace('_', '-')}",))[0]


def _value_spec(annotation) -> dict | None:
    """argparse ``type``/``choices``/``nargs`` for a field type; None for a type the command line cannot give."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        kinds = [a for a in args if a is not type(None)]
        return _value_spec(kinds[0]) if len(kinds) == 1 else {"type": str}  # e.g. bool | "auto": validated later
    if origin is typing.Literal:
        return {"type": type(args[0]), "choices": list(args)}
    items = _value_spec(args[0]) if origin in (tuple, list) and args else None
    if items is not None and origin is tuple and Ellipsis not in args:
        return {**items, "nargs": len(args)}
    if items is not None and origin is list:
        return {**items, "nargs": "+"}
    if annotation in (str, int, float):
        return {"type": annotation}
    return None


def _help(field: FieldInfo) -> str:
    text = field.description or ""
    if field.is_required():
        return f"{text} (required)"
    shown = field.default not in (None, PydanticUndefined) and not isinstance(field.default, bool)
    return f"{text} (default {field.default})" if shown and "default" not in text else text


def add_config_arguments(parser: argparse.ArgumentParser, cls: type[BaseModel]) -> None:
    """One argument per field of ``cls`` (fields of other types, such as sections, only through ``--config``)."""
    groups: dict[str, argparse._MutuallyExclusiveGroup] = {}
    for name, field in cls.model_fields.items():
        cli, first = _cli(field), flag(name, field)
        where = parser
        if cli.group:
            if cli.group not in groups:
                groups[cli.group] = parser.add_mutually_exclusive_group()
            where = groups[cli.group]
        if field.annotation is bool:
            default = " (the default)"
            where.add_argument(*cli.flags or (first,), dest=name, action="store_const", const=True,
                               default=argparse.SUPPRESS, help=_help(field) + default * (field.default is True))
            where.add_argument(cli.negative or "--no-" + first.removeprefix("--"), dest=name, action="store_const",
                               const=False, default=argparse.SUPPRESS,
                               help=f"not {first}" + default * (field.default is False))
            continue
        spec = _value_spec(field.annotation)
        if spec is None:
            continue
        if cli.parse:
            spec["type"] = cli.parse
        if cli.positional:
            where.add_argument(name, metavar=cli.metavar, help=_help(field), **spec)
        else:
            where.add_argument(*cli.flags or (first,), dest=name, metavar=cli.metavar, default=argparse.SUPPRESS,
                               help=_help(field), **spec)


def flag_values(cls: type[BaseModel], args: argparse.Namespace) -> dict:
    """The fields of ``cls`` given as flags."""
    return {k: v for k, v in vars(args).items() if k in cls.model_fields}


def config_from_args(cls: type[BaseModel], args: argparse.Namespace, parser: argparse.ArgumentParser,
                     section: str | tuple[str, ...] | None = None):
    """``cls`` from the YAML of ``--config`` (or its ``section``), overridden by the flags given."""
    values = {**load_yaml(getattr(args, "config", None), section), **flag_values(cls, args)}
    fields = cls.model_fields
    missing = [flag(n, f) for n, f in fields.items() if f.is_required() and n not in values
               and not (f.validation_alias and any(a in values for a in f.validation_alias.choices))]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    return build(cls, values, "", lambda n: flag(n, fields[n]) if n in fields else n)


# ---------------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------------

def add_stage_command(sub, record) -> None:
    """``reals <stage>``: its config from flags and ``--config``, run, then its summary shown."""
    p = sub.add_parser(record.name, help=record.help, description=record.description or record.help,
                       epilog=record.epilog)
    add_config_arguments(p, record.config)
    section = record.chain.section if record.chain else record.name.replace("-", "_")
    p.add_argument("--config", help=f"YAML file of {record.config.__name__} fields, or a pipeline YAML with a "
                                    f"`{section}:` section (flags override it)")
    names = section_names(section)

    def handle(args: argparse.Namespace) -> int:
        config = config_from_args(record.config, args, p, names)
        if record.runs_on == "train" and ray_train.wanted(config):
            summary = ray_train.fit(record.name, config)
        else:
            summary = record.run(config)
        if record.show is None:
            print(f"{record.name}: {summary.model_dump_json(indent=2)}")
            return 0
        return int(record.show(summary) or 0)

    p.set_defaults(handler=handle, resumable="resume" in record.config.model_fields)


def build_parser(commands: Iterable[Callable] = ()) -> argparse.ArgumentParser:
    """The parser of every registered stage, plus the commands each of ``commands(subparsers)`` adds."""
    from pipelines.registry import stages

    parser = argparse.ArgumentParser(prog="reals", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for record in stages().values():
        add_stage_command(sub, record)
    for add in commands:
        add(sub)
    return parser


# What a full disk (or a file size limit, ``ulimit -f``) raises on a write.
DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def _fault(e: BaseException, resume: str) -> str | None:
    """The line for a fault of the machine behind ``e`` (a full disk, an unreachable object store), or None."""
    from storage.fs import unreachable

    if (line := unreachable(e)) is not None:
        return f"{line}; then {resume}"
    seen = set()
    while e is not None and id(e) not in seen:  # itself, its cause or context, or a Ray task's cause
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in DISK_FULL:
            where = f" writing {e.filename}" if e.filename else ""
            return (f"{e.strerror or 'disk full'}{where}: the disk is full or a file size limit (ulimit -f) was "
                    f"reached; free space and {resume}")
        e = getattr(e, "cause", None) or e.__cause__ or e.__context__
    return None


def _terminate(signum, frame) -> None:
    """SIGTERM as ``SystemExit(SIGTERM)``: what Ray's driver handler raises too, once Ray has started. The run's
    ``finally`` blocks (leases, temp files, Ray actors) run on the way out."""
    raise SystemExit(signum)


def main(argv: list[str] | None = None, commands: Iterable[Callable] = ()) -> int:
    """Run one ``reals`` command; the exit status (2: an error the user can act on, printed in one line;
    128 + N: stopped by signal N, with a line saying how to resume)."""
    # Before torch loads: idle OpenMP threads sleep rather than spin (2 cores shared with Ray workers).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # A driver's SIGTERM reaches Python (and ends the run cleanly) rather than Ray's C++ handler (a stack dump).
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    args = build_parser(commands).parse_args(argv)
    resume = ("re-run the same command with --resume to continue from the last checkpoint"
              if getattr(args, "resumable", False) else "re-run the same command to resume")
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print(f"interrupted (SIGINT): {resume}", file=sys.stderr)
        return 130
    except SystemExit as e:
        if e.code != signal.SIGTERM:
            raise
        print(f"stopped by SIGTERM: {resume}", file=sys.stderr)
        return 128 + signal.SIGTERM
    except user_errors() as e:
        if os.environ.get("REALS_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        line = _fault(e, resume)
        if line is None or os.environ.get("REALS_DEBUG"):
            raise
        print(f"error: {line}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
