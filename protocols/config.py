"""The run configuration: what the central team chooses for a run.

The same keys, with the same defaults, are documented in ``pyproject.toml``
under ``[tool.flwr.app.config]`` (a test checks they agree). ``flwr run`` hands
them to the ServerApp and ClientApp as ``context.run_config``; ``fedvault
simulate`` passes them as overrides to the same apps.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from protocols.errors import ConfigError
from protocols.names import AccountantName, Partitioner, values

ConfigValue = bool | int | float | str


def option(default: Any, flag: str, help: str, *, group: str = "run") -> Any:
    """A run-config field that the command line also offers, as ``flag`` (one source:
    the ``simulate``/``rehearse`` options are generated from this metadata)."""
    return field(default=default, metadata={"flag": flag, "help": help, "group": group})


def cli_options() -> list[tuple[str, str, type, str, str]]:
    """(flag, field name, type, help, group) of every run-config field the command
    line offers, in declaration order."""
    types = {"int": int, "float": float, "str": str}
    out = []
    for f in fields(RunSettings):
        if "flag" in f.metadata:
            out.append((f.metadata["flag"], f.name, types[str(f.type)], f.metadata["help"],
                        f.metadata["group"]))
    return out


def config_key(field_name: str) -> str:
    """The kebab-case key of a snake_case field (``num_server_rounds`` -> ``num-server-rounds``)."""
    return field_name.replace("_", "-")


@dataclass(frozen=True, slots=True, kw_only=True)
class RunSettings:
    """Validated run configuration (keys are the kebab-case field names)."""

    task: str = option("digits", "--task", "built-in task (see `fedvault tasks`)", group="run")
    num_server_rounds: int = option(5, "--rounds", "federated rounds", group="run")
    fraction_train: float = option(
        1.0, "--fraction-train",
        "fraction of sites sampled per round",
        group="run")
    fraction_evaluate: float = 1.0
    min_sites: int = option(
        3, "--min-sites",
        "fewest valid updates that form an aggregate",
        group="run")
    local_epochs: int = option(8, "--local-epochs", "local epochs per round", group="run")
    batch_size: int = option(256, "--batch-size", "local mini-batch size", group="run")
    learning_rate: float = option(0.3, "--lr", "local SGD learning rate", group="run")
    momentum: float = option(0.9, "--momentum", "local SGD momentum", group="run")
    seed: int = option(0, "--seed", "seed of model init, splits and sampling", group="run")
    run_dir: str = ""
    num_features: int = option(
        0, "--num-features",
        "model input width (0 = task default)",
        group="run")
    num_classes: int = option(
        0, "--num-classes",
        "number of classes (0 = task default)",
        group="run")
    label_column: str = option("", "--label-column", "label column of --data-path", group="run")
    data_path: str = option(
        "", "--data-path",
        "a CSV/Parquet/NPZ table to split across the sites (default: the task's embedded data)",
        group="run")
    partitioner: str = option(
        "dirichlet", "--partition",
        "how data is split across sites: iid | dirichlet",
        group="run")
    alpha: float = option(
        0.5, "--alpha",
        "Dirichlet concentration; smaller = more label skew",
        group="run")
    central_eval: bool = True
    central_test_path: str = option(
        "", "--central-test-path",
        "the central team's own test table (CSV/Parquet/NPZ with the label column); a "
        "deployment evaluates centrally only on it",
        group="run")
    round_timeout: float = option(
        600.0, "--round-timeout",
        "seconds to wait for replies in a round",
        group="run")
    # -- differential privacy (sample-level DP-SGD at every site) --
    dp: bool = True
    noise_multiplier: float = option(
        0.0, "--noise-multiplier",
        "fixed noise multiplier instead of --target-epsilon (0 = calibrate)",
        group="dp")
    target_epsilon: float = option(
        8.0, "--target-epsilon",
        "epsilon this run may spend at each site (noise is calibrated per site)",
        group="dp")
    max_grad_norm: float = option(1.0, "--max-grad-norm", "per-example clipping norm", group="dp")
    dp_delta: float = option(1e-5, "--delta", "delta the run asks for", group="dp")
    accountant: str = option("prv", "--accountant", "prv (tight) | rdp", group="dp")
    secure_mode: bool = True
    # -- client-level DP (DP-FedAvg at the server, accounted in a server-side ledger) --
    client_dp: bool = False
    client_dp_noise_multiplier: float = option(
        1.0, "--client-dp-noise",
        "client-level DP: noise multiplier per release",
        group="dp")
    client_dp_clipping_norm: float = option(
        1.0, "--client-dp-clip",
        "client-level DP: L2 bound of a site's model update",
        group="dp")
    client_dp_delta: float = 1e-5
    client_dp_max_epsilon: float = option(
        10.0, "--client-dp-max-epsilon",
        "client-level DP: central epsilon budget of the server ledger",
        group="dp")
    federation: str = "default"
    # -- encrypted aggregation (TenSEAL) --
    he: bool = False
    he_federation: str = ""
    # FedAvg weights under HE: each site's example count, exact up to the round's weight
    # scale; 0 (default): the largest count accepted in the previous round (256 in round 1)
    he_weight_scale: int = 0
    # refuse a decrypted global model whose change from the last one this site accepted
    # has an L2 norm above this factor times that model's norm (0 = no such check)
    he_max_change: float = 4.0
    # -- what a reply may claim (server-side validation, server/validation.py) --
    max_examples_per_site: int = option(
        1_000_000, "--max-examples-per-site",
        "largest example count a site's reply may claim (a larger one is rejected)",
        group="run")
    max_weight_share: float = option(
        0.5, "--max-weight-share",
        "largest share of the FedAvg weight one site may take (capped, not rejected)",
        group="run")
    # -- policy of *simulated* sites (a real site's own node config always wins) --
    site_max_epsilon: float = option(
        10.0, "--site-max-epsilon",
        "each site's total epsilon budget (simulated sites / rehearsal node config)",
        group="dp")
    site_delta: float = option(1e-5, "--site-delta", "each site's delta", group="dp")
    site_min_noise_multiplier: float = option(
        0.5, "--site-min-noise",
        "each site refuses rounds with less noise than this",
        group="dp")
    site_release_eval_metrics: bool = True
    # -- simulation only: the bounds the simulated data owners declare for their features
    # ("LOW:HIGH" for every feature, or a JSON file with "low" and "high" lists)
    feature_bounds: str = ""
    # -- simulation only: the compiled scenario (RUN_DIR/scenario.json) of `fedvault simulate`
    scenario: str = ""

    def __post_init__(self) -> None:
        if self.num_server_rounds < 1:
            raise ConfigError(f"num-server-rounds must be >= 1. Found {self.num_server_rounds}.")
        for name in ("fraction_train", "fraction_evaluate"):
            v = getattr(self, name)
            if not 0.0 < v <= 1.0:
                raise ConfigError(f"{config_key(name)} must be in (0, 1]. Found {v}.")
        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0. Found {self.seed}.")
        if self.min_sites < 1:
            raise ConfigError(f"min-sites must be >= 1. Found {self.min_sites}.")
        if self.local_epochs < 1:
            raise ConfigError(f"local-epochs must be >= 1. Found {self.local_epochs}.")
        if self.batch_size < 1:
            raise ConfigError(f"batch-size must be >= 1. Found {self.batch_size}.")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ConfigError(f"learning-rate must be > 0. Found {self.learning_rate}.")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"momentum must be in [0, 1). Found {self.momentum}.")
        if self.num_features < 0 or self.num_classes < 0:
            raise ConfigError(
                "num-features and num-classes must be >= 0 (0 = the task's default). "
                f"Found {self.num_features} and {self.num_classes}."
            )
        if self.partitioner not in values(Partitioner):
            raise ConfigError(
                f"partitioner must be 'iid' or 'dirichlet'. Found {self.partitioner!r}."
            )
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ConfigError(f"alpha must be > 0. Found {self.alpha}.")
        if not self.round_timeout > 0:
            raise ConfigError(f"round-timeout must be > 0. Found {self.round_timeout}.")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise ConfigError(
                f"noise-multiplier must be >= 0 (0 = calibrate to target-epsilon). "
                f"Found {self.noise_multiplier}.")
        for name in ("target_epsilon", "max_grad_norm", "site_max_epsilon"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ConfigError(f"{config_key(name)} must be > 0. Found {v}.")
        for name in ("dp_delta", "site_delta"):
            v = getattr(self, name)
            if not 0 < v < 1:
                raise ConfigError(f"{config_key(name)} must be in (0, 1). Found {v}.")
        for name in ("client_dp_noise_multiplier", "client_dp_clipping_norm",
                     "client_dp_max_epsilon"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ConfigError(f"{config_key(name)} must be > 0. Found {v}.")
        if not 0 < self.client_dp_delta < 1:
            raise ConfigError(f"client-dp-delta must be in (0, 1). Found {self.client_dp_delta}.")
        if self.he and self.client_dp:
            raise ConfigError("client-dp needs the plaintext updates at the server; it cannot "
                              "be combined with he = true (use sample-level DP with HE).")
        if not 1 <= self.max_examples_per_site <= 10**12:
            raise ConfigError(f"max-examples-per-site must be in [1, 1e12]. "
                              f"Found {self.max_examples_per_site}.")
        if not 0 < self.max_weight_share <= 1:
            raise ConfigError(f"max-weight-share must be in (0, 1]. "
                              f"Found {self.max_weight_share}.")
        if not (math.isfinite(self.he_max_change) and self.he_max_change >= 0):
            raise ConfigError(f"he-max-change must be >= 0 (0 = off). "
                              f"Found {self.he_max_change}.")
        if self.he_weight_scale < 0:
            raise ConfigError(f"he-weight-scale must be >= 0 (0: adaptive). "
                              f"Found {self.he_weight_scale}.")
        if self.accountant not in values(AccountantName):
            raise ConfigError(f"accountant must be 'prv' or 'rdp'. Found {self.accountant!r}.")
        if not self.site_min_noise_multiplier >= 0:
            raise ConfigError(f"site-min-noise-multiplier must be >= 0. "
                              f"Found {self.site_min_noise_multiplier}.")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> RunSettings:
        """Build from a Flower ``UserConfig`` (kebab-case keys), rejecting unknown keys
        and values of the wrong type with a message naming the key."""
        known = {config_key(f.name): f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in config.items():
            if key not in known:
                raise ConfigError(
                    f"Unknown run-config key {key!r}. Known keys: {', '.join(sorted(known))}."
                )
            f = known[key]
            kwargs[f.name] = _coerce(key, value, f.type)
        return cls(**kwargs)

    def to_config(self) -> dict[str, ConfigValue]:
        """The kebab-case mapping Flower carries as ``run_config``."""
        return {config_key(f.name): getattr(self, f.name) for f in fields(self)}

    def replace(self, **changes: Any) -> RunSettings:
        return dataclasses.replace(self, **changes)


def _coerce(key: str, value: Any, type_name: Any) -> ConfigValue:
    t = str(type_name)
    if t == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"run-config {key!r} must be true or false. Found {value!r}.")
    if t == "int":
        if isinstance(value, bool):
            raise ConfigError(f"run-config {key!r} must be an integer. Found {value!r}.")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"run-config {key!r} must be an integer. Found {value!r}.")
    if t == "float":
        if isinstance(value, bool):
            raise ConfigError(f"run-config {key!r} must be a number. Found {value!r}.")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"run-config {key!r} must be a number. Found {value!r}.") from None
    if not isinstance(value, str):
        raise ConfigError(f"run-config {key!r} must be a string. Found {value!r}.")
    return value
