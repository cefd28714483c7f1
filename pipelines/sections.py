"""The pipeline config's stage sections as typed models, so the Prefect Run form shows real fields.

A section has its stage config's fields, defaults, choices and descriptions. The fields the plan fills (what the
stage reads and writes, and the values the chain sets) are empty by default, and their descriptions say what
empty becomes; a value given there wins. The stage's own validators run when the plan builds the stage config.
"""
from __future__ import annotations

import copy
from typing import ClassVar

from pydantic import Field, create_model

from pipelines.chain import Layout, draft_steps, producers_of, chain_records, outputs, read_roles
from pipelines.config import StageConfig
from pipelines.registry import Stage

SYMBOLIC = Layout("{output}", "{local_dir}")


class Section(StageConfig):
    """A stage config as a pipeline section (unknown keys and booleans for numbers refused, as in the stage's);
    ``given()`` is what it sets."""

    filled: ClassVar[frozenset[str]] = frozenset()

    def given(self) -> dict:
        """Every field's value but those left empty for the plan to fill."""
        return {k: v for k, v in self.model_dump().items() if not (k in self.filled and v is None)}


def _words(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return ", ".join(value) if isinstance(value, list) else str(value)


def filled_words() -> dict[str, dict[str, str]]:
    """Per section, what each field the plan fills becomes when left empty, in words."""
    records = chain_records()
    drafts = draft_steps(SYMBOLIC, records, {r.chain.section: {} for r in records}, {}, {"images": "{images}"})
    producers = producers_of(drafts)

    def roles(d) -> set[str]:
        return {r for name in d.record.reads for r in read_roles(d.record, name, d.known())}

    words: dict[str, dict[str, str]] = {}
    for d in drafts:
        mine = words.setdefault(d.section, {})
        mine.update({k: _words(v) for k, v in d.record.chain.sets.items()})
        mine.update({k: d.values[k] for k in d.record.writes})
        for name in d.record.reads:
            source = next((producers[r] for r in read_roles(d.record, name, d.known()) if r in producers), None)
            if source:
                mine[name] = source[0].values[source[1]]
        for name in d.record.writes:
            for out in outputs(d.record, name):
                if out.when:
                    readers = sorted({r.section for r in drafts if out.role in roles(r)})
                    mine[out.when] = f"true when {' or '.join(readers)} is set"
    return words


def section_model(record: Stage, from_plan: dict[str, str]) -> type[Section]:
    """The section model of a stage: its config's fields; those the plan fills (``from_plan``: field -> what it
    becomes, in words) or that have no default are empty by default; a per-split stage's ``split`` is left out."""
    fields, filled = {}, set()
    for name, info in record.config.model_fields.items():
        if name == "split" and record.chain.splits:
            continue
        if name in from_plan or info.is_required():
            filled.add(name)
            empty = f"empty: {from_plan[name]}" if name in from_plan else "required"
            fields[name] = (info.annotation | None, Field(None, description=f"{info.description or name} ({empty})",
                                                          validation_alias=info.validation_alias))
        else:
            fields[name] = (info.annotation, copy.copy(info))
    model = create_model(f"{record.config.__name__.removesuffix('Config')}Section", __base__=Section,
                         __doc__=record.config.__doc__, **fields)
    model.filled = frozenset(filled)
    return model


def section_models() -> dict[str, tuple[Stage, type[Section]]]:
    """Every chain section's stage (the first registered of a shared section) and model, in registry order."""
    words = filled_words()
    out: dict[str, tuple[Stage, type[Section]]] = {}
    for record in chain_records():
        out[record.chain.section] = (record, section_model(record, words.get(record.chain.section, {})))
    return out


class OptionalSection(StageConfig):
    """Stage fields of which only those given are set (the experiment fills the rest per arm and seed)."""

    def given(self) -> dict:
        """The fields given (not empty)."""
        return {k: v for k, v in self.model_dump().items() if v is not None}


def optional_section(name: str, *stage_records: Stage) -> type[OptionalSection]:
    """A model of the fields of the stages' configs (the first's description of a shared field), each optional
    and empty by default; empty means the stage's default or what the experiment sets."""
    fields = {}
    for record in stage_records:
        for field, info in record.config.model_fields.items():
            fields.setdefault(field, (info.annotation | None, Field(
                None, description=info.description or field, validation_alias=info.validation_alias)))
    return create_model(name, __base__=OptionalSection,
                        __doc__=f"fields of {', '.join(r.name for r in stage_records)}, all optional", **fields)
