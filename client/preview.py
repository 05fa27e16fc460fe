"""What a run will do at this site, before it spends anything (``fedvault site preview``).

The same functions a round runs (``site_policy``, ``resolve_site_data``,
``plan_round``, ``noise_multiplier_for_run``, ``check_request``, the ledger's
``check``) applied to the run config the central team published and the site's own
node config, with nothing reserved: the ledger is only read. ``checks`` lists every
check with its outcome; ``--check`` fails when one fails.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from client.budget import check_request, noise_multiplier_for_run, site_policy
from client.dp_sgd import plan_round
from client.he_client import site_context
from client.site_data import resolve_site_data
from privacy.accountants import get_accountant
from privacy.ledger import PrivacyLedger
from privacy.site_secret import SiteSecret, secret_path_for
from protocols.config import RunSettings
from protocols.errors import ConfigError, FedvaultError
from protocols.node_config import NodeConfig

#: what leaves the site each round (docs/reference/what-leaves-a-site.md)
LEAVES = ("the model after DP-SGD (plaintext arrays, or with HE its ciphertexts)",
          "the number of training examples (exact; hence add/remove-one accounting)",
          "the planned number of steps",
          "site name, the ε of this run, δ, accountant, noise multiplier, sampling rate",
          "evaluation metrics only if node-config release-eval-metrics allows")


@dataclass
class Preview:
    site: str
    task: str
    rounds: int
    checks: list[tuple[str, bool, str]] = field(default_factory=list)
    plan: dict[str, Any] = field(default_factory=dict)
    leaves: tuple[str, ...] = LEAVES

    @property
    def ok(self) -> bool:
        return all(passed for _, passed, _ in self.checks)


def preview(settings: RunSettings, node: NodeConfig) -> Preview:
    """Every check a round makes before its reservation, and the run's cost here."""
    policy = site_policy(settings, node)
    out = Preview(site=policy.site_name, task=settings.task, rounds=settings.num_server_rounds)

    def check(name: str, fn: Any) -> Any:
        try:
            value = fn()
        except FedvaultError as exc:
            out.checks.append((name, False, str(exc)))
            return None
        except (OSError, ValueError) as exc:
            out.checks.append((name, False, f"{type(exc).__name__}: {exc}"))
            return None
        out.checks.append((name, True, value if isinstance(value, str) else ""))
        return value

    if settings.he:  # (the site's key in the federation is found by its name)
        check("site identity", lambda: policy.site_name or _fail(
            "node-config site-name is not set: encrypted aggregation needs it"))
    # read-only: an existing site secret keys the split exactly as a round will; without
    # one (no round yet) a placeholder key gives a split of about the same size
    secret = SiteSecret.load(secret_path_for(policy.ledger_path))
    site = check("data against the task", lambda: resolve_site_data(
        settings, node, key=secret.key if secret is not None else b"\0" * 32))
    if site is not None:  # (the check's detail: sizes, never the data)
        out.checks[-1] = (out.checks[-1][0], True, f"{len(site.train)} training and "
                          f"{len(site.validation)} validation rows")
    if settings.he:
        check("HE context", lambda: f"fingerprint {site_context(settings, node).fingerprint[:16]}")
    if site is None:
        return out
    n = len(site.train)
    plan = plan_round(num_examples=n, batch_size=settings.batch_size,
                      epochs=settings.local_epochs, noise_multiplier=1.0,
                      max_grad_norm=settings.max_grad_norm)
    if not settings.dp:
        check("the site's policy", lambda: check_request(settings, policy, 0.0))
        out.plan = {"dp": False, "train_examples": n}
        return out
    sigma = noise_multiplier_for_run(settings, policy, sample_rate=plan.sample_rate,
                                     steps_per_round=plan.steps)
    plan = dataclasses.replace(plan, noise_multiplier=sigma)
    check("the site's policy (noise, δ, DP)", lambda: check_request(settings, policy, sigma))
    ledger = PrivacyLedger(policy.ledger_path, accountant=policy.accountant) \
        if Path(policy.ledger_path).exists() else None
    events = [plan.event()] * settings.num_server_rounds
    if ledger is not None:
        chk = ledger.check(policy.budget_scope, events, delta=policy.delta,
                           limit=policy.max_epsilon)
        before, after = chk.epsilon_before, chk.epsilon_after
    else:
        before, after = 0.0, get_accountant(policy.accountant).epsilon(events,
                                                                        delta=policy.delta)
    check("budget for the whole run", lambda: (
        True if after <= policy.max_epsilon else _fail(
            f"the run would take scope {policy.budget_scope!r} to ε {after:.4f} > limit "
            f"{policy.max_epsilon:g}: it would be refused from the round that passes it")))
    out.plan = {"dp": True, "train_examples": n, "steps_per_round": plan.steps,
                "sample_rate": plan.sample_rate, "noise_multiplier": sigma,
                "max_grad_norm": plan.max_grad_norm, "delta": policy.delta,
                "accountant": policy.accountant, "scope": policy.budget_scope,
                "epsilon_before": before, "epsilon_after": after,
                "epsilon_limit": policy.max_epsilon,
                "epsilon_remaining": policy.max_epsilon - after}
    return out


def _fail(message: str) -> Any:
    raise ConfigError(message)
