"""What a scenario run leaves behind besides the server's summary: the per-site table
(role, participation, epsilon spent), ``rounds.csv``, the backdoor's success, and
the figures (:mod:`simulations.figures`); the comparison of two runs is
:mod:`simulations.compare`."""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fedvault_tasks.datasets import central_test_table
from fedvault_tasks.tasks import get_task
from privacy.ledger import last_reservation
from protocols.config import RunSettings
from protocols.hashchain import read_chain
from protocols.names import simulated_node_id, site_name
from protocols.run_events import RunEvent
from protocols.rundir import RunDirectory
from protocols.summary import RunSummary
from simulations.behaviour import ATTACKS, add_trigger, trigger_value
from simulations.figures import plot_scenario
from simulations.hostile import REPLY_ATTACKS
from simulations.scenario import Behaviour, Scenario

#: columns of rounds.csv, in order
ROUND_COLUMNS = ("round", "accuracy", "loss", "metric_source", "sites_sampled",
                 "sites_participated", "dropped", "offline", "timed_out", "eval_missing",
                 "skipped",
                 "refused", "rejected", "errors", "aggregated", "simulated_seconds",
                 "simulated_elapsed", "train_seconds_simulated", "slowest_site",
                 "slowest_site_seconds", "bytes_down", "bytes_up", "bytes_lost", "seconds")


def ledger_epsilon(path: Path) -> float | None:
    """The cumulative epsilon a site's own ledger says it has committed (the last
    reservation's ``epsilon_after``, which counts rounds that crashed or whose upload
    was lost); ``None`` if the site never trained with DP."""
    if not path.exists():
        return None
    e = last_reservation(path)
    return None if e is None else float(e["epsilon_after"])


def site_table(summary: dict[str, Any], scenario: Scenario, run_dir: Path) -> list[dict[str, Any]]:
    """One row per scenario site: group, role, links, participation and epsilon."""
    by_node = {int(p["node_id"]): p for p in summary.get("participants", [])}
    rows = []
    for k in range(scenario.num_sites):
        prof = scenario.site(k)
        part = by_node.get(simulated_node_id(k), {})
        eps = ledger_epsilon(run_dir / "ledgers" / f"{site_name(k)}.jsonl")
        rows.append({
            "site": site_name(k), "group": prof.group, "role": prof.behaviour,
            "attack_start": prof.attack_start if prof.is_attacker() else None,
            "uplink_mbps": prof.uplink_mbps, "downlink_mbps": prof.downlink_mbps,
            "compute": prof.compute,
            "sampled": int(part.get("sampled", 0)), "trained": int(part.get("trained", 0)),
            "dropped": int(part.get("dropped", 0)), "offline": int(part.get("offline", 0)),
            "timed_out": int(part.get("timed_out", 0)), "refused": int(part.get("refused", 0)),
            "rejected": int(part.get("rejected", 0)),
            "epsilon": None if eps is None else round(eps, 6),
            "max_epsilon": prof.max_epsilon, "delta": prof.delta,
        })
    return rows


def scenario_outputs(server_summary: RunSummary, scenario: Scenario, settings: RunSettings,
                     run_dir: RunDirectory) -> dict[str, Any]:
    """Write rounds.csv and the figures; return the summary blocks a scenario run
    contributes (``simulation``, and ``privacy`` with each site's own ledger)."""
    summary: dict[str, Any] = dict(server_summary)  # a view: the caller amends the file
    sites = site_table(summary, scenario, run_dir.root)
    eps = [s["epsilon"] for s in sites if s["epsilon"] is not None]
    hist = summary.get("history", [])
    block: dict[str, Any] = {
        "scenario": scenario.name,
        "description": scenario.description,
        "fingerprint": scenario.fingerprint(),
        "sites": scenario.num_sites,
        "roles": scenario.roles(),
        "simulated_seconds": summary.get("simulated_seconds", 0.0),
        "wall_seconds": summary.get("simulation_wall_seconds"),
        "bytes_down": summary.get("bytes_down", 0),
        "bytes_up": summary.get("bytes_up", 0),
        "bytes_lost": summary.get("bytes_lost", 0),
        "dropped": sum(int(h.get("dropped", 0)) for h in hist),
        "offline": sum(int(h.get("offline", 0)) for h in hist),
        "timed_out": sum(int(h.get("timed_out", 0)) for h in hist),
        "client_rounds": sum(int(h.get("sites_participated", 0)) for h in hist),
        "max_epsilon_spent": max(eps) if eps else None,
        "per_site": sites,
    }
    summary["privacy"] = _privacy_from_ledgers(summary.get("privacy") or {}, sites)
    attack = backdoor_success(summary, scenario, settings, run_dir)
    if attack is not None:
        block["backdoor_success"] = attack
    outcomes = hostile_outcomes(scenario, read_chain(run_dir.events), summary)
    if outcomes:
        block["hostile_replies"] = outcomes
    summary["simulation"] = block
    write_rounds_csv(summary, run_dir.root / "rounds.csv")
    figures = plot_scenario(summary, run_dir.root)
    block["figures"] = [p.name for p in figures]
    return {"simulation": block, "privacy": summary["privacy"]}


def hostile_outcomes(scenario: Scenario, events: list[dict[str, Any]],
                     summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """What became of each hostile-reply attacker's attack, from the run's events: the
    rejections at the server in its attacking rounds, and, for forged ciphertexts the
    server cannot see into, the honest sites' refusals of the aggregate it corrupted
    and the server's roll-back. (The simulation knows who attacked when; the server
    only knows that an aggregate was refused.)"""
    rejected: dict[tuple[int, int], list[str]] = {}
    refused: dict[int, set[int]] = {}  # version -> nodes that refused it
    rollbacks = {int(r["refused_version"]): int(r["to_version"])
                 for r in summary.get("rollbacks", [])}
    for e in events:
        if e["kind"] == RunEvent.UPDATE_REJECTED:
            rejected.setdefault((int(e["round"]), int(e["node_id"])), []).append(str(e["reason"]))
        elif e["kind"] == RunEvent.GLOBAL_REFUSED:
            refused.setdefault(int(e["version"]), set()).add(int(e["node_id"]))
    honest = {simulated_node_id(k) for k in range(scenario.num_sites)
              if not scenario.site(k).is_attacker()}
    rounds = int(summary.get("rounds") or 0)
    out = []
    for k in range(scenario.num_sites):
        p = scenario.site(k)
        if p.behaviour not in REPLY_ATTACKS:
            continue
        node = simulated_node_id(k)
        attacked = [r for r in range(1, rounds + 1) if p.attacking(r)]
        reasons = [x for r in attacked for x in rejected.get((r, node), [])]
        detected = [r for r in attacked if refused.get(r, set()) & honest]
        if reasons and p.behaviour == Behaviour.DUPLICATE:
            outcome = f"counted once; {len(reasons)} extra copies rejected: {reasons[0]}"
        elif reasons:
            outcome = f"rejected by the server ({len(reasons)}x): {reasons[0]}"
        elif detected:
            r = detected[0]
            by = len(refused[r] & honest)
            back = rollbacks.get(r)
            outcome = (f"aggregate of round {r} refused by {by} honest site(s)"
                       + (f"; server rolled back to version {back}" if back is not None
                          else ""))
        else:
            outcome = "not detected"
        out.append({"site": site_name(k), "behaviour": p.behaviour, "rounds": attacked,
                    "rejected": len(reasons), "detected_by_sites": bool(detected),
                    "outcome": outcome})
    return out


def _privacy_from_ledgers(reported_privacy: Mapping[str, Any],
                          sites: list[dict[str, Any]]) -> dict[str, Any]:
    """In a simulation every site's own ledger is at hand: report the epsilon it has
    committed (which counts rounds whose update never reached the server) instead
    of the last figure the server happened to receive; list only sites that spent."""
    privacy = dict(reported_privacy)
    if not privacy.get("dp"):
        return privacy
    reported = {s["site"]: s for s in privacy.get("sites", [])}
    rows = []
    for site in sites:
        if site["epsilon"] is None and site["refused"] == 0:
            continue
        row = dict(reported.get(site["site"], {"site": site["site"], "delta": site["delta"],
                                               "accountant": privacy.get("accountant"),
                                               "noise_multiplier": None,
                                               "refused_rounds": site["refused"]}))
        row["epsilon"] = site["epsilon"]
        if row.get("delta") is None:
            row["delta"] = site["delta"]
        rows.append(row)
    privacy["sites"] = rows
    privacy["epsilon_source"] = "from each site's own ledger"
    return privacy


def backdoor_success(summary: dict[str, Any], scenario: Scenario, settings: RunSettings,
                     run_dir: RunDirectory) -> float | None:
    """Share of triggered central-test samples (true label not the target) that the
    final model classifies as the backdoor target; ``None`` without a backdoor
    attacker or without a readable final model."""
    targets = {g.backdoor_target for g in scenario.groups
               if ATTACKS[Behaviour(g.behaviour)].data == "backdoor"}
    if not targets or not settings.central_eval:
        return None
    released = summary.get("released_model", {}).get("path")
    final = run_dir.model_path(int(summary.get("rounds_completed", 0)))
    path = Path(released) if released else final
    if summary.get("he", {}).get("enabled") and not released:
        return None
    task = get_task(settings.task)
    test = central_test_table(task, settings)
    if test is None or not path.exists():
        return None
    model = task.build_model(num_features=settings.num_features, num_classes=settings.num_classes)
    model.load_state_dict(torch.load(path, weights_only=True))
    target = min(targets)
    keep = test.y != target
    x = add_trigger(test.x[keep], trigger_value(settings.task))
    model.eval()
    with torch.no_grad():
        pred = model(torch.from_numpy(x)).argmax(dim=1).numpy()
    return round(float((pred == target).mean()), 6) if len(pred) else None


def write_rounds_csv(summary: dict[str, Any], path: Path) -> Path:
    elapsed = 0.0
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=ROUND_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for h in summary.get("history", []):
            elapsed += float(h.get("simulated_seconds", 0.0) or 0.0)
            w.writerow({**h, "simulated_elapsed": round(elapsed, 3)})
    return path


