"""Scenario TOML to a validated :class:`~simulations.scenario.spec.Scenario`;
every error names the table and key at fault."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from fedvault_tasks.tasks import get_task
from protocols.config import config_key
from protocols.errors import ConfigError, TaskError
from simulations.scenario.spec import (
    BEHAVIOURS,
    DROPOUT_MODES,
    MAX_SITES,
    PARTITIONS,
    DataSpec,
    Scenario,
    SiteProfile,
    check_run_keys,
)

_kebab = config_key
_SITE_FIELDS = {_kebab(f.name): f for f in fields(SiteProfile)}
_DATA_FIELDS = {_kebab(f.name): f for f in fields(DataSpec)}


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
    if p.attack_rounds < 0:
        raise bad("attack-rounds", ">= 0 (0 = until the end)", p.attack_rounds)
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


