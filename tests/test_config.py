from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fedvault.errors import ConfigError
from protocols.config import RunSettings

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
    import client.app
    import server.app

    assert server.app.app is not None and client.app.app is not None


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
    ],
)
def test_bad_values_are_named(cfg: dict[str, object], pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        RunSettings.from_config(cfg)


def test_coercion_from_strings() -> None:
    s = RunSettings.from_config({"num-server-rounds": "3", "alpha": "0.1", "central-eval": "false"})
    assert (s.num_server_rounds, s.alpha, s.central_eval) == (3, 0.1, False)
