"""Two finished runs side by side: the table and the figure of ``fedvault simulate
--compare A B``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from protocols.errors import ConfigError
from protocols.rundir import RunDirectory
from simulations.figures import elapsed, nan_of, plt, save, time_unit


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
    longest = max((elapsed(s.get("history", [])) or [0.0])[-1] for s in (a, b))
    unit, unit_name = time_unit(longest)
    for s, style in ((a, "o-"), (b, "s--")):
        hist = s.get("history", [])
        label = rows[0][1] if s is a else rows[0][2]
        acc = [nan_of(h.get("accuracy")) for h in hist]
        ax1.plot([h["round"] for h in hist], acc, style, label=label)
        if any("simulated_seconds" in h for h in hist):
            any_time = True
            ax2.plot([x / unit for x in elapsed(hist)], acc, style, label=label)
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
        save(fig, out)
    except OSError as exc:
        raise ConfigError(f"cannot write {out}: {exc}") from exc
    return rows, out
