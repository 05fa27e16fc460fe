"""The figures of a scenario run (progress, epsilon, bytes over simulated time)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np


def elapsed(hist: list[dict[str, Any]]) -> list[float]:
    out, t = [], 0.0
    for h in hist:
        t += float(h.get("simulated_seconds", 0.0) or 0.0)
        out.append(t)
    return out


def time_unit(seconds: float) -> tuple[float, str]:
    if seconds >= 2 * 3600:
        return 3600.0, "hours"
    if seconds >= 120:
        return 60.0, "minutes"
    return 1.0, "seconds"


def nan_of(v: Any) -> float:
    return float("nan") if v is None else float(v)


def plot_scenario(summary: dict[str, Any], root: Path) -> list[Path]:
    """progress.png (accuracy and loss over rounds and over simulated time),
    epsilon.png (epsilon spent per site) and bytes.png (bytes per round)."""
    hist = summary.get("history", [])
    sim = summary["simulation"]
    title = f"scenario {sim['scenario']} · {sim['sites']} sites"
    rounds = [h["round"] for h in hist]
    acc = [nan_of(h.get("accuracy")) for h in hist]
    loss = [nan_of(h.get("loss")) for h in hist]
    t = elapsed(hist)
    unit, unit_name = time_unit(t[-1] if t else 0.0)
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
    out.append(save(fig, root / "progress.png"))

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
        out.append(save(fig, root / "epsilon.png"))

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
        out.append(save(fig, root / "bytes.png"))
    return out


def save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
