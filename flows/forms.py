"""A deployment's parameter schema as the Run form needs it, whatever database the Prefect server uses.

PostgreSQL stores the schema as JSONB, which reorders object keys (by length, then bytes); Prefect's UI orders
a form's fields by each property's ``position`` (fields without one keep the stored order). So every property
of every model gets its declared position. A field read under a former name as well (an ``AliasChoices``
validation alias, e.g. ``teacher`` / ``dino_model``) admits that name through ``patternProperties``, with the
field's own schema, and is not ``required`` by the schema (its model still requires one of the names, at the
run's start): the API and the form's JSON accept what YAML accepts, and the form shows the field once.
"""
from __future__ import annotations

import inspect
import re
import typing

from pydantic import AliasChoices, BaseModel

# Keys of a field's schema a former name does not repeat.
NOT_COPIED = {"position", "default", "title"}


def models(annotation) -> dict[str, type[BaseModel]]:
    """Every pydantic model reachable from ``annotation`` (its fields' types included), by class name."""
    found: dict[str, type[BaseModel]] = {}

    def visit(a) -> None:
        if inspect.isclass(a) and issubclass(a, BaseModel) and a.__name__ not in found:
            found[a.__name__] = a
            for field in a.model_fields.values():
                visit(field.annotation)
        for arg in typing.get_args(a):
            visit(arg)

    visit(annotation)
    return found


def former_names(model: type[BaseModel]) -> dict[str, str]:
    """``former name -> field`` for the fields of ``model`` also read under another name."""
    names = {}
    for name, field in model.model_fields.items():
        if isinstance(field.validation_alias, AliasChoices):
            names.update({c: name for c in field.validation_alias.choices if isinstance(c, str) and c != name})
    return names


def ordered(schema: dict, known: dict[str, type[BaseModel]]) -> dict:
    """``schema`` with a ``position`` on every property in declared order (one already set is kept) and the former
    names of the models in ``known`` (by title) admitted; changed in place and returned."""
    def visit(node) -> None:
        if isinstance(node, list):
            for item in node:
                visit(item)
            return
        if not isinstance(node, dict):
            return
        props = node.get("properties")
        if isinstance(props, dict):
            for i, prop in enumerate(props.values()):
                if isinstance(prop, dict):
                    prop.setdefault("position", i)
            model = known.get(node.get("title"))
            former = former_names(model) if model else {}
            if former:  # a required field may come under its former name: the stage's model still requires one
                required = [r for r in node.pop("required", []) if r not in former.values()]
                if required:
                    node["required"] = required
                node.setdefault("patternProperties", {}).update({
                    f"^{re.escape(old)}$": {**{k: v for k, v in props[new].items() if k not in NOT_COPIED},
                                            "deprecated": True, "description": f"former name of {new}"}
                    for old, new in former.items() if new in props})
        for value in node.values():
            visit(value)

    visit(schema)
    return schema


def form_schema(flow_, schema: dict) -> dict:
    """The parameter schema Prefect built for ``flow_``, ordered and with former names admitted (in place)."""
    known: dict[str, type[BaseModel]] = {}
    for param in inspect.signature(flow_.fn, eval_str=True).parameters.values():
        known.update(models(param.annotation))
    return ordered(schema, known)
