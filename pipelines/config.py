"""Stage configs: pydantic models (Prefect renders them as forms; the CLI is generated from them)."""
from __future__ import annotations

import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import (AliasChoices, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)
from pydantic_core import PydanticCustomError

from pipelines import StageError

# The top-level keys of a pipeline YAML besides its sections (``pipelines.pipeline_config.PipelineConfig``): a stage
# given such a file with ``--config`` reads its own section and leaves these to the pipeline.
PIPELINE_KEYS = frozenset({"output", "local_dir", "images", "data_path", "nproc_per_node", "family"})


def _admits_bool(annotation) -> bool:
    """Whether a field of this type may hold ``True``/``False``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation in (bool, typing.Any, object):
        return True
    if origin is typing.Annotated:
        return _admits_bool(args[0])
    if origin in (typing.Union, types.UnionType):
        return any(_admits_bool(a) for a in args)
    if origin is typing.Literal:
        return any(isinstance(a, bool) for a in args)
    return False


def former_names_win(model: type[BaseModel], values):
    """``values`` without the fields left empty (None) under their name that are given under a former name (a
    form pre-filled with ``teacher: null`` and given ``dino_model``); a model's ``mode="before"`` validator."""
    if not isinstance(values, dict):
        return values
    empty = {name for name, field in model.model_fields.items()
             if isinstance(field.validation_alias, AliasChoices) and name in values and values[name] is None
             and any(c in values for c in field.validation_alias.choices if c != name)}
    return {k: v for k, v in values.items() if k not in empty} if empty else values


class StageConfig(BaseModel):
    """Base of every stage config: unknown keys are errors, not silently ignored, and so is a boolean given for a
    number (pydantic would read ``resolution: true`` as 1); a field is also read under its former name."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), populate_by_name=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value, info: ValidationInfo):
        annotation = cls.model_fields[info.field_name].annotation
        items = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(v, bool) for v in items) and not _admits_bool(annotation) and not any(
                _admits_bool(a) for a in typing.get_args(annotation)):
            raise PydanticCustomError("bool_for_number", "expected {expected}, got the boolean {value}",
                                      {"expected": _expected(annotation), "value": str(value).lower()})
        return value


    @model_validator(mode="before")
    @classmethod
    def _former_names(cls, values):
        return former_names_win(cls, values)


def _expected(annotation) -> str:
    kinds = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    return {int: "an integer", float: "a number"}.get(kinds[0], getattr(kinds[0], "__name__", str(kinds[0])))


class Cli:
    """How a config field appears on the ``reals`` command line, where the default (``--field-name``) is not it.

    Put it in the field's annotation: ``images: Annotated[str, Cli("--data-path")] = Field(...)``.
    ``flags``: the flag names (ReaLS's, e.g. ``--dino-model``); ``negative``: the flag of a boolean that sets
    it False (default ``--no-<flag>``); ``positional``: an argument without a flag; ``parse``: converts the
    text before validation; ``group``: fields of one group are mutually exclusive on the command line.
    """

    def __init__(self, *flags: str, negative: str | None = None, positional: bool = False,
                 metavar: str | tuple[str, ...] | None = None, parse: Callable[[str], object] | None = None,
                 group: str | None = None):
        self.flags, self.negative, self.positional = flags, negative, positional
        self.metavar, self.parse, self.group = metavar, parse, group


# A stage's progress bar: ``--progress`` / ``--no-progress``.
ShowProgress = Annotated[bool, Cli("--progress", negative="--no-progress")]


def renamed(field: str, old: str, *flags: str, optional: bool = False, kind: type = str):
    """A field named for what it holds, given on the command line as ReaLS's ``flags`` and still read from
    YAML (and Prefect parameters) under its ``old`` name."""
    return Annotated[kind | None if optional else kind, Cli(*flags),
                     Field(validation_alias=AliasChoices(field, old))]


# The input URL of a stage, named by what it holds; ``--data-path`` on the command line, as in ReaLS.
Images = renamed("images", "data_path", "--data-path")
OptionalImages = renamed("images", "data_path", "--data-path", optional=True)
Shards = renamed("shards", "data_path", "--data-path")
OptionalShards = renamed("shards", "data_path", "--data-path", optional=True)
Store = renamed("store", "data_path", "--data-path")
# The alignment teacher: ``--dino-model`` / ``--dino-input-size`` as in ReaLS (``--teacher`` also works).
Teacher = renamed("teacher", "dino_model", "--dino-model", "--teacher")
OptionalTeacher = renamed("teacher", "dino_model", "--dino-model", "--teacher", optional=True)
TeacherInputSize = renamed("teacher_input_size", "dino_input_size", "--dino-input-size", "--teacher-input-size",
                           optional=True, kind=int)


def first_error(e: ValidationError, names: Callable[[str], str] = str) -> str:
    """``where: what`` of a validation error's first problem (``names`` renders the top-level field)."""
    first = e.errors()[0]
    loc = [names(str(first["loc"][0])), *map(str, first["loc"][1:])] if first["loc"] else ["config"]
    return f"{'.'.join(loc)}: {first['msg']}"


def build(cls: type[BaseModel], values: dict, what: str, names: Callable[[str], str] = str):
    """``cls(**values)``, a validation error raised as one line ``invalid <what><where>: <msg>``."""
    try:
        return cls(**values)
    except ValidationError as e:
        raise StageError(f"invalid {what}{first_error(e, names)}") from None


# Sections read under a former name as well (pipeline and experiment YAML, --set, sweep knobs).
FORMER_SECTIONS = {"generator": ("train_sit",)}


def section_names(name: str) -> tuple[str, ...]:
    """A section's current name, then its former ones (``name`` may be either)."""
    return next(((new, *old) for new, old in FORMER_SECTIONS.items() if name == new or name in old), (name,))


def override(values: dict, key: str, value, what: str) -> dict:
    """``values`` with ``key`` (a field, or ``section.field`` of a section mapping, under any of the section's
    names) set to ``value``."""
    head, _, field = key.partition(".")
    if not field:
        return {**values, head: value}
    head = next((h for h in section_names(head) if isinstance(values.get(h), dict)), head)
    if not isinstance(values.get(head), dict):
        raise StageError(f"{what}: {head} is not a section of the config")
    return {**values, head: {**values[head], field: value}}


def settings(values: dict, given: list[str]) -> dict:
    """``values`` with ``KEY=VALUE`` settings (``--set``; KEY a field or ``section.field``, VALUE read as YAML)."""
    for item in given:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise StageError(f"--set {item!r}: expected KEY=VALUE, e.g. train_sit.max_steps=1000")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise StageError(f"--set {key}: {' '.join(str(getattr(e, 'problem', None) or e).split())}") from None
        values = override(values, key, value, f"--set {key}")
    return values


def read_yaml(path: str | Path):
    """The document of a YAML file (``safe_load``); a syntax error or a tag such as ``!!python/object`` is one
    line naming the file and the line."""
    try:
        return yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        what = " ".join(" ".join(str(p) for p in (getattr(e, "context", None), getattr(e, "problem", None)) if p)
                        .split()) or type(e).__name__
        raise StageError(f"config {path}{where}: {what}") from None


def load_yaml(path: str | None, section: str | tuple[str, ...] | None = None) -> dict:
    """The mapping in a YAML file (or its ``section`` when it has one; of several names, the first it has); ``{}``
    when ``path`` is None.

    Beside a ``section``, the file is a pipeline YAML: a top-level setting other than the pipeline's own
    (``PIPELINE_KEYS``) would be read by nothing, so it is refused.
    """
    if not path:
        return {}
    p = Path(path)
    if not p.is_file():
        raise StageError(f"config file not found: {path}")
    data = read_yaml(p) or {}
    if not isinstance(data, dict):
        raise StageError(f"config {path}: expected a mapping, got {type(data).__name__}")
    if isinstance(section, tuple):
        section = next((name for name in section if isinstance(data.get(name), dict)), section[0])
    if section is not None and isinstance(data.get(section), dict):
        for key, value in data.items():
            if key in PIPELINE_KEYS or value is None or isinstance(value, dict):
                continue
            if key in data[section]:
                raise StageError(f"config {path}: {key} is set both at the top level and in the {section}: section; "
                                 f"remove one")
            raise StageError(f"config {path}: top-level {key} is read by nothing beside the {section}: section; "
                             f"move it into the section")
        data = data[section]
    return data
