from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from protocols.config import RunSettings
from protocols.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_pyproject_defaults_match_run_settings() -> None:
    with (ROOT / "pyproject.toml").open("rb") as fh:
        flwr_config = tomllib.load(fh)["tool"]["flwr"]["app"]["config"]
    assert flwr_config == RunSettings().to_config()
    assert RunSettings.from_config(flwr_config) == RunSettings()


def test_components_point_at_the_apps() -> None:
    with (ROOT / "pyproject.toml").open("rb") as fh:
        comp = tomllib.load(fh)["tool"]["flwr"]["app"]["components"]
    assert comp == {"serverapp": "server.app:app", "clientapp": "client.app:app"}
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    import client.app
    import server.app

    assert isinstance(server.app.app, ServerApp) and isinstance(client.app.app, ClientApp)


def test_one_source_for_every_run_key() -> None:
    """pyproject.toml, RunSettings, the command line's run options and the scenario
    format describe the same keys (the CLI's options are generated from RunSettings)."""
    import argparse
    from dataclasses import fields

    from fedvault.cli.options import add_run_options
    from protocols.config import cli_options, config_key
    from simulations.scenario.parse import _SITE_FIELDS
    from simulations.scenario.spec import _RUN_KEYS_ELSEWHERE

    keys = {config_key(f.name) for f in fields(RunSettings)}
    with (ROOT / "pyproject.toml").open("rb") as fh:
        assert set(tomllib.load(fh)["tool"]["flwr"]["app"]["config"]) == keys
    parser = argparse.ArgumentParser()
    add_run_options(parser)
    dests = {a.dest for a in parser._actions}
    offered = {name for _, name, _, _, _ in cli_options()}
    assert offered <= dests and offered <= {f.name for f in fields(RunSettings)}
    assert {"seed", "num_server_rounds", "target_epsilon", "site_max_epsilon"} <= offered
    assert set(_RUN_KEYS_ELSEWHERE) <= keys
    # the site policy keys a scenario's [defaults] set are the run config's site-* keys
    for k in ("max-epsilon", "delta", "min-noise-multiplier"):
        assert k in _SITE_FIELDS and f"site-{k}" in keys


def test_unknown_key_is_named() -> None:
    with pytest.raises(ConfigError, match="Unknown run-config key 'num-rounds'"):
        RunSettings.from_config({"num-rounds": 3})


@pytest.mark.parametrize(
    ("cfg", "pattern"),
    [
        ({"num-server-rounds": 0}, "num-server-rounds must be >= 1. Found 0"),
        ({"fraction-train": 1.5}, r"fraction-train must be in \(0, 1\]. Found 1.5"),
        ({"alpha": 0.0}, "alpha must be > 0"),
        ({"partitioner": "zipf"}, "partitioner must be"),
        ({"learning-rate": -1.0}, "learning-rate must be > 0"),
        ({"num-server-rounds": "many"}, "'num-server-rounds' must be an integer"),
        ({"central-eval": "maybe"}, "must be true or false"),
        ({"task": 3}, "'task' must be a string"),
        ({"min-sites": True}, "must be an integer"),
        ({"seed": -1}, "seed must be >= 0. Found -1"),
    ],
)
def test_bad_values_are_named(cfg: dict[str, object], pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        RunSettings.from_config(cfg)


def test_coercion_from_strings() -> None:
    s = RunSettings.from_config({"num-server-rounds": "3", "alpha": "0.1", "central-eval": "false"})
    assert (s.num_server_rounds, s.alpha, s.central_eval) == (3, 0.1, False)
