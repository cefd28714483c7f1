"""Stage configs: pydantic models (Prefect renders them as forms; the CLI fills them from YAML and flags)."""
from __future__ import annotations

import argparse
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from pipelines import StageError


class StageConfig(BaseModel):
    """Base of every stage config: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    @classmethod
    def field_help(cls, name: str) -> str:
        """The description of field ``name``: the CLI's help text is the form's label in the Prefect UI."""
        return cls.model_fields[name].description


def load_yaml(path: str | None, section: str | None = None) -> dict:
    """The mapping in a YAML file (or one top-level section of it); ``{}`` when ``path`` is None."""
    if not path:
        return {}
    p = Path(path)
    if not p.is_file():
        raise StageError(f"config file not found: {path}")
    data = yaml.safe_load(p.read_text()) or {}
    if section is not None:
        data = data.get(section) or {}
    if not isinstance(data, dict):
        raise StageError(f"config {path}: expected a mapping, got {type(data).__name__}")
    return data


def config_from_args(cls: type[StageConfig], args: argparse.Namespace, yaml_section: str | None = None, **extra):
    """Build ``cls`` from YAML (``args.config`` if present), overridden by flags that were given."""
    values = load_yaml(getattr(args, "config", None), yaml_section)
    for name in cls.model_fields:
        v = getattr(args, name, None)
        if v is not None:
            values[name] = v
    values.update({k: v for k, v in extra.items() if v is not None})
    try:
        return cls(**values)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise StageError(f"invalid {cls.__name__} {where}: {first['msg']}") from None
