"""The site's privacy policy and the guard that enforces it before every round.

The data owner's settings come from the SuperNode's node config and win over
anything the server sends:

==========================  =========================================  ===========
node-config key             meaning                                    default
==========================  =========================================  ===========
``max-epsilon``             the budget scope's total epsilon           10.0
``delta``                   delta at which epsilon is accounted         1e-5
``min-noise-multiplier``    refuse rounds with less noise than this    0.5
``accountant``              ``prv`` (tight) or ``rdp``                 ``prv``
``ledger-path``             the site's privacy ledger (mode 0600)      see below
``require-dp``              refuse rounds without DP                   true
``budget-scope``            the budget this data draws on; another     ``site``
                            name declares it disjoint from the rest
``release-eval-metrics``    send exact evaluation metrics (outside ε)  false with DP
``evaluate-after-refusal``  evaluate in a round the site refused        false
``allow-insecure-noise``    train when the run asks for seeded noise   false
==========================  =========================================  ===========

The default ledger is ``~/.fedvault/privacy-ledger.jsonl`` of the user running
the SuperNode; a relative ``ledger-path`` is made absolute against the directory
the ClientApp runs in, once, and logged.

A simulated site (marked so by the simulation itself, never by a key: see
:class:`protocols.node_config.NodeConfig`) is played by the central team, so its
policy comes from the run config's ``site-*`` keys and its ledger lives in the run
directory. A real site never takes its limits from the run config, and an unknown
or invalid node-config key stops it with an error naming the key.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from privacy.accountants import ACCOUNTANTS, get_accountant
from privacy.ledger import SITE_SCOPE, check_scope
from protocols.config import RunSettings
from protocols.errors import ConfigError, PrivacyRefused
from protocols.node_config import NodeConfig

logger = logging.getLogger("fedvault.client")
_LOGGED_LEDGERS: set[str] = set()

DEFAULT_MAX_EPSILON = 10.0
DEFAULT_DELTA = 1e-5
DEFAULT_MIN_NOISE = 0.5
DEFAULT_LEDGER = "~/.fedvault/privacy-ledger.jsonl"


@dataclass(frozen=True, slots=True, kw_only=True)
class SitePolicy:
    """A site's privacy limits (validated)."""

    max_epsilon: float = DEFAULT_MAX_EPSILON
    delta: float = DEFAULT_DELTA
    min_noise_multiplier: float = DEFAULT_MIN_NOISE
    accountant: str = "prv"
    ledger_path: str = DEFAULT_LEDGER
    require_dp: bool = True
    site_name: str = ""
    budget_scope: str = SITE_SCOPE
    #: ``None``: the default (release only when the run trains without DP)
    release_eval_metrics: bool | None = None
    evaluate_after_refusal: bool = False
    allow_insecure_noise: bool = False
    #: the fewest sites this site lets its update be aggregated with (a floor under the
    #: run's min-sites, which the central team sets)
    min_sites: int = 1

    def __post_init__(self) -> None:
        if self.min_sites < 1:
            raise ConfigError(f"min-sites must be >= 1. Found {self.min_sites}.")
        if not (self.max_epsilon > 0 and not math.isnan(self.max_epsilon)):
            raise ConfigError(f"max-epsilon must be > 0. Found {self.max_epsilon}.")
        if not 0 < self.delta < 1:
            raise ConfigError(f"delta must be in (0, 1). Found {self.delta}.")
        if not self.min_noise_multiplier >= 0:
            raise ConfigError(
                f"min-noise-multiplier must be >= 0. Found {self.min_noise_multiplier}.")
        if self.accountant not in ACCOUNTANTS:
            raise ConfigError(f"accountant must be one of {sorted(ACCOUNTANTS)}. "
                              f"Found {self.accountant!r}.")
        try:
            check_scope(self.budget_scope)
        except ValueError as exc:
            raise ConfigError(f"node-config budget-scope: {exc}") from None

    def releases_eval_metrics(self, *, dp: bool) -> bool:
        """Exact evaluation metrics are a release outside epsilon: by default only
        when the run trains without DP anyway."""
        return (not dp) if self.release_eval_metrics is None else self.release_eval_metrics


def site_policy(settings: RunSettings, node: NodeConfig) -> SitePolicy:
    """The policy of this site: its node config first; for simulated sites the run
    config's ``site-*`` keys; for real sites the documented defaults, never the run's."""
    name = node.name
    if node.simulated:
        ledger = (str(Path(settings.run_dir) / "ledgers" / f"{name or 'site'}.jsonl")
                  if settings.run_dir else DEFAULT_LEDGER)
        base = SitePolicy(max_epsilon=settings.site_max_epsilon, delta=settings.site_delta,
                          min_noise_multiplier=settings.site_min_noise_multiplier,
                          accountant=settings.accountant, ledger_path=ledger,
                          require_dp=settings.dp, site_name=name,
                          release_eval_metrics=settings.site_release_eval_metrics,
                          # simulated sites are the central team's own experiment
                          allow_insecure_noise=True)
    else:
        base = SitePolicy(site_name=name)
    ledger_path = str(Path(node.ledger_path or base.ledger_path).expanduser().absolute())
    if ledger_path not in _LOGGED_LEDGERS:
        _LOGGED_LEDGERS.add(ledger_path)
        logger.info("site %s: privacy ledger %s", name or "(unnamed)", ledger_path)

    def pick(value: Any, default: Any) -> Any:
        return default if value is None else value

    return SitePolicy(
        max_epsilon=pick(node.max_epsilon, base.max_epsilon),
        delta=pick(node.delta, base.delta),
        min_noise_multiplier=pick(node.min_noise_multiplier, base.min_noise_multiplier),
        accountant=pick(node.accountant, base.accountant),
        ledger_path=ledger_path,
        require_dp=pick(node.require_dp, base.require_dp),
        site_name=base.site_name,
        budget_scope=pick(node.budget_scope, base.budget_scope),
        release_eval_metrics=pick(node.release_eval_metrics, base.release_eval_metrics),
        evaluate_after_refusal=pick(node.evaluate_after_refusal, base.evaluate_after_refusal),
        allow_insecure_noise=pick(node.allow_insecure_noise, base.allow_insecure_noise),
        min_sites=pick(node.aggregate_min_sites, base.min_sites),
    )


def noise_multiplier_for_run(settings: RunSettings, policy: SitePolicy, *, sample_rate: float,
                             steps_per_round: int) -> float:
    """The run's noise multiplier at this site: the server's explicit value, or the
    smallest noise that keeps this run (all its rounds) within ``target-epsilon``
    at the site's delta."""
    if settings.noise_multiplier > 0:
        return settings.noise_multiplier
    return _calibrated(policy.accountant, settings.target_epsilon, policy.delta, sample_rate,
                       steps_per_round * settings.num_server_rounds)


@lru_cache(maxsize=256)
def _calibrated(accountant: str, target_epsilon: float, delta: float, sample_rate: float,
                steps: int) -> float:
    # A pure function of its arguments: cached, since every round of a run asks again.
    return get_accountant(accountant).noise_for(target_epsilon=target_epsilon, delta=delta,
                                                sample_rate=sample_rate, steps=steps)


def check_request(settings: RunSettings, policy: SitePolicy, noise_multiplier: float) -> None:
    """Refuse a server config that asks for weaker privacy than the site allows."""
    if settings.min_sites < policy.min_sites:
        raise PrivacyRefused(f"the run aggregates as few as {settings.min_sites} site(s); this "
                             f"site requires at least {policy.min_sites} (node-config "
                             "aggregate-min-sites): a smaller aggregate says more about each "
                             "site")
    if not settings.dp:
        if policy.require_dp:
            raise PrivacyRefused("the run asks to train without differential privacy; "
                                 "this site requires DP (node-config require-dp)")
        return
    if not settings.secure_mode and not policy.allow_insecure_noise:
        raise PrivacyRefused("the run asks for seeded (insecure) noise and sampling, which "
                             "whoever knows the seed can undo; this site does not allow it "
                             "(node-config allow-insecure-noise)")
    if settings.dp_delta > policy.delta:
        raise PrivacyRefused(f"the run asks for delta {settings.dp_delta:g}, above this "
                             f"site's delta {policy.delta:g}")
    if noise_multiplier < policy.min_noise_multiplier:
        raise PrivacyRefused(f"noise multiplier {noise_multiplier:.4g} is below this site's "
                             f"minimum {policy.min_noise_multiplier:g} "
                             "(node-config min-noise-multiplier)")
