"""Where scenarios live: files, the built-in ones, and the compiled form a run reads
(``RUN_DIR/scenario.json``, with its partition plan)."""

from __future__ import annotations

import dataclasses
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

from protocols.errors import ConfigError
from protocols.rundir import load_json_cached, write_json_atomic
from simulations.scenario.parse import parse_scenario
from simulations.scenario.spec import DataSpec, Scenario, SiteProfile


def load_scenario(path_or_name: str | Path) -> Scenario:
    """A scenario from a TOML file, or a built-in scenario by name."""
    p = Path(path_or_name)
    if not p.exists() and not p.suffix and str(path_or_name) in builtin_scenarios():
        p = builtin_path(str(path_or_name))
    if not p.exists():
        raise ConfigError(f"no scenario file {str(path_or_name)!r} (built-in scenarios: "
                          f"{', '.join(builtin_scenarios())}).")
    if p.is_dir():
        raise ConfigError(f"scenario {str(p)!r} is a directory, not a scenario (TOML) file.")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not a scenario (TOML) file: not UTF-8 text ({exc.reason} "
                          f"at byte {exc.start}).") from None
    except OSError as exc:
        raise ConfigError(f"cannot read scenario file {str(p)!r}: "
                          f"{exc.strerror or exc}.") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None
    return parse_scenario(doc, source=str(p))


def builtin_scenarios() -> dict[str, str]:
    """Built-in scenario name -> its one-line description."""
    out: dict[str, str] = {}
    for entry in sorted(resources.files("simulations").joinpath("scenarios").iterdir(),
                        key=lambda e: e.name):
        if entry.name.endswith(".toml"):
            doc = tomllib.loads(entry.read_text(encoding="utf-8"))
            out[entry.name[:-5]] = str(doc.get("description", ""))
    return out


def builtin_path(name: str) -> Path:
    return Path(str(resources.files("simulations").joinpath("scenarios", f"{name}.toml")))


def save_compiled(scenario: Scenario, path: Path) -> None:
    """Write the validated scenario as JSON (what the apps read during the run)."""
    write_json_atomic(path, {**scenario.to_json(),
                             "partition": scenario.partition_plan().to_json()})


def load_compiled(path: str) -> Scenario:
    """The scenario a run was started with (``RUN_DIR/scenario.json``), cached per
    process for as long as the file is unchanged."""
    scenario = load_json_cached(path, _scenario_of, what="the run's scenario")
    return dataclasses.replace(scenario, source=path)


def _scenario_of(doc: dict[str, Any]) -> Scenario:
    d = dict(doc["data"])
    d["generate"] = tuple(d.get("generate") or ())
    groups = tuple(SiteProfile(**{**g, "labels": tuple(g["labels"])}) for g in doc["groups"])
    return Scenario(name=doc["name"], description=doc["description"], data=DataSpec(**d),
                    run=doc["run"], groups=groups)
