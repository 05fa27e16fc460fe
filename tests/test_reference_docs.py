"""The generated reference pages (docs/reference/run-config.md, node-config.md, cli.md)
are what docs/gen_reference.py makes from the code now: a key, flag or help text
changed without regenerating them fails here."""

from __future__ import annotations

import importlib.util
from types import ModuleType

from tests.helpers import ROOT


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_reference",
                                                  ROOT / "docs" / "gen_reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_generated_reference_pages_are_current() -> None:
    problems = _generator().problems()
    assert problems == [], "\n".join(problems)


def test_the_reference_covers_every_key_and_command() -> None:
    gen = _generator()
    from fedvault.cli import build_parser
    from protocols.config import RunSettings, config_key
    from protocols.node_config import NodeConfig

    run = (ROOT / "docs" / "reference" / "run-config.md").read_text(encoding="utf-8")
    assert all(f"| `{config_key(name)}` |" in run for name in RunSettings.__dataclass_fields__)
    node = (ROOT / "docs" / "reference" / "node-config.md").read_text(encoding="utf-8")
    assert all(f"| `{key}` |" in node for key in NodeConfig.keys())
    cli = (ROOT / "docs" / "reference" / "cli.md").read_text(encoding="utf-8")
    progs = [p.prog for p, _, _ in gen.commands(build_parser())]
    assert len(progs) > 20 and all(f"## `{prog}`" in cli for prog in progs)
