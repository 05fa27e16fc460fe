"""Every message between the server and a site, as one frozen type each, used by the
side that writes it and the side that reads it alike (``to_record`` / ``from_content``).
No record name or config key of these messages is spelled anywhere else.

=================  ============  =============================================  ===========
message            direction     records                                        type
=================  ============  =============================================  ===========
train request      server→site   ``config`` (+ ``arrays`` or ``he-global``)     TrainConfig
train reply        site→server   ``metrics``, ``arrays`` or ``he-update``,       TrainMetrics,
                                 optional ``privacy``                           ReplyPrivacy
refusal            site→server   ``refusal``                                    Refusal
global refused     site→server   ``global-refused``                             GlobalRefused
evaluate request   server→site   ``config`` (+ the global model)                EvalConfig
evaluate reply     site→server   ``metrics``                                    EvalMetrics
declined           site→server   ``declined``                                   Declined
=================  ============  =============================================  ===========

The encrypted payloads (``he-update``, ``he-global``) are
:mod:`protocols.he_update`'s. A reader checks what it will *use*, not what is
declared: exactly the records of the message's kind (:class:`Shape`), and every field
typed and in range; a bad field raises :class:`~protocols.errors.UpdateRejected`
at the server, which rejects that site's reply alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from flwr.app import ConfigRecord, MetricRecord, RecordDict

from protocols.errors import ConfigError, UpdateRejected

T = TypeVar("T")

# -- record names -------------------------------------------------------------------------
CONFIG = "config"
ARRAYS = "arrays"
METRICS = "metrics"
PRIVACY = "privacy"
REFUSAL = "refusal"
GLOBAL_REFUSED = "global-refused"
DECLINED = "declined"
HE_UPDATE = "he-update"
HE_GLOBAL = "he-global"
#: the evaluation metrics' names (in a reply and in the averaged round metrics)
EVAL_LOSS = "eval-loss"
EVAL_ACC = "eval-acc"

#: Longest free text (reasons, names) taken from a reply.
MAX_TEXT = 300
MAX_STEPS = 10**9
MAX_VERSION = 10**9


# -- the records a message carries --------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Shape:
    """The records one kind of reply carries: required and optional names per kind."""

    arrays: frozenset[str] = frozenset()
    metrics: frozenset[str] = frozenset()
    configs: frozenset[str] = frozenset()
    optional_configs: frozenset[str] = frozenset()

    def check(self, content: RecordDict, what: str) -> None:
        got = {"ArrayRecord": set(content.array_records.keys()),
               "MetricRecord": set(content.metric_records.keys()),
               "ConfigRecord": set(content.config_records.keys())}
        want = {"ArrayRecord": (self.arrays, frozenset()),
                "MetricRecord": (self.metrics, frozenset()),
                "ConfigRecord": (self.configs, self.optional_configs)}
        for kind, names in got.items():
            required, optional = want[kind]
            missing = sorted(required - names)
            extra = sorted(names - required - optional)
            if missing or extra:
                raise UpdateRejected(
                    f"{what} must carry {kind}s {sorted(required)}"
                    + (f" (optionally {sorted(optional)})" if optional else "")
                    + f"; missing {show_names(missing)}, unexpected {show_names(extra)}")


def show_names(names: Sequence[str]) -> str:
    """At most three names, each cut to 40 characters, for an error message (a hostile
    reply may send thousands of long ones)."""
    shown = [n[:40] for n in names[:3]]
    return repr(shown) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


PLAIN_TRAIN = Shape(arrays=frozenset({ARRAYS}), metrics=frozenset({METRICS}),
                    optional_configs=frozenset({PRIVACY}))
ENCRYPTED_TRAIN = Shape(metrics=frozenset({METRICS}), configs=frozenset({HE_UPDATE}),
                        optional_configs=frozenset({PRIVACY}))
REFUSAL_SHAPE = Shape(configs=frozenset({REFUSAL}))
GLOBAL_REFUSED_SHAPE = Shape(configs=frozenset({GLOBAL_REFUSED}))
EVALUATION = Shape(metrics=frozenset({METRICS}))
DECLINED_SHAPE = Shape(configs=frozenset({DECLINED}))


# -- typed fields -------------------------------------------------------------------------
def count(rec: Mapping[str, Any], key: str, low: int, high: int, *, what: str) -> int:
    """An ``int`` (not a bool, not a float) in [low, high]."""
    if key not in rec:
        raise UpdateRejected(f"{what} lacks {key!r}")
    v = rec[key]
    if isinstance(v, bool) or not isinstance(v, int):
        raise UpdateRejected(f"{what} {key!r} must be an integer. Found {shown(v)}")
    if not low <= v <= high:
        raise UpdateRejected(f"{what} {key!r} must be in [{low}, {high}]. Found {v}")
    return v


def real(rec: Mapping[str, Any], key: str, low: float, high: float = math.inf, *,
         what: str) -> float:
    """A finite ``int`` or ``float`` in [low, high]."""
    if key not in rec:
        raise UpdateRejected(f"{what} lacks {key!r}")
    v = rec[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise UpdateRejected(f"{what} {key!r} must be a number. Found {shown(v)}")
    f = float(v)
    if not math.isfinite(f):
        raise UpdateRejected(f"{what} {key!r} must be finite. Found {f}")
    if not low <= f <= high:
        raise UpdateRejected(f"{what} {key!r} must be in [{low}, {high}]. Found {f}")
    return f


def text(rec: Mapping[str, Any], key: str, *, what: str, required: bool = True) -> str:
    if key not in rec:
        if required:
            raise UpdateRejected(f"{what} lacks {key!r}")
        return ""
    v = rec[key]
    if not isinstance(v, str):
        raise UpdateRejected(f"{what} {key!r} must be text. Found {shown(v)}")
    return v[:MAX_TEXT]


def optional(rec: Mapping[str, Any], key: str, parse: Callable[[], T]) -> T | None:
    """``parse()`` if ``key`` is present, else ``None`` (an optional field)."""
    return parse() if key in rec else None


def only_keys(rec: Mapping[str, Any], allowed: Iterable[str], *, what: str) -> None:
    extra = sorted(set(rec.keys()) - set(allowed))
    if extra:
        raise UpdateRejected(f"{what} has unexpected fields {show_names(extra)}")


def shown(v: Any) -> str:
    """A value for an error message, cut to 60 characters."""
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


# -- server -> site -----------------------------------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class TrainConfig:
    """The train request's ``config`` record. The server sends the run's local training
    settings; Flower's strategy adds ``server-round``; an encrypted run's strategy adds
    ``he-weight-scale``. A site reads it with the run config's values as defaults."""

    server_round: int = 0
    local_epochs: int
    batch_size: int
    learning_rate: float
    momentum: float
    he_weight_scale: int | None = None

    def to_record(self) -> ConfigRecord:
        """What the server sends (``server-round`` is Flower's to add)."""
        rec = ConfigRecord({"local-epochs": self.local_epochs, "batch-size": self.batch_size,
                            "learning-rate": self.learning_rate, "momentum": self.momentum})
        if self.he_weight_scale is not None:
            rec["he-weight-scale"] = self.he_weight_scale
        return rec

    @staticmethod
    def with_weight_scale(config: ConfigRecord, scale: int) -> ConfigRecord:
        """``config`` with the round's HE weight scale announced in it."""
        return ConfigRecord({**config, "he-weight-scale": scale})

    @classmethod
    def from_content(cls, content: RecordDict, *, defaults: TrainConfig) -> TrainConfig:
        """The request as a site reads it; a field of the wrong type is a
        :class:`~protocols.errors.ConfigError` naming it (a key the server left out
        takes the run config's value)."""
        cfg = content.config_records.get(CONFIG, ConfigRecord())
        return cls(server_round=_int_field(cfg, "server-round", defaults.server_round),
                   local_epochs=_int_field(cfg, "local-epochs", defaults.local_epochs),
                   batch_size=_int_field(cfg, "batch-size", defaults.batch_size),
                   learning_rate=_real_field(cfg, "learning-rate", defaults.learning_rate),
                   momentum=_real_field(cfg, "momentum", defaults.momentum),
                   he_weight_scale=(_int_field(cfg, "he-weight-scale", 0)
                                    if "he-weight-scale" in cfg else None))


@dataclass(frozen=True, slots=True, kw_only=True)
class EvalConfig:
    """The evaluate request's ``config`` record (Flower's ``server-round``)."""

    server_round: int = 0

    @classmethod
    def from_content(cls, content: RecordDict) -> EvalConfig:
        cfg = content.config_records.get(CONFIG, ConfigRecord())
        return cls(server_round=_int_field(cfg, "server-round", 0))


def _int_field(cfg: Mapping[str, Any], key: str, default: int) -> int:
    v = cfg.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(f"the request's {key!r} must be an integer. Found {shown(v)}.")
    return v


def _real_field(cfg: Mapping[str, Any], key: str, default: float) -> float:
    v = cfg.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ConfigError(f"the request's {key!r} must be a finite number. Found {shown(v)}.")
    return float(v)


# -- site -> server: a training reply -----------------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class TrainMetrics:
    """The ``metrics`` record of a training reply (``steps``: the planned count)."""

    num_examples: int
    steps: int | None = None
    train_loss: float | None = None

    def to_record(self) -> MetricRecord:
        rec: dict[str, int | float] = {"num-examples": self.num_examples}
        if self.steps is not None:
            rec["steps"] = self.steps
        if self.train_loss is not None:
            rec["train-loss"] = self.train_loss
        return MetricRecord(rec)  # type: ignore[arg-type]

    def as_dict(self) -> dict[str, float]:
        d: dict[str, float] = {}
        if self.steps is not None:
            d["steps"] = float(self.steps)
        if self.train_loss is not None:
            d["train-loss"] = self.train_loss
        return d

    @classmethod
    def from_content(cls, content: RecordDict, *, max_examples: int) -> TrainMetrics:
        rec = content.metric_records[METRICS]
        what = "train metrics"
        only_keys(rec, ("num-examples", "steps", "train-loss"), what=what)
        return cls(num_examples=count(rec, "num-examples", 1, max_examples, what=what),
                   steps=optional(rec, "steps",
                                  lambda: count(rec, "steps", 0, MAX_STEPS, what=what)),
                   train_loss=optional(rec, "train-loss",
                                       lambda: real(rec, "train-loss", 0.0, what=what)))

    @staticmethod
    def claimed_examples(content: RecordDict) -> tuple[int, int | None] | None:
        """``(num-examples, steps)`` as a reply claims them, unchecked (``None``
        without a metrics record): for the simulator's bookkeeping, never aggregation."""
        rec = content.metric_records.get(METRICS)
        if rec is None:
            return None
        n, steps = rec.get("num-examples", 0), rec.get("steps")
        return int(n), None if steps is None else int(steps)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplyPrivacy:
    """The ``privacy`` record: what a site reports of its privacy after a round."""

    site: str
    epsilon: float
    delta: float
    accountant: str
    noise_multiplier: float
    sample_rate: float
    steps: int

    def as_record(self) -> dict[str, Any]:
        return {"site": self.site, "epsilon": self.epsilon, "delta": self.delta,
                "accountant": self.accountant, "noise-multiplier": self.noise_multiplier,
                "sample-rate": self.sample_rate, "steps": self.steps}

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(self.as_record())

    @classmethod
    def from_content(cls, content: RecordDict) -> ReplyPrivacy | None:
        if PRIVACY not in content.config_records:
            return None
        rec = content.config_records[PRIVACY]
        what = "privacy record"
        only_keys(rec, ("site", "epsilon", "delta", "accountant", "noise-multiplier",
                        "sample-rate", "steps"), what=what)
        return cls(site=text(rec, "site", what=what),
                   epsilon=real(rec, "epsilon", 0.0, what=what),
                   delta=real(rec, "delta", 0.0, 1.0, what=what),
                   accountant=text(rec, "accountant", what=what),
                   noise_multiplier=real(rec, "noise-multiplier", 0.0, what=what),
                   sample_rate=real(rec, "sample-rate", 0.0, 1.0, what=what),
                   steps=count(rec, "steps", 0, MAX_STEPS, what=what))


# -- site -> server: the replies that carry no update -------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class Refusal:
    """A site's refusal to train this round (its budget or policy, or an app it did
    not approve, which states no budget)."""

    reason: str
    site: str
    epsilon_limit: float | None = None
    delta: float | None = None
    epsilon_spent: float | None = None

    def as_record(self) -> dict[str, Any]:
        out: dict[str, Any] = {"reason": self.reason, "site": self.site}
        for key, value in (("epsilon-limit", self.epsilon_limit), ("delta", self.delta),
                           ("epsilon-spent", self.epsilon_spent)):
            if value is not None:
                out[key] = value
        return out

    def to_content(self) -> RecordDict:
        return RecordDict({REFUSAL: ConfigRecord(self.as_record())})

    @classmethod
    def from_content(cls, content: RecordDict) -> Refusal:
        REFUSAL_SHAPE.check(content, "a refusal")
        rec = content.config_records[REFUSAL]
        what = "refusal"
        only_keys(rec, ("reason", "site", "epsilon-limit", "delta", "epsilon-spent"),
                  what=what)
        return cls(reason=text(rec, "reason", what=what), site=text(rec, "site", what=what),
                   epsilon_limit=optional(rec, "epsilon-limit",
                                          lambda: real(rec, "epsilon-limit", 0.0, what=what)),
                   delta=optional(rec, "delta",
                                  lambda: real(rec, "delta", 0.0, 1.0, what=what)),
                   epsilon_spent=optional(rec, "epsilon-spent",
                                          lambda: real(rec, "epsilon-spent", 0.0, what=what)))


@dataclass(frozen=True, slots=True, kw_only=True)
class GlobalRefused:
    """A site's refusal of the global model it was sent (the aggregate check failed)."""

    reason: str
    site: str
    version: int

    def to_content(self) -> RecordDict:
        return RecordDict({GLOBAL_REFUSED: ConfigRecord(
            {"reason": self.reason[:MAX_TEXT], "site": self.site, "version": self.version})})

    @classmethod
    def from_content(cls, content: RecordDict) -> GlobalRefused:
        GLOBAL_REFUSED_SHAPE.check(content, "a global-model refusal")
        rec = content.config_records[GLOBAL_REFUSED]
        what = "global-model refusal"
        only_keys(rec, ("reason", "site", "version"), what=what)
        return cls(reason=text(rec, "reason", what=what),
                   site=text(rec, "site", what=what, required=False),
                   version=count(rec, "version", 0, MAX_VERSION, what=what))


@dataclass(frozen=True, slots=True, kw_only=True)
class Declined:
    """An evaluation reply that releases nothing and says why."""

    reason: str

    def to_content(self) -> RecordDict:
        return RecordDict({DECLINED: ConfigRecord({"reason": self.reason})})

    @classmethod
    def from_content(cls, content: RecordDict) -> Declined:
        return cls(reason=text(content.config_records[DECLINED], "reason",
                               what="declined evaluation"))


@dataclass(frozen=True, slots=True, kw_only=True)
class EvalMetrics:
    """The ``metrics`` record of an evaluation reply (exact statistics of the site's
    validation data: sent only where the site's node config allows it)."""

    num_examples: int
    loss: float
    accuracy: float

    def to_content(self) -> RecordDict:
        return RecordDict({METRICS: MetricRecord(
            {EVAL_LOSS: self.loss, EVAL_ACC: self.accuracy,
             "num-examples": self.num_examples})})

    def as_metrics(self) -> dict[str, float]:
        """The averaged metrics' names and values."""
        return {EVAL_LOSS: self.loss, EVAL_ACC: self.accuracy}

    @classmethod
    def from_content(cls, content: RecordDict, *, max_examples: int) -> EvalMetrics:
        EVALUATION.check(content, "an evaluation reply")
        rec = content.metric_records[METRICS]
        what = "evaluation metrics"
        only_keys(rec, (EVAL_LOSS, EVAL_ACC, "num-examples"), what=what)
        return cls(num_examples=count(rec, "num-examples", 1, max_examples, what=what),
                   loss=real(rec, EVAL_LOSS, 0.0, what=what),
                   accuracy=real(rec, EVAL_ACC, 0.0, 1.0, what=what))


__all__ = ["ARRAYS", "CONFIG", "DECLINED", "ENCRYPTED_TRAIN", "EVAL_ACC", "EVAL_LOSS",
           "GLOBAL_REFUSED", "HE_GLOBAL", "HE_UPDATE", "METRICS", "PLAIN_TRAIN", "PRIVACY",
           "REFUSAL", "Declined", "EvalConfig", "EvalMetrics", "GlobalRefused", "Refusal",
           "ReplyPrivacy", "Shape", "TrainConfig", "TrainMetrics", "count", "only_keys",
           "optional", "real", "show_names", "shown", "text"]
