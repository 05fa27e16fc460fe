"""Scenario files: a whole simulated federation in one TOML file.

A scenario names the task and its data, the sites (one by one or in groups with
``count``), each site's data partition, compute speed, links, reliability,
privacy limits and behaviour, and the run. ``fedvault simulate SCENARIO.toml``
runs it with the very same ServerApp and ClientApp as a real deployment.

::

    name = "hospitals"
    description = "10 hospitals, two on slow links"

    [data]                       # the data the sites hold between them
    task = "digits"              # built-in task (fedvault tasks)
    partition = "dirichlet"      # default partition of every site: iid | dirichlet
    alpha = 0.5                  # Dirichlet concentration (smaller = more label skew)
    quantity-skew = 0.0          # sigma of log-normal site sizes (0 = equal sizes)
    # data-path = "table.csv"    # a table to split instead of the task's embedded data
    # generate = { rows = 60000, features = 20, classes = 10 }   # or a generated table

    [run]                        # any run-config key (see pyproject.toml; the defaults are
                                 # its defaults: he = false, dp = true), e.g.
    num-server-rounds = 5
    fraction-train = 1.0         # or sites-per-round = N
    min-sites = 3
    dp = true
    he = true
    round-timeout = 600.0        # *simulated* seconds the server waits for replies

    [defaults]                   # every site, unless its group says otherwise
    compute = 2000.0             # examples processed per second
    uplink-mbps = 100.0
    downlink-mbps = 100.0
    latency-ms = 20.0
    dropout = 0.0                # probability of dropping out in a round (when online)
    dropout-mode = "before-training"   # or "mid-upload" (trains, spends epsilon, upload lost)
    availability = 1.0           # probability of being online when a round starts
    max-epsilon = 10.0           # the site's own privacy budget (its node config)
    delta = 1e-5

    [[sites]]                    # a group of sites
    group = "rural"
    count = 2
    uplink-mbps = 10.0
    [[sites]]
    group = "attacker"
    behaviour = "sign-flip"      # honest | label-flip | sign-flip | scale |
    attack-start = 3             # model-replacement | backdoor | free-rider

Sites are numbered ``site-0 … site-(N-1)`` in file order; site ``K`` holds data
partition ``K`` and, with encryption, federation key ``site-K``. Every error
names the table and key at fault.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from fedvault.errors import ConfigError, TaskError
from fedvault.names import Partitioner, values
from fedvault.partition import PartitionError, PartitionPlan
from fedvault.rundir import write_json_atomic
from fedvault.tasks import get_task
from protocols.config import RunSettings, config_key


class Behaviour(StrEnum):
    """What a simulated site does (the attacks: ``simulations.behaviour.ATTACKS``)."""

    HONEST = "honest"
    LABEL_FLIP = "label-flip"
    SIGN_FLIP = "sign-flip"
    SCALE = "scale"
    MODEL_REPLACEMENT = "model-replacement"
    BACKDOOR = "backdoor"
    FREE_RIDER = "free-rider"


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
    backdoor_target: int = 0
    count: int = 1

    def is_attacker(self) -> bool:
        return self.behaviour != Behaviour.HONEST

    def attacking(self, server_round: int) -> bool:
        return self.is_attacker() and server_round >= self.attack_start


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
            return RunSettings.from_config({**base, **dict(self.run)})
        except ConfigError as exc:
            raise ConfigError(f"{self.source or self.name}: [run] {exc}") from None

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


# --------------------------------------------------------------------------------------
# loading and validation
# --------------------------------------------------------------------------------------
_kebab = config_key
_SITE_FIELDS = {_kebab(f.name): f for f in fields(SiteProfile)}
_DATA_FIELDS = {_kebab(f.name): f for f in fields(DataSpec)}


def check_run_keys(run: Mapping[str, Any], *, src: str) -> None:
    """Refuse [run] keys that a scenario keeps in another table, naming that table."""
    for key in run:
        if key in _RUN_KEYS_ELSEWHERE:
            raise ConfigError(f"{src} [run]: {key!r} is set by {_RUN_KEYS_ELSEWHERE[key]}, "
                              "not in [run] nor on the command line.")


# TOML values arrive typed, so these checks are stricter than RunSettings' _coerce (which
# also takes the strings of Flower's --run-config): "5" is not a number here.
def _num(where: str, key: str, v: Any, *, integer: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{where} {key!r} must be {kind}. Found {v!r}.")
    if integer and not float(v).is_integer():
        raise ConfigError(f"{where} {key!r} must be an integer. Found {v!r}.")
    if not math.isfinite(float(v)):
        raise ConfigError(f"{where} {key!r} must be finite. Found {v!r}.")
    return float(v)


def _site_value(where: str, key: str, v: Any) -> Any:
    f = _SITE_FIELDS[key]
    t = str(f.type)
    if t == "str":
        if not isinstance(v, str):
            raise ConfigError(f"{where} {key!r} must be a string. Found {v!r}.")
        return v
    if t == "int":
        return int(_num(where, key, v, integer=True))
    if t == "float":
        return _num(where, key, v)
    # labels
    if not isinstance(v, list) or not v:
        raise ConfigError(f"{where} {key!r} must be a non-empty list of labels. Found {v!r}.")
    return tuple(int(_num(where, key, x, integer=True)) for x in v)


def _check_site(where: str, p: SiteProfile, num_classes: int) -> None:
    def bad(key: str, rule: str, v: Any) -> ConfigError:
        return ConfigError(f"{where} {key!r} must be {rule}. Found {v!r}.")

    for key in ("compute", "uplink_mbps", "downlink_mbps", "max_epsilon"):
        if not getattr(p, key) > 0:
            raise bad(_kebab(key), "> 0", getattr(p, key))
    if p.latency_ms < 0:
        raise bad("latency-ms", ">= 0", p.latency_ms)
    if not 0 <= p.dropout <= 1:
        raise bad("dropout", "a probability in [0, 1]", p.dropout)
    if not 0 < p.availability <= 1:
        raise bad("availability", "a probability in (0, 1]", p.availability)
    if not 0 < p.delta < 1:
        raise bad("delta", "in (0, 1)", p.delta)
    if p.min_noise_multiplier < 0:
        raise bad("min-noise-multiplier", ">= 0", p.min_noise_multiplier)
    if p.dropout_mode not in DROPOUT_MODES:
        raise bad("dropout-mode", f"one of {', '.join(DROPOUT_MODES)}", p.dropout_mode)
    if p.partition and p.partition not in PARTITIONS:
        raise bad("partition", f"one of {', '.join(PARTITIONS)}", p.partition)
    if p.alpha < 0:
        raise bad("alpha", "> 0", p.alpha)
    if not p.quantity > 0:
        raise bad("quantity", "> 0", p.quantity)
    if p.behaviour not in BEHAVIOURS:
        raise bad("behaviour", f"one of {', '.join(BEHAVIOURS)}", p.behaviour)
    if p.attack_start < 1:
        raise bad("attack-start", ">= 1", p.attack_start)
    if p.attack_scale < 0:
        raise bad("attack-scale", ">= 0 (0 = the behaviour's default)", p.attack_scale)
    if p.count < 1:
        raise bad("count", ">= 1", p.count)
    for lab in p.labels:
        if num_classes and not 0 <= lab < num_classes:
            raise bad("labels", f"labels in [0, {num_classes - 1}]", list(p.labels))
    if num_classes and not 0 <= p.backdoor_target < num_classes:
        raise bad("backdoor-target", f"a label in [0, {num_classes - 1}]", p.backdoor_target)


def _check_keys(where: str, table: Mapping[str, Any], known: Mapping[str, Any]) -> None:
    for key in table:
        if key not in known:
            raise ConfigError(f"{where}: unknown key {key!r}. Known keys: "
                              f"{', '.join(sorted(known))}.")


def parse_scenario(doc: Mapping[str, Any], *, source: str = "") -> Scenario:
    """Validate a parsed TOML document; every error names the table and key."""
    src = source or "scenario"
    top = {"name", "description", "data", "run", "defaults", "sites"}
    _check_keys(src, doc, dict.fromkeys(top))
    name = doc.get("name", Path(source).stem if source else "scenario")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{src}: 'name' must be a non-empty string. Found {name!r}.")
    description = doc.get("description", "")
    if not isinstance(description, str):
        raise ConfigError(f"{src}: 'description' must be a string.")

    raw_data = doc.get("data", {})
    if not isinstance(raw_data, dict):
        raise ConfigError(f"{src}: [data] must be a table.")
    _check_keys(f"{src} [data]", raw_data, _DATA_FIELDS)
    dkw: dict[str, Any] = {}
    for key, v in raw_data.items():
        f = _DATA_FIELDS[key]
        if key == "generate":
            if not isinstance(v, dict):
                raise ConfigError(f"{src} [data] 'generate' must be a table "
                                  "{ rows = N, features = F, classes = C }.")
            _check_keys(f"{src} [data] generate", v, dict.fromkeys(("rows", "features",
                                                                    "classes")))
            try:
                gen = tuple(int(_num(f"{src} [data] generate", k, v[k], integer=True))
                            for k in ("rows", "features", "classes"))
            except KeyError as exc:
                raise ConfigError(f"{src} [data] generate needs {exc.args[0]!r}.") from None
            if gen[0] < 10 or gen[1] < 2 or gen[2] < 2:
                raise ConfigError(f"{src} [data] generate needs rows >= 10, features >= 2 "
                                  f"and classes >= 2. Found {dict(v)!r}.")
            dkw["generate"] = gen
        elif str(f.type) == "str":
            if not isinstance(v, str):
                raise ConfigError(f"{src} [data] {key!r} must be a string. Found {v!r}.")
            dkw[f.name] = v
        else:
            dkw[f.name] = _num(f"{src} [data]", key, v)
    data = DataSpec(**dkw)
    if data.partition not in PARTITIONS:
        raise ConfigError(f"{src} [data] 'partition' must be one of {', '.join(PARTITIONS)}. "
                          f"Found {data.partition!r}.")
    if not data.alpha > 0:
        raise ConfigError(f"{src} [data] 'alpha' must be > 0. Found {data.alpha!r}.")
    if data.quantity_skew < 0:
        raise ConfigError(f"{src} [data] 'quantity-skew' must be >= 0. "
                          f"Found {data.quantity_skew!r}.")
    if data.generate and data.data_path:
        raise ConfigError(f"{src} [data]: set 'data-path' or 'generate', not both.")
    if data.generate and data.task != "tabular":
        raise ConfigError(f"{src} [data]: 'generate' makes a table for task 'tabular'. "
                          f"Found task {data.task!r}.")
    try:
        task = get_task(data.task)
    except TaskError as exc:
        raise ConfigError(f"{src} [data] 'task': {exc}") from None

    run = doc.get("run", {})
    if not isinstance(run, dict):
        raise ConfigError(f"{src}: [run] must be a table.")
    check_run_keys(run, src=src)
    run = dict(run)
    per_round = run.pop("sites-per-round", None)
    if per_round is not None:
        per_round = int(_num(f"{src} [run]", "sites-per-round", per_round, integer=True))
        if "fraction-train" in run:
            raise ConfigError(f"{src} [run]: set 'sites-per-round' or 'fraction-train', "
                              "not both.")

    defaults = doc.get("defaults", {})
    if not isinstance(defaults, dict):
        raise ConfigError(f"{src}: [defaults] must be a table.")
    site_keys = {k: None for k in _SITE_FIELDS if k != "count"}
    _check_keys(f"{src} [defaults]", defaults, site_keys)
    base = {_SITE_FIELDS[k].name: _site_value(f"{src} [defaults]", k, v)
            for k, v in defaults.items()}

    groups_raw = doc.get("sites")
    if not isinstance(groups_raw, list) or not groups_raw:
        raise ConfigError(f"{src}: needs at least one [[sites]] group.")
    # [run] values are checked now (a bad one is named before anything else runs)
    provisional = Scenario(name=name, data=data, run=dict(run), source=source)
    run_settings = provisional.settings(run_dir="/tmp/check")
    if data.generate:
        rows, features, n_classes = data.generate
        for key, want in (("num-features", features), ("num-classes", n_classes)):
            if run.get(key) not in (None, 0, want):
                raise ConfigError(f"{src} [run] {key!r} = {run[key]!r} contradicts [data] "
                                  f"generate ({want}); leave it out.")
        if n_classes > 2 ** informative_features(features):
            raise ConfigError(f"{src} [data] generate: {n_classes} classes need more "
                              f"features than {features} (at most "
                              f"{2 ** informative_features(features)} classes).")
        if rows < 5 * n_classes:
            raise ConfigError(f"{src} [data] generate: {rows} rows are too few for "
                              f"{n_classes} classes (at least {5 * n_classes}).")
    classes = (data.generate[2] if data.generate else run_settings.num_classes or
               (task.default_num_classes if not data.data_path else 0))
    groups: list[SiteProfile] = []
    for i, g in enumerate(groups_raw):
        where = f"{src} [[sites]] #{i + 1}"
        if not isinstance(g, dict):
            raise ConfigError(f"{where} must be a table.")
        _check_keys(where, g, _SITE_FIELDS)
        kw = dict(base)
        kw.update({_SITE_FIELDS[k].name: _site_value(where, k, v) for k, v in g.items()})
        kw.setdefault("group", f"group-{i + 1}")
        profile = SiteProfile(**kw)
        _check_site(where, profile, classes)
        groups.append(profile)
    if per_round is not None:
        n = sum(g.count for g in groups)
        lo = run_settings.min_sites
        if not lo <= per_round <= n:
            raise ConfigError(f"{src} [run] 'sites-per-round' must be in [{lo}, {n}] "
                              f"(min-sites to the scenario's sites). Found {per_round}.")
        # Flower samples int(fraction * sites); the half keeps float error from
        # rounding the count down.
        run["fraction-train"] = min(1.0, (per_round + 0.5) / n)
    scenario = Scenario(name=name, description=description, data=data, run=dict(run),
                        groups=tuple(groups), source=source)
    if scenario.num_sites > MAX_SITES:
        raise ConfigError(f"{src}: {scenario.num_sites} sites exceed the limit of {MAX_SITES}.")
    return scenario


def informative_features(features: int) -> int:
    """Informative columns of a generated table (the rest are noise)."""
    return max(2, min(features, features // 2 + 1))


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
    try:
        st = Path(path).stat()
    except OSError as exc:
        raise ConfigError(f"cannot read the run's scenario {path!r}: {exc}") from exc
    return _load_compiled(path, st.st_mtime_ns, st.st_size)


@lru_cache(maxsize=4)
def _load_compiled(path: str, mtime_ns: int, size: int) -> Scenario:
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the run's scenario {path!r}: {exc}") from exc
    d = dict(doc["data"])
    d["generate"] = tuple(d.get("generate") or ())
    groups = tuple(SiteProfile(**{**g, "labels": tuple(g["labels"])}) for g in doc["groups"])
    return Scenario(name=doc["name"], description=doc["description"], data=DataSpec(**d),
                    run=doc["run"], groups=groups, source=path)
