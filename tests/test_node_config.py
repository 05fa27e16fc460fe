"""A site's node config is parsed once and fails closed; the run config never sets a
real site's limits. The attacks are played through the ClientApp Flower loads on a
real SuperNode (``client.app:app``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common.config import parse_config_args

from client.app import app as real_app
from client.budget import site_policy
from fedvault.rehearse import rehearsal_node_config
from fedvault_tasks.tables import save_table
from fedvault_tasks.tasks import get_task
from protocols.config import RunSettings
from protocols.errors import ConfigError
from protocols.hashchain import read_chain
from protocols.node_config import NodeConfig

pytestmark = pytest.mark.usefixtures("flower_identity")


def _train(node_config: dict[str, Any], tmp_path: Path, **run: Any) -> Message:
    torch.manual_seed(0)
    arrays = ArrayRecord(get_task("tabular").build_model().state_dict())
    msg = Message(content=RecordDict({"arrays": arrays, "config": ConfigRecord(
        {"server-round": 1, "local-epochs": 1, "batch-size": 64, "learning-rate": 0.1,
         "momentum": 0.9})}), dst_node_id=11, message_type="train")
    settings = RunSettings(task="tabular", run_dir=str(tmp_path / "run"), **run)
    ctx = Context(run_id=7, node_id=11, node_config=node_config, state=RecordDict(),
                  run_config=settings.to_config())
    return real_app(msg, ctx)


def _csv(tmp_path: Path) -> Path:
    t = get_task("tabular").embedded().subset(np.arange(120))
    return save_table(t, tmp_path / "site.csv", label_column="y")


@pytest.mark.parametrize(("key", "hint"), [
    ("max_epsilon", "did you mean 'max-epsilon'"),
    ("maxEpsilon", "did you mean 'max-epsilon'"),
    ("min-noise", "did you mean 'min-noise-multiplier'"),
])
def test_a_misspelt_limit_stops_the_site(tmp_path: Path, key: str, hint: str) -> None:
    """Before: the typo was ignored and the site trained under the default limit of 10."""
    node = {"data-path": str(_csv(tmp_path)), "label-column": "y",
            "ledger-path": str(tmp_path / "ledger.jsonl"), key: 1.0}
    with pytest.raises(ConfigError, match=f"unknown node-config key '{key}'.*{hint}"):
        _train(node, tmp_path, noise_multiplier=1.0)
    assert not (tmp_path / "ledger.jsonl").exists()  # nothing spent, nothing opened


def test_a_node_without_data_path_is_not_a_simulated_site(tmp_path: Path) -> None:
    """Before: a node without data-path was taken for a simulated site and its budget
    came from the run config, which the central team writes (site-max-epsilon=1e9)."""
    with pytest.raises(ConfigError, match="'data-path' is missing"):
        _train({"partition-id": 0, "num-partitions": 3}, tmp_path, site_max_epsilon=1e9,
               noise_multiplier=0.3, site_min_noise_multiplier=0.0)
    assert not (tmp_path / "run" / "ledgers").exists()


def test_the_run_config_never_sets_a_real_sites_limits(tmp_path: Path) -> None:
    node = NodeConfig.parse({"data-path": "/data/x.csv"})
    run = RunSettings(site_max_epsilon=1e9, site_delta=0.5, site_min_noise_multiplier=0.0,
                      site_release_eval_metrics=True)
    policy = site_policy(run, node)
    assert (policy.max_epsilon, policy.delta, policy.min_noise_multiplier) == (10.0, 1e-5, 0.5)
    assert policy.releases_eval_metrics(dp=True) is False
    # its own limit holds through the real app: over it, the site refuses
    p = _csv(tmp_path)
    reply = _train({"data-path": str(p), "label-column": "y", "max-epsilon": 0.5,
                    "ledger-path": str(tmp_path / "ledger.jsonl")}, tmp_path,
                   site_max_epsilon=1e9, noise_multiplier=1.0)
    assert "refusal" in reply.content.config_records
    assert float(reply.content.config_records["refusal"]["epsilon-limit"]) == 0.5  # type: ignore[arg-type]


@pytest.mark.parametrize(("key", "value", "pattern"), [
    ("max-epsilon", "abc", "must be a finite number"),
    ("max-epsilon", math.nan, "must be a finite number"),
    ("max-epsilon", "8", "must be a finite number"),
    ("require-dp", 1, "must be true or false"),
    ("partition-id", 1.5, "must be an integer"),
    ("data-path", 3, "must be a string"),
])
def test_bad_values_are_named(key: str, value: Any, pattern: str) -> None:
    with pytest.raises(ConfigError, match=f"node-config '{key}' {pattern}"):
        NodeConfig.parse({"data-path": "/d.csv", key: value})


def test_simulated_flag_comes_from_the_simulation_only() -> None:
    with pytest.raises(ConfigError, match="unknown node-config key 'simulated'"):
        NodeConfig.parse({"data-path": "/d.csv", "simulated": True})
    sim = NodeConfig.parse({"partition-id": 2, "num-partitions": 4}, simulated=True)
    assert sim.simulated and sim.name == "site-2"


def test_rehearsal_node_config_survives_quotes_and_spaces(tmp_path: Path) -> None:
    """The rehearsal writes each node config as TOML (the key=value form cannot carry a
    path holding both quote characters); Flower reads it back unchanged."""
    home = tmp_path / "a site's \"data\" dir"
    home.mkdir()
    data = home / "data.csv"
    settings = RunSettings(task="tabular", run_dir=str(tmp_path), he=True,
                           he_federation=str(tmp_path / "fed 'x'"))
    node = rehearsal_node_config(settings, 2, data=data, label="y", bounds=None)
    path = node.write_toml(home / "node-config.toml")
    parsed = NodeConfig.parse(parse_config_args([str(path)]))
    assert parsed == node and parsed.data_path == str(data)
    assert parsed.he_federation == str(tmp_path / "fed 'x'")


def test_a_real_site_never_takes_the_runs_he_federation(tmp_path: Path) -> None:
    """The run config names a federation directory the server chose; a real site uses
    only its own (node config), and finds that out before it spends anything."""
    node = {"data-path": str(_csv(tmp_path)), "label-column": "y", "site-name": "site-0",
            "ledger-path": str(tmp_path / "ledger.jsonl")}
    with pytest.raises(ConfigError, match="needs node-config 'he-federation'"):
        _train(node, tmp_path, he=True, he_federation=str(tmp_path / "servers-choice"),
               noise_multiplier=1.0)
    assert not (tmp_path / "ledger.jsonl").exists()  # no reservation was written


def test_a_site_sets_the_fewest_sites_its_update_is_aggregated_with(tmp_path: Path) -> None:
    """The central team sets the run's min-sites; a hostile one sets 1 and hands one
    site's update back as the "aggregate". A site's own floor (node-config
    aggregate-min-sites)
    refuses such a run before it reserves anything, and an encrypted aggregate of fewer
    sites than the floor is refused whatever the run says."""
    node = {"data-path": str(_csv(tmp_path)), "label-column": "y", "aggregate-min-sites": 3,
            "ledger-path": str(tmp_path / "ledger.jsonl")}
    reply = _train(node, tmp_path, noise_multiplier=1.0, min_sites=1)
    refusal = reply.content.config_records["refusal"]
    assert "requires at least 3 (node-config aggregate-min-sites)" in str(refusal["reason"])
    kinds = [e["kind"] for e in read_chain(tmp_path / "ledger.jsonl")]
    assert "reservation" not in kinds
    # at or above the floor the site trains
    ok = _train(node, tmp_path, noise_multiplier=1.0, min_sites=3)
    assert "refusal" not in ok.content.config_records
    with pytest.raises(ConfigError, match="must be an integer"):
        NodeConfig.parse({"data-path": "/d.csv", "aggregate-min-sites": 2.5})
    with pytest.raises(ConfigError, match="min-sites must be >= 1"):
        site_policy(RunSettings(),
                    NodeConfig.parse({"data-path": "/d.csv", "aggregate-min-sites": 0}))
