"""The generated reference pages: every ``reals`` command and flag, and every config's fields.

A mkdocs hook (``hooks:`` in mkdocs.yml): ``on_files`` adds ``reference/cli.md`` and ``reference/configs.md``,
built at each ``mkdocs build`` from the parser ``reals`` itself runs (``pipelines.cli.build_parser`` with the flow
commands of ``flows.cli``) and from the pydantic models, so the pages cannot drift from the code.
``python docs/gen_reference.py DIR`` writes the same two pages into DIR.
"""
from __future__ import annotations

import argparse
import os
import sys
import types
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CLI_PAGE, CONFIGS_PAGE = "reference/cli.md", "reference/configs.md"


def reals_parser() -> argparse.ArgumentParser:
    """The ``reals`` parser: every registered stage plus the flow and cluster commands."""
    from flows.cli import add_cluster_command, add_flow_commands
    from pipelines.cli import build_parser

    return build_parser([add_flow_commands, add_cluster_command])


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Each command's parser by name, in the order ``reals --help`` lists them."""
    return dict(_subparsers(parser).choices)


def short_help(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each command's one-line help, as ``reals --help`` shows it."""
    return {a.dest: a.help or "" for a in _subparsers(parser)._choices_actions}


def cell(text) -> str:
    """Text fit for one markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ").strip()


def _value(action: argparse.Action) -> str:
    if action.nargs == 0:
        return ""
    if action.choices:
        shown = "{" + ",".join(map(str, action.choices)) + "}"
    elif isinstance(action.metavar, tuple):
        shown = " ".join(action.metavar)
    else:
        shown = action.metavar or action.dest.upper()
    if isinstance(action.nargs, int) and not isinstance(action.metavar, tuple):
        shown = " ".join([shown] * action.nargs)
    elif action.nargs in ("+", "*"):
        shown += " ..."
    return f"`{shown}`"


def command_markdown(name: str, p: argparse.ArgumentParser, stage) -> str:
    """One command's section: usage, description, and a table of its arguments."""
    usage = "\n".join(line.removeprefix(" " * len("usage: ")) for line in
                      p.format_usage().removeprefix("usage: ").strip().splitlines())
    kind = f"stage, runs on `{stage.runs_on}`" if stage else "flow command"
    lines = [f"## reals {name}", "", f"*{kind}*", "", "```text", usage, "```", ""]
    if p.description:
        lines += [p.description, ""]
    lines += ["| argument | value | meaning |", "|---|---|---|"]
    for action in p._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        names = ", ".join(f"`{s}`" for s in action.option_strings) or f"`{action.dest}` (positional)"
        lines.append(f"| {names} | {_value(action)} | {cell(action.help or '')} |")
    if p.epilog:
        lines += ["", p.epilog]
    return "\n".join(lines) + "\n"


def cli_markdown() -> str:
    """The page of every command and flag."""
    from pipelines.registry import stages

    os.environ.setdefault("COLUMNS", "120")
    parser, registry = reals_parser(), stages()
    commands, shorts = subcommands(parser), short_help(parser)
    lines = ["# Commands and flags", "",
             "Generated at build time from the stage registry (`pipelines/registry.py`) and the parser `reals` runs "
             "(`pipelines/cli.py`, plus the flow commands of `flows/cli.py`): one section per command, one row per "
             "flag. A stage's flags are its config's fields (see [Config fields](configs.md)); a boolean field has "
             "`--x` and `--no-x`; `--config FILE` reads a YAML of the fields and flags override it. Errors you can "
             "act on print one line (`error: ...`) and exit 2.", "",
             "| command | what it does |", "|---|---|"]
    for name in commands:
        lines.append(f"| [`{name}`](#reals-{name}) | {cell(shorts[name])} |")
    lines.append("")
    for name, p in commands.items():
        lines.append(command_markdown(name, p, registry.get(name)))
    return "\n".join(lines)


def type_name(annotation) -> str:
    """A field's type as a reader would write it."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if args:
        parts = [type_name(a) for a in args]
        if origin in (typing.Union, types.UnionType):
            return " | ".join(parts)
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(parts)}]"
    return "None" if annotation is type(None) else getattr(annotation, "__name__", str(annotation))


def model_markdown(title: str, model, intro: str = "") -> str:
    """A table of a pydantic model's fields: name, type, default, description."""
    from pydantic import BaseModel
    from pydantic_core import PydanticUndefined

    lines = [f"## {title}", ""]
    if intro:
        lines += [intro, ""]
    lines += ["| field | type | default | meaning |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        if field.is_required():
            default = "required"
        elif field.default_factory is not None:
            made = field.default_factory()
            default = "(section)" if isinstance(made, BaseModel) else f"`{made!r}`"
        else:
            default = f"`{field.default!r}`" if field.default is not PydanticUndefined else ""
        lines.append(f"| `{name}` | {cell(type_name(field.annotation))} | {cell(default)} | "
                     f"{cell(field.description or '')} |")
    return "\n".join(lines) + "\n"


def configs_markdown() -> str:
    """The page of every config's fields: each stage's, the pipeline's and the experiment's."""
    from pipelines.pipeline_config import PipelineConfig
    from pipelines.experiment import ExperimentConfig
    from pipelines.registry import stages

    lines = ["# Config fields", "",
             "Generated at build time from the pydantic models. A stage's fields are its flags (dashes for "
             "underscores, or the flag named in [Commands and flags](cli.md)), the keys of a `--config` YAML, and "
             "the fields of its section in a pipeline YAML and in the Prefect form. YAML and checkpoints that use "
             "the former names `data_path`, `dino_model`, `dino_input_size` still load.", ""]
    lines.append(model_markdown(
        "Pipeline (`reals pipeline --config FILE`)", PipelineConfig,
        "The top level of a pipeline YAML (`configs/demo.yaml`, `configs/imagenet256-reals.yaml`); each section "
        "holds the fields of that stage below (paths left empty are filled from the run's layout)."))
    lines.append(model_markdown(
        "Experiment (`reals experiment --config FILE`)", ExperimentConfig,
        "`configs/experiment.yaml`, `configs/experiment-quick.yaml`; a sweep file (`configs/sweep.yaml`) adds "
        "`points` and `grid`."))
    seen = set()
    for name, record in stages().items():
        if record.config in seen:
            continue
        seen.add(record.config)
        lines.append(model_markdown(f"{name} ({record.config.__name__})", record.config,
                                    record.description or record.help))
    return "\n".join(lines)


PAGES = {CLI_PAGE: cli_markdown, CONFIGS_PAGE: configs_markdown}


def on_files(files, config):
    """mkdocs hook: add the generated pages to the site."""
    from mkdocs.structure.files import File

    for path, make in PAGES.items():
        files.append(File.generated(config, path, content=make()))
    return files


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "site-reference")
    for path, make in PAGES.items():
        (out / path).parent.mkdir(parents=True, exist_ok=True)
        (out / path).write_text(make())
        print(out / path)
