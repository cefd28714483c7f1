"""The docs site's generated reference names every registered stage, every command and every flag."""
from __future__ import annotations

import argparse
import importlib.util
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def load_generator():
    spec = importlib.util.spec_from_file_location("gen_reference", ROOT / "docs" / "gen_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_reference_lists_every_stage_command_and_flag():
    from pipelines.registry import stages

    gen = load_generator()
    page = gen.cli_markdown()
    commands = gen.subcommands(gen.reals_parser())
    assert set(stages()) | {"pipeline", "demo", "serve", "experiment", "cluster"} <= set(commands)
    sections = dict(re.findall(r"^## reals (\S+)\n(.*?)(?=^## reals |\Z)", page, flags=re.S | re.M))
    assert list(sections) == list(commands)
    for name, parser in commands.items():
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            for flag in action.option_strings or [action.dest]:
                assert f"`{flag}`" in sections[name], f"reals {name}: {flag} missing from the reference"


def test_configs_reference_lists_every_stage_config_field():
    from pipelines.registry import stages

    page = load_generator().configs_markdown()
    for record in stages().values():
        heading = f"({record.config.__name__})"
        assert heading in page, f"{record.name}'s config missing from the reference"
        section = page.split(heading, 1)[1].split("\n## ", 1)[0]
        for field in record.config.model_fields:
            assert f"| `{field}` |" in section, f"{record.config.__name__}.{field} missing from the reference"


def test_nav_names_only_pages_that_exist():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    generated = set(load_generator().PAGES)

    def pages(items):
        for item in items:
            value = next(iter(item.values())) if isinstance(item, dict) else item
            yield from pages(value) if isinstance(value, list) else [value]

    listed = list(pages(config["nav"]))
    assert generated <= set(listed)
    missing = [p for p in listed if p not in generated and not (ROOT / "docs" / p).is_file()]
    assert not missing, f"nav pages missing from docs/: {missing}"
