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
from dataclasses import dataclass, fields
from typing import Any

from fedvault.errors import ConfigError

ConfigValue = bool | int | float | str


def config_key(field_name: str) -> str:
    """The kebab-case key of a snake_case field (``num_server_rounds`` -> ``num-server-rounds``)."""
    return field_name.replace("_", "-")


@dataclass(frozen=True, slots=True, kw_only=True)
class RunSettings:
    """Validated run configuration (keys are the kebab-case field names)."""

    task: str = "digits"
    num_server_rounds: int = 5
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_sites: int = 3
    local_epochs: int = 8
    batch_size: int = 256
    learning_rate: float = 0.3
    momentum: float = 0.9
    seed: int = 0
    run_dir: str = ""
    num_features: int = 0
    num_classes: int = 0
    label_column: str = ""
    data_path: str = ""
    partitioner: str = "dirichlet"
    alpha: float = 0.5
    central_eval: bool = True
    round_timeout: float = 600.0
    # -- differential privacy (sample-level DP-SGD at every site) --
    dp: bool = True
    noise_multiplier: float = 0.0
    target_epsilon: float = 8.0
    max_grad_norm: float = 1.0
    dp_delta: float = 1e-5
    accountant: str = "prv"
    secure_mode: bool = True
    # -- client-level DP (DP-FedAvg at the server, accounted in a server-side ledger) --
    client_dp: bool = False
    client_dp_noise_multiplier: float = 1.0
    client_dp_clipping_norm: float = 1.0
    client_dp_delta: float = 1e-5
    client_dp_max_epsilon: float = 10.0
    federation: str = "default"
    # -- encrypted aggregation (TenSEAL) --
    he: bool = False
    he_federation: str = ""
    he_weight_unit: int = 16
    # -- policy of *simulated* sites (a real site's own node config always wins) --
    site_max_epsilon: float = 10.0
    site_delta: float = 1e-5
    site_min_noise_multiplier: float = 0.5
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
        if self.partitioner not in ("iid", "dirichlet"):
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
        if self.he_weight_unit < 1:
            raise ConfigError(f"he-weight-unit must be >= 1. Found {self.he_weight_unit}.")
        if self.accountant not in ("prv", "rdp"):
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
