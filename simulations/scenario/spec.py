"""The scenario model: sites, data and run of a simulated federation (validated
values; :mod:`.parse` makes them from TOML, :mod:`.store` loads and saves them)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np

from fedvault_tasks.partition import PartitionError, PartitionPlan
from protocols.config import RunSettings
from protocols.errors import ConfigError
from protocols.names import Partitioner, values


class Behaviour(StrEnum):
    """What a simulated site does (the attacks: ``simulations.behaviour.ATTACKS``)."""

    HONEST = "honest"
    LABEL_FLIP = "label-flip"
    SIGN_FLIP = "sign-flip"
    SCALE = "scale"
    MODEL_REPLACEMENT = "model-replacement"
    BACKDOOR = "backdoor"
    FREE_RIDER = "free-rider"
    # hostile replies (simulations.hostile): malformed or lying messages, not poisoning
    SHAPE_LIE = "shape-lie"
    NON_FINITE = "non-finite-metrics"
    EXTRA_RECORDS = "extra-records"
    INFLATED = "inflated-examples"
    OVERSIZE = "oversize"
    DUPLICATE = "duplicate-replies"
    REPLAY = "replay"
    RAW_SLOTS = "raw-slots"
    WEIGHT_LIE = "weight-lie"
    FOREIGN_KEY = "foreign-key"


#: behaviours that only exist with encrypted aggregation (they forge ciphertexts)
HE_ONLY = frozenset({Behaviour.RAW_SLOTS, Behaviour.WEIGHT_LIE, Behaviour.FOREIGN_KEY})


class DropoutMode(StrEnum):
    """When a dropping site drops: before training, or after (its upload is lost)."""

    BEFORE_TRAINING = "before-training"
    MID_UPLOAD = "mid-upload"


#: What a site may do.
BEHAVIOURS = values(Behaviour)
DROPOUT_MODES = values(DropoutMode)
PARTITIONS = values(Partitioner)
#: Upper bound on the number of sites in one scenario (a sanity limit, not a design one).
MAX_SITES = 100_000

#: run-config keys a scenario's [run] table may not set (they live elsewhere).
_RUN_KEYS_ELSEWHERE = {
    "task": "[data] task", "data-path": "[data] data-path",
    "label-column": "[data] label-column", "partitioner": "[data] partition",
    "alpha": "[data] alpha", "run-dir": "--out", "scenario": "(set by the runner)",
    "site-max-epsilon": "[defaults] max-epsilon", "site-delta": "[defaults] delta",
    "site-min-noise-multiplier": "[defaults] min-noise-multiplier",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class SiteProfile:
    """One simulated site: data, hardware, links, reliability, privacy and behaviour."""

    group: str = "site"
    compute: float = 2000.0
    uplink_mbps: float = 100.0
    downlink_mbps: float = 100.0
    latency_ms: float = 20.0
    dropout: float = 0.0
    dropout_mode: str = "before-training"
    availability: float = 1.0
    max_epsilon: float = 10.0
    delta: float = 1e-5
    min_noise_multiplier: float = 0.5
    partition: str = ""  # "" = [data] partition
    alpha: float = 0.0  # 0 = [data] alpha
    quantity: float = 1.0
    labels: tuple[int, ...] = ()
    behaviour: str = "honest"
    attack_start: int = 1
    attack_scale: float = 0.0  # 0 = the behaviour's default
    attack_rounds: int = 0  # 0 = from attack-start to the end
    backdoor_target: int = 0
    count: int = 1

    def is_attacker(self) -> bool:
        return self.behaviour != Behaviour.HONEST

    def attacking(self, server_round: int) -> bool:
        return (self.is_attacker() and server_round >= self.attack_start
                and (self.attack_rounds == 0
                     or server_round < self.attack_start + self.attack_rounds))


@dataclass(frozen=True, slots=True, kw_only=True)
class DataSpec:
    task: str = "digits"
    data_path: str = ""
    label_column: str = ""
    partition: str = "dirichlet"
    alpha: float = 0.5
    quantity_skew: float = 0.0
    generate: tuple[int, ...] = ()  # (rows, features, classes) of a generated table


@dataclass(frozen=True, slots=True, kw_only=True)
class Scenario:
    """A validated scenario. ``groups`` keep the file's grouping; :meth:`site` expands."""

    name: str
    description: str = ""
    data: DataSpec = field(default_factory=DataSpec)
    run: Mapping[str, Any] = field(default_factory=dict)
    groups: tuple[SiteProfile, ...] = ()
    source: str = ""

    @property
    def num_sites(self) -> int:
        return sum(g.count for g in self.groups)

    def site(self, k: int) -> SiteProfile:
        """The profile of site ``k`` (0-based), without expanding every site."""
        if not 0 <= k < self.num_sites:
            raise ConfigError(f"site index must be in [0, {self.num_sites - 1}]. Found {k}.")
        for g in self.groups:
            if k < g.count:
                return g
            k -= g.count
        raise AssertionError("unreachable")  # pragma: no cover

    def roles(self) -> dict[str, int]:
        """Number of sites per behaviour."""
        out: dict[str, int] = {}
        for g in self.groups:
            out[g.behaviour] = out.get(g.behaviour, 0) + g.count
        return out

    def settings(self, *, run_dir: str, scenario_path: str = "") -> RunSettings:
        """The run configuration this scenario asks for."""
        d = self.data
        base: dict[str, Any] = {
            "task": d.task, "data-path": d.data_path,
            "label-column": d.label_column, "partitioner": d.partition, "alpha": d.alpha,
            "run-dir": run_dir, "scenario": scenario_path,
        }
        if d.generate:
            base["num-features"], base["num-classes"] = d.generate[1], d.generate[2]
        try:
            settings = RunSettings.from_config({**base, **dict(self.run)})
        except ConfigError as exc:
            raise ConfigError(f"{self.source or self.name}: [run] {exc}") from None
        forged = sorted({g.behaviour for g in self.groups if g.behaviour in HE_ONLY})
        if forged and not settings.he:
            raise ConfigError(f"{self.source or self.name}: behaviour {', '.join(forged)} "
                              "forges ciphertexts and needs he = true.")
        return settings

    def partition_plan(self) -> PartitionPlan:
        """How the sites share the pool, one entry per site (what the apps read)."""
        return PartitionPlan(
            kinds=tuple(g.partition or self.data.partition for g in self.groups
                        for _ in range(g.count)),
            alphas=tuple(float(g.alpha or self.data.alpha) for g in self.groups
                         for _ in range(g.count)),
            quantities=tuple(float(g.quantity) for g in self.groups for _ in range(g.count)),
            allowed=tuple(g.labels for g in self.groups for _ in range(g.count)),
            groups=tuple(g.group for g in self.groups for _ in range(g.count)),
            quantity_skew=self.data.quantity_skew)

    def owners(self, labels: np.ndarray, *, seed: int) -> np.ndarray:
        """Owner site of every sample of the federated pool (see ``site_partition``)."""
        try:
            return self.partition_plan().owners(labels, seed=seed)
        except PartitionError as exc:
            raise ConfigError(f"{self.source or self.name}: {exc}") from None

    def with_run(self, overrides: Mapping[str, Any]) -> Scenario:
        """This scenario with some [run] keys overridden (the command line's run
        options), checked like the file's own."""
        check_run_keys(overrides, src=self.source or self.name)
        changed = dataclasses.replace(self, run={**dict(self.run), **dict(overrides)})
        changed.settings(run_dir="/tmp/check")  # a bad value is named now
        return changed

    def to_json(self) -> dict[str, Any]:
        return {"format": "fedvault.scenario/1", "name": self.name,
                "description": self.description, "data": asdict(self.data),
                "run": dict(self.run), "groups": [asdict(g) for g in self.groups]}

    def fingerprint(self) -> str:
        blob = json.dumps(self.to_json(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()


def check_run_keys(run: Mapping[str, Any], *, src: str) -> None:
    """Refuse [run] keys that a scenario keeps in another table, naming that table."""
    for key in run:
        if key in _RUN_KEYS_ELSEWHERE:
            raise ConfigError(f"{src} [run]: {key!r} is set by {_RUN_KEYS_ELSEWHERE[key]}, "
                              "not in [run] nor on the command line.")
