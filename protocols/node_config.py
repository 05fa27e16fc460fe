"""A site's node config: the data owner's own settings, parsed once and failing closed.

The mirror of :class:`protocols.config.RunSettings` for the other side: the
SuperNode's ``--node-config`` (``key=value`` pairs or a TOML file) is what the
*data owner* decides, and it is the only place a real site's privacy limits come
from. :meth:`NodeConfig.parse` checks every key and value and raises
:class:`~protocols.errors.ConfigError` naming the key: an unknown key (a typo such as
``max_epsilon`` or ``maxEpsilon``), a value of the wrong type or a missing
``data-path`` never lets the site train under a default it did not choose.

``simulated`` is set only by the simulation (``build_client_app(simulated=True)``),
never by a key: a simulated site is played by the central team, so its limits come
from the run config's ``site-*`` keys; a real node's never do.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import tomli_w

from protocols.errors import ConfigError
from protocols.names import site_name

#: keys Flower's Simulation Engine sets on every simulated node
FLOWER_SIMULATION_KEYS = ("partition-id", "num-partitions")


def _key(name: str) -> str:
    return name.replace("_", "-")


def _meta(help_: str) -> Any:
    return field(default=None, metadata={"help": help_})


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeConfig:
    """A site's validated node config; ``None`` means "not set" (the documented
    default applies, or, for a simulated site, the run config's ``site-*`` key)."""

    data_path: str | None = _meta("the site's data file (CSV, Parquet, NPZ): required")
    label_column: str | None = _meta("label column of the data")
    task: str | None = _meta("refuse runs of any other task")
    feature_bounds: str | None = _meta("declared feature bounds, LOW:HIGH or a JSON file")
    site_name: str | None = _meta("the site's name in the federation (site-K)")
    ledger_path: str | None = _meta("the site's privacy ledger")
    max_epsilon: float | None = _meta("the budget scope's total epsilon")
    delta: float | None = _meta("delta at which epsilon is accounted")
    min_noise_multiplier: float | None = _meta("refuse rounds with less noise")
    accountant: str | None = _meta("prv or rdp")
    require_dp: bool | None = _meta("refuse runs without DP")
    budget_scope: str | None = _meta("the budget this data draws on")
    release_eval_metrics: bool | None = _meta("send exact evaluation metrics")
    evaluate_after_refusal: bool | None = _meta("evaluate in a refused round")
    allow_insecure_noise: bool | None = _meta("train when the run asks for seeded noise")
    aggregate_min_sites: int | None = _meta("refuse runs and encrypted aggregates of fewer "
                                            "sites")
    he_federation: str | None = _meta("the provisioned federation directory")
    he_passphrase_env: str | None = _meta("environment variable of the HE passphrase")
    partition_id: int | None = _meta("simulation: the site's partition")
    num_partitions: int | None = _meta("simulation: the number of partitions")
    simulated: bool = field(default=False, metadata={"help": "set by the simulation only"})

    # ---------------------------------------------------------------- parsing
    @classmethod
    def keys(cls) -> dict[str, Any]:
        """The node-config keys (kebab-case) and their fields."""
        return {_key(f.name): f for f in fields(cls) if f.name != "simulated"}

    @classmethod
    def parse(cls, config: Mapping[str, Any], *, simulated: bool = False) -> NodeConfig:
        """Validate Flower's ``context.node_config``; ``ConfigError`` naming the key."""
        known = cls.keys()
        values: dict[str, Any] = {}
        for k, v in config.items():
            f = known.get(k)
            if f is None:
                raise ConfigError(_unknown(k, list(known)))
            values[f.name] = _coerce(k, str(f.type), v)
        node = cls(**values, simulated=simulated)
        if not simulated and not node.data_path:
            raise ConfigError(
                "node-config 'data-path' is missing: a real site names its own data, e.g. "
                "--node-config 'data-path=\"/data/site.csv\"' (no data-path is only for "
                "simulated sites, which the simulation marks itself)")
        if simulated and not node.data_path and (node.partition_id is None
                                                 or node.num_partitions is None):
            raise ConfigError("a simulated site needs node-config 'partition-id' and "
                              "'num-partitions' (set by Flower's Simulation Engine).")
        return node

    # ---------------------------------------------------------------- writing
    def to_dict(self) -> dict[str, Any]:
        """The keys that are set (what a SuperNode's node config would hold)."""
        return {_key(f.name): getattr(self, f.name) for f in fields(self)
                if f.name != "simulated" and getattr(self, f.name) is not None}

    def write_toml(self, path: str | Path) -> Path:
        """Write the node config as a TOML file for ``flower-supernode --node-config
        FILE.toml``: any path, quotes and spaces included, survives (the ``key=value``
        form cannot carry a value holding both kinds of quote)."""
        p = Path(path)
        if p.suffix != ".toml":
            raise ConfigError(f"a node config file must end in .toml. Found {p.name!r}.")
        p.write_text(tomli_w.dumps(self.to_dict()), encoding="utf-8")
        return p

    @property
    def name(self) -> str:
        """The site's name: ``site-name``, else ``site-<partition-id>``, else ``""``."""
        if self.site_name:
            return self.site_name
        return site_name(self.partition_id) if self.partition_id is not None else ""


def _unknown(key: str, known: list[str]) -> str:
    norm = re.sub(r"(?<=[a-z0-9])([A-Z])", r"-\1", key).replace("_", "-").lower()
    close = difflib.get_close_matches(norm, known, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return (f"unknown node-config key {key!r}{hint}: the site refuses to run on a node "
            f"config it cannot read. Known keys: {', '.join(sorted(known))}.")


def _coerce(key: str, typ: str, v: Any) -> Any:
    """One value of the type its field declares (TOML and ``key=value`` both arrive
    typed; strings are not converted: ``max-epsilon="1"`` is refused)."""
    if "bool" in typ:
        if isinstance(v, bool):
            return v
        if isinstance(v, str) and v in ("true", "false"):
            return v == "true"
        raise ConfigError(f"node-config {key!r} must be true or false. Found {v!r}.")
    if "float" in typ:
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
            return float(v)
        raise ConfigError(f"node-config {key!r} must be a finite number. Found {v!r}.")
    if "int" in typ:
        if isinstance(v, int) and not isinstance(v, bool):
            return v
        raise ConfigError(f"node-config {key!r} must be an integer. Found {v!r}.")
    if isinstance(v, str):
        return v
    raise ConfigError(f"node-config {key!r} must be a string. Found {v!r}.")
