"""The chain as data: from what each stage reads and writes (its roles, in the stage registry), the steps of a run.

One planner serves every chain. Given a run's layout, the values given per section and the roles already there,
``plan`` works back from the chain's ends (the ``target`` stages whose section is set) to the stages that produce
what they read, lays out every output at its declared path under the run root (a value given in a section wins),
fills every input from its producer, and orders the steps so that each comes after what it reads. ``phases``
groups them into steps that can run side by side. ``reals pipeline``, the deployments, the report and the
experiment all read this one plan; how its steps run (Prefect subflows, Ray tasks) is the executor's choice.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache

from pipelines import StageError
from pipelines.config import StageConfig, build
from pipelines.registry import Output, Stage, stages
from storage.fs import join, local_path



@dataclass(frozen=True)
class Step:
    """One stage run of a chain: its name in the run, which stage it is, its config, the steps it reads from."""

    name: str
    stage: str
    config: StageConfig
    after: tuple[str, ...] = ()


@dataclass(frozen=True)
class Layout:
    """Where a run's outputs go: under ``root``, or under ``local`` for what must be on a local disk."""

    root: str
    local: str | None

    def path(self, output: Output, values: Mapping) -> str:
        """Where ``output`` goes by default (its ``{field}`` placeholders filled from ``values``)."""
        if output.local and self.local is None:
            raise StageError(f"output {self.root} is not local: give local_dir, a local folder shared by the Ray "
                             f"nodes, for {output.role}")
        return join(self.local if output.local else self.root, output.path.format_map(values))


def chain_records(choose: Mapping[str, str] | None = None) -> list[Stage]:
    """The stages that join a chain, in registry order; of stages sharing a section, the one ``choose`` names
    (default: the first registered)."""
    chosen, out = dict(choose or {}), []
    for record in stages().values():
        if record.chain is None:
            continue
        section = record.chain.section
        chosen.setdefault(section, record.name)
        if chosen[section] == record.name:
            out.append(record)
    return out


def outputs(record: Stage, field_name: str) -> tuple[Output, ...]:
    value = record.writes[field_name]
    return value if isinstance(value, tuple) else (value,)


def read_roles(record: Stage, field_name: str, values: Mapping) -> tuple[str, ...]:
    value = record.reads[field_name]
    return tuple(r.format_map(values) for r in (value if isinstance(value, tuple) else (value,)))


def defaults(record: Stage) -> dict:
    """The stage config's default values (what a role's ``{field}`` reads when a field is not given)."""
    return _defaults(record.config)


@cache
def _defaults(config: type[StageConfig]) -> dict:
    return {k: f.get_default(call_default_factory=True) for k, f in config.model_fields.items() if not f.is_required()}


@dataclass
class Draft:
    """A step being planned: its stage, section and values so far."""

    name: str
    record: Stage
    values: dict
    given: set[str]
    after: set[str] = field(default_factory=set)

    @property
    def section(self) -> str:
        return self.record.chain.section

    def known(self) -> dict:
        return {**defaults(self.record), **self.values}


def draft_steps(layout: Layout, records: list[Stage], sections: Mapping[str, dict | None], fixed: Mapping[str, dict],
            paths: Mapping[str, str]) -> list[Draft]:
    """Every step the chain could hold, its outputs laid out."""
    drafts = []
    for record in records:
        chain = record.chain
        given = sections.get(chain.section)
        if given is None and chain.optional:
            continue
        for split in chain.splits or (None,):
            values = {**chain.sets, **(given or {}), **fixed.get(chain.section, {})}
            if split is not None:
                values["split"] = split
            d = Draft(f"{record.name}-{split}" if split else record.name, record, values,
                       set(given or {}) | set(fixed.get(chain.section, {})))
            for name in record.writes:
                if name not in d.given:
                    first = outputs(record, name)[0]
                    role = first.role.format_map(d.known())
                    d.values[name] = paths[role] if role in paths else layout.path(first, d.known())
            drafts.append(d)
    return drafts


def producers_of(drafts: list[Draft]) -> dict[str, tuple[Draft, str, Output]]:
    found: dict[str, tuple[Draft, str, Output]] = {}
    for d in drafts:
        for name in d.record.writes:
            for out in outputs(d.record, name):
                role = out.role.format_map(d.known())
                if role in found:
                    raise StageError(f"{found[role][0].name} and {d.name} both write {role}")
                found[role] = (d, name, out)
    return found


def plan(layout: Layout, sections: Mapping[str, dict | None], *, provided: Mapping[str, str] | None = None,
         paths: Mapping[str, str] | None = None, choose: Mapping[str, str] | None = None,
         only: Iterable[str] | None = None, targets: Iterable[str] | None = None,
         ends: Iterable[str] | None = None, fixed: Mapping[str, dict] | None = None,
         what: str = "pipeline section") -> list[Step]:
    """The steps of a run, in an order where each comes after the steps it reads from.

    ``sections``: section -> the values given (None: not set, so an optional stage is left out);
    ``provided``: role -> URL of what is already there (a data folder, another run's outputs);
    ``paths``: role -> URL where its producer writes it instead of the default path;
    ``choose``: section -> the stage that runs it, among stages sharing it (the generator's family);
    ``only``: the stages that may take part (default: every chain stage); ``targets``: the stages the plan
    works back from (default: the chain's target stages that are present), or ``ends``: the roles it works back
    from; ``fixed``: section -> values set over the section's own (the experiment's seeds and weights).
    """
    provided, fixed = dict(provided or {}), dict(fixed or {})
    records = [r for r in chain_records(choose) if only is None or r.name in set(only)]
    drafts = draft_steps(layout, records, sections, fixed, dict(paths or {}))
    producers = producers_of(drafts)
    _one_writer_at_a_time(drafts)
    if ends is not None:
        queue = [producers[role][0] for role in ends if role in producers]
    else:
        wanted = set(targets) if targets is not None else {d.record.name for d in drafts if d.record.chain.target}
        queue = [d for d in drafts if d.record.name in wanted]
    reached: dict[str, Draft] = {}
    while queue:
        d = queue.pop()
        if d.name in reached:
            continue
        reached[d.name] = d
        for name in d.record.reads:
            if name in d.given:
                continue
            for role in read_roles(d.record, name, d.known()):
                if role in provided:
                    d.values.setdefault(name, provided[role])
                elif role in producers:
                    source, out_field, out = producers[role]
                    d.values.setdefault(name, source.values[out_field])
                    d.after.add(source.name)
                    if out.when:
                        source.values[out.when] = True
                    queue.append(source)
    ordered = _order([d for d in drafts if d.name in reached])
    names = [d.name for d in ordered]
    steps = [Step(d.name, d.record.name, build(d.record.config, d.values, f"{what} {d.section}."),
                  tuple(a for a in names if a in d.after)) for d in ordered]
    _check(steps)
    return steps


def _one_writer_at_a_time(drafts: list[Draft]) -> None:
    """A step that writes where an earlier one writes (both splits' shards, one manifest) comes after it."""
    seen: dict[str, str] = {}
    for d in drafts:
        for name in d.record.writes:
            where = d.values[name]
            if where in seen:
                d.after.add(seen[where])
            seen[where] = d.name


def _order(drafts: list[Draft]) -> list[Draft]:
    """Each step after those it reads from; otherwise in registry order."""
    done: list[Draft] = []
    left, names = list(drafts), {d.name for d in drafts}
    while left:
        ready = next((d for d in left if d.after & names <= {x.name for x in done}), None)
        if ready is None:
            raise StageError(f"the steps {', '.join(d.name for d in left)} read each other's outputs")
        done.append(ready)
        left.remove(ready)
    return done


def check_inputs(step: Step) -> None:
    """The chain check of ``step``'s stage on its config (a data folder without the split), if it has one."""
    check = stages()[step.stage].chain.check
    if check is not None:
        check(step.config)


def _check(steps: list[Step]) -> None:
    """Check the steps that read only what is already there (no planned step writes it), before anything runs."""
    written = {role for s in steps for role in produced(s)}
    for step in steps:
        record, values = stages()[step.stage], step.config.model_dump()
        if {r for name in record.reads for r in read_roles(record, name, values)} & written:
            continue
        try:
            check_inputs(step)
        except StageError as e:
            raise StageError(f"{e}: {_remedy(step, steps)}") from None


def _readers(step: Step, steps: list[Step]) -> list[tuple[Step, str]]:
    """The steps that read what ``step`` writes, each with the field it reads it through."""
    out = []
    for role in produced(step):
        out += [(s, f) for s in steps if (f := reading(s, role))]
    return out


def _remedy(step: Step, steps: list[Step]) -> str:
    """What to do about a missing input of ``step``: give it, or set the field that makes its reader unneeded."""
    for reader, _ in _readers(step, steps):
        for target, field_name in _readers(reader, steps):
            section = stages()[target.stage].chain.section
            return f"add one, or set {section}.{field_name} (then {reader.name}, which reads it, is not needed)"
    return "add one"


def produced(step: Step) -> dict[str, str]:
    """The roles ``step`` writes, with their URLs (one switched off by its ``when`` field is not written)."""
    record, values = stages()[step.stage], step.config.model_dump()
    return {out.role.format_map(values): values[name] for name in record.writes for out in outputs(record, name)
            if out.when is None or values.get(out.when)}


def reading(step: Step, role: str) -> str | None:
    """The config field through which ``step`` reads ``role`` (None: it does not)."""
    record, values = stages()[step.stage], step.config.model_dump()
    return next((name for name in record.reads if role in read_roles(record, name, values)), None)


def phases(steps: list[Step]) -> list[list[Step]]:
    """The steps in phases: each phase's steps read only from earlier phases, so they can run side by side."""
    level: dict[str, int] = {}
    for step in steps:
        level[step.name] = 1 + max((level[a] for a in step.after), default=-1)
    return [[s for s in steps if level[s.name] == i] for i in range(max(level.values(), default=-1) + 1)]


def local_folder(root: str, local_dir: str | None) -> str | None:
    """The run's local folder: ``local_dir``, else the run root when that is local (None: neither)."""
    local = local_dir or local_path(root)
    return os.path.abspath(os.path.expanduser(local.removeprefix("file://"))) if local else None
