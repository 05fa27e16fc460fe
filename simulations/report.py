"""What a scenario run leaves behind besides the foundation's summary: the per-site
table (role, participation, epsilon spent), ``rounds.csv``, the figures, and the
side-by-side comparison of two finished runs."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from fedvault.datasets import central_test_table
from fedvault.errors import ConfigError
from fedvault.rundir import RunDirectory
from fedvault.tasks import get_task
from privacy.ledger import last_reservation
from protocols.config import RunSettings
from simulations.behaviour import add_trigger, trigger_value
from simulations.scenario import Scenario

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
        part = by_node.get(k + 1, {})
        eps = ledger_epsilon(run_dir / "ledgers" / f"site-{k}.jsonl")
        rows.append({
            "site": f"site-{k}", "group": prof.group, "role": prof.behaviour,
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


def scenario_outputs(summary: dict[str, Any], scenario: Scenario, settings: RunSettings,
                     run_dir: RunDirectory) -> None:
    """Add the ``simulation`` block to ``summary`` and write rounds.csv and the figures."""
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
    _privacy_from_ledgers(summary, sites)
    attack = backdoor_success(summary, scenario, settings, run_dir)
    if attack is not None:
        block["backdoor_success"] = attack
    summary["simulation"] = block
    write_rounds_csv(summary, run_dir.root / "rounds.csv")
    figures = plot_scenario(summary, run_dir.root)
    block["figures"] = [p.name for p in figures]


def _privacy_from_ledgers(summary: dict[str, Any], sites: list[dict[str, Any]]) -> None:
    """In a simulation every site's own ledger is at hand: report the epsilon it has
    committed (which counts rounds whose update never reached the server) instead
    of the last figure the server happened to receive; list only sites that spent."""
    privacy = summary.get("privacy") or {}
    if not privacy.get("dp"):
        return
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


def backdoor_success(summary: dict[str, Any], scenario: Scenario, settings: RunSettings,
                     run_dir: RunDirectory) -> float | None:
    """Share of triggered central-test samples (true label not the target) that the
    final model classifies as the backdoor target; ``None`` without a backdoor
    attacker or without a readable final model."""
    targets = {g.backdoor_target for g in scenario.groups
               if g.behaviour in ("backdoor", "model-replacement")}
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


def _elapsed(hist: list[dict[str, Any]]) -> list[float]:
    out, t = [], 0.0
    for h in hist:
        t += float(h.get("simulated_seconds", 0.0) or 0.0)
        out.append(t)
    return out


def _time_unit(seconds: float) -> tuple[float, str]:
    if seconds >= 2 * 3600:
        return 3600.0, "hours"
    if seconds >= 120:
        return 60.0, "minutes"
    return 1.0, "seconds"


def _nan(v: Any) -> float:
    return float("nan") if v is None else float(v)


def plot_scenario(summary: dict[str, Any], root: Path) -> list[Path]:
    """progress.png (accuracy and loss over rounds and over simulated time),
    epsilon.png (epsilon spent per site) and bytes.png (bytes per round)."""
    hist = summary.get("history", [])
    sim = summary["simulation"]
    title = f"scenario {sim['scenario']} · {sim['sites']} sites"
    rounds = [h["round"] for h in hist]
    acc = [_nan(h.get("accuracy")) for h in hist]
    loss = [_nan(h.get("loss")) for h in hist]
    t = _elapsed(hist)
    unit, unit_name = _time_unit(t[-1] if t else 0.0)
    out: list[Path] = []

    fig, axes = plt.subplots(2, 2, figsize=(10, 6.4))
    for row, (vals, name, color) in enumerate(((acc, "accuracy", "tab:blue"),
                                               (loss, "loss", "tab:red"))):
        axes[row][0].plot(rounds, vals, marker="o", color=color)
        axes[row][0].set_xlabel("round")
        axes[row][1].plot([x / unit for x in t], vals, marker="o", color=color)
        axes[row][1].set_xlabel(f"simulated time ({unit_name})")
        for ax in axes[row]:
            ax.set_ylabel(name)
            ax.grid(alpha=0.3)
            if name == "accuracy":
                ax.set_ylim(0, 1.02)
    fig.suptitle(f"{title} · {summary.get('metric_source')} evaluation")
    fig.tight_layout()
    out.append(_save(fig, root / "progress.png"))

    sites = sim["per_site"]
    eps = [(s["site"], s["epsilon"], s["role"]) for s in sites if s["epsilon"] is not None]
    if eps:
        fig, ax = plt.subplots(figsize=(10, 3.6))
        limits = sorted({s["max_epsilon"] for s in sites})
        if len(sites) <= 40:
            xs = np.arange(len(eps))
            colors = ["tab:red" if r != "honest" else "tab:green" for _, _, r in eps]
            ax.bar(xs, [e for _, e, _ in eps], color=colors, width=0.8)
            ax.set_xticks(xs, [s for s, _, _ in eps], rotation=60, fontsize=7)
            ax.set_xlabel("site")
            ax.set_ylabel("ε spent (site ledger)")
            for lim in limits:
                ax.axhline(lim, color="black", linestyle="--", linewidth=1)
            ax.set_title(f"{title} · ε per site (green honest, red attacker, dashed: limit)")
        else:  # too many bars to read: how many sites spent how much
            honest = [e for _, e, r in eps if r == "honest"]
            hostile = [e for _, e, r in eps if r != "honest"]
            top = max(limits + [e for _, e, _ in eps])
            bins = np.linspace(0.0, top * 1.02, 41)
            ax.hist([honest, hostile], bins=bins.tolist(), stacked=True,
                    color=["tab:green", "tab:red"], label=["honest", "attacker"])
            for lim in limits:
                ax.axvline(lim, color="black", linestyle="--", linewidth=1)
            ax.set_xlabel("ε spent (site ledger); dashed: limit")
            ax.set_ylabel("sites")
            idle = len(sites) - len(eps)
            ax.set_title(f"{title} · ε spent per site ({len(eps)} sites spent budget, "
                         f"{idle} spent nothing)")
            ax.legend(fontsize=8)
        fig.tight_layout()
        out.append(_save(fig, root / "epsilon.png"))

    net = [h for h in hist if "bytes_up" in h]
    if net:
        fig, ax = plt.subplots(figsize=(8, 3.4))
        r = np.array([h["round"] for h in net])
        mib = 1024 * 1024
        ax.bar(r - 0.2, [h["bytes_down"] / mib for h in net], width=0.4,
               label="down (server→sites)")
        ax.bar(r + 0.2, [h["bytes_up"] / mib for h in net], width=0.4, label="up (sites→server)")
        lost = [h.get("bytes_lost", 0) / mib for h in net]
        if any(lost):
            ax.bar(r + 0.2, lost, bottom=[h["bytes_up"] / mib for h in net], width=0.4,
                   label="lost (mid-upload dropouts)", color="tab:gray")
        ax.set_xlabel("round")
        ax.set_ylabel("MiB")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, axis="y")
        ax.set_title(f"{title} · bytes per round")
        fig.tight_layout()
        out.append(_save(fig, root / "bytes.png"))
    return out


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------
# compare two runs
# --------------------------------------------------------------------------------------
def _load(run: Path) -> dict[str, Any]:
    summary = RunDirectory(run).read_summary()
    summary["_path"] = str(run)
    return summary


def _final(summary: dict[str, Any]) -> float | None:
    rel = summary.get("released_model", {})
    v = rel.get("central_accuracy", summary.get("final_accuracy"))
    return None if v is None else float(v)


def _max_epsilon(s: dict[str, Any]) -> float | None:
    sim = s.get("simulation", {})
    if sim.get("max_epsilon_spent") is not None:
        return float(sim["max_epsilon_spent"])
    eps = [x["epsilon"] for x in (s.get("privacy") or {}).get("sites", [])
           if x.get("epsilon") is not None]
    return max(eps) if eps else None


def compare_rows(a: dict[str, Any], b: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(metric, A, B) rows for two finished runs."""
    def name(s: dict[str, Any]) -> str:
        return str(s.get("simulation", {}).get("scenario") or Path(s["_path"]).name)

    def f(v: Any, fmt: str) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        return format(v, fmt)

    def get(s: dict[str, Any], key: str) -> Any:
        return s.get("simulation", {}).get(key, s.get(key))

    def mib(s: dict[str, Any], key: str) -> Any:
        v = get(s, key)
        return None if v is None else v / 2**20

    rows = [("scenario", name(a), name(b)),
            ("sites", str(a.get("sites")), str(b.get("sites"))),
            ("rounds completed", str(a.get("rounds_completed")), str(b.get("rounds_completed")))]
    for label, fn, fmt in (
        ("final accuracy", _final, ".4f"),
        ("final loss", lambda s: s.get("final_loss"), ".4f"),
        ("simulated time (s)", lambda s: s.get("simulated_seconds"), ".1f"),
        ("wall time (s)", lambda s: s.get("simulation_wall_seconds", s.get("wall_seconds")),
         ".1f"),
        ("bytes down (MiB)", lambda s: mib(s, "bytes_down"), ".2f"),
        ("bytes up (MiB)", lambda s: mib(s, "bytes_up"), ".2f"),
        ("site-rounds trained", lambda s: get(s, "client_rounds") if "simulation" in s else
         sum(int(h.get("sites_participated", 0)) for h in s.get("history", [])), "d"),
        ("dropped", lambda s: get(s, "dropped"), "d"),
        ("max ε spent", _max_epsilon, ".3f"),
        ("backdoor success", lambda s: get(s, "backdoor_success"), ".3f"),
    ):
        rows.append((label, f(fn(a), fmt), f(fn(b), fmt)))
    return rows


def compare_runs(a_dir: Path, b_dir: Path, out: Path | None = None
                 ) -> tuple[list[tuple[str, str, str]], Path]:
    """Rows of the comparison table and a figure with both runs' accuracy over rounds
    and over simulated time (written to ``out``, default ``B/compare.png``)."""
    a, b = _load(a_dir), _load(b_dir)
    rows = compare_rows(a, b)
    out = out or (b_dir / "compare.png")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    any_time = False
    longest = max((_elapsed(s.get("history", [])) or [0.0])[-1] for s in (a, b))
    unit, unit_name = _time_unit(longest)
    for s, style in ((a, "o-"), (b, "s--")):
        hist = s.get("history", [])
        label = rows[0][1] if s is a else rows[0][2]
        acc = [_nan(h.get("accuracy")) for h in hist]
        ax1.plot([h["round"] for h in hist], acc, style, label=label)
        if any("simulated_seconds" in h for h in hist):
            any_time = True
            ax2.plot([x / unit for x in _elapsed(hist)], acc, style, label=label)
    ax1.set_xlabel("round")
    ax2.set_xlabel(f"simulated time ({unit_name})")
    for ax in (ax1, ax2):
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if not any_time:
        ax2.text(0.5, 0.5, "no simulated clock\n(not scenario runs)", ha="center",
                 va="center", transform=ax2.transAxes)
    fig.suptitle("fedvault · compare")
    fig.tight_layout()
    try:
        _save(fig, out)
    except OSError as exc:
        raise ConfigError(f"cannot write {out}: {exc}") from exc
    return rows, out
