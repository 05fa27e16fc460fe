"""Privacy accounting per round, before and after, side by side in one run.

    python bench/accounting.py [--rounds 1,10,100,1000] [--no-pld]
                               [--out bench/results/accounting.json]

What a site runs before every round, ``PrivacyLedger.reserve`` of one more round
on a real ledger file that already holds ``k - 1`` rounds (read and verify the
hash chain, epsilon before and after, write and fsync), timed cold (every cache
cleared: each round's ClientApp is a fresh process), for three site profiles:

* demo site: sigma 3.8, q 0.25, 32 steps per round;
* phone: sigma 1.43, q 0.1, 80 steps per round;
* cross-silo: sigma 0.54, q 0.01, 100 steps per round.

"before" is the accounting as it stood before this change, reproduced here in the
same process: two full-resolution PRV compositions per round (the history, then
the history plus the round; the grid grows like sqrt(steps)). "after" is
fedvault's code as it is: epsilon before is the last reservation's recorded
epsilon after (hash-chained), epsilon after one PRV composition on a grid of at
most 2**18 points (provably never below the full-resolution value; see
``privacy.accountants.PRVAccountant``). Also: a site's noise calibration for a
5-round run at epsilon 8 (``noise_for``) before and after. Each epsilon is shown
with Google's PLD accountant beside it (``dp_accounting``, when installed).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from privacy import accountants as acc_mod  # noqa: E402
from privacy.events import SubsampledGaussianEvent as Event  # noqa: E402
from privacy.ledger import PrivacyLedger  # noqa: E402

DELTA = 1e-5
#: (name, sigma, q, steps per round)
PROFILES: list[tuple[str, float, float, int]] = [
    ("demo site", 3.8, 0.25, 32),
    ("phone", 1.43, 0.1, 80),
    ("cross-silo", 0.54, 0.01, 100),
]
FULL_GRID = 1 << 40  # "before": the grid as large as the rule asks


class LedgerBefore(PrivacyLedger):
    """The ledger as it was: epsilon before recomputed at every reservation."""

    def recorded_epsilon(self, scope: str, *, delta: float,
                         entries: Any = None) -> float | None:
        return None


def _cold() -> None:
    acc_mod._cached_epsilon.cache_clear()
    acc_mod._rdp_per_step.cache_clear()


def timed(fn: Callable[[], float]) -> tuple[float, float]:
    _cold()
    t0 = time.perf_counter()
    value = fn()
    return time.perf_counter() - t0, value


def ledger_with(root: Path, ev: Event, rounds: int, epsilon_after: float,
                cls: type[PrivacyLedger]) -> PrivacyLedger:
    """A real ledger holding ``rounds`` reservations of ``ev`` (written as the
    ClientApp writes them; the last one's epsilon after is ``epsilon_after``)."""
    led = cls(root / "ledger.jsonl")
    led.register("d" * 32, source="bench", rows=1000)
    for i in range(rounds):
        led._append("reservation", run_id="bench", round=i + 1, scope="site",
                    dataset="d" * 32, events=[ev.to_dict()], accountant="prv", delta=DELTA,
                    epsilon_before=0.0,
                    epsilon_after=epsilon_after if i == rounds - 1 else 0.0,
                    epsilon_limit=1e9, insecure=False)
    return led


def pld(sigma: float, q: float, steps: int) -> float | None:
    try:
        import dp_accounting as dpa
        from dp_accounting.pld import pld_privacy_accountant
    except ImportError:
        return None
    ev = dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)),
                                 steps)
    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-3)
    return float(acc.compose(ev).get_epsilon(DELTA))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", default="1,10,100,1000")
    ap.add_argument("--no-pld", action="store_true", help="skip the dp_accounting check")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "accounting.json")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    console = Console(width=150)
    before_acc = acc_mod.PRVAccountant(max_grid=FULL_GRID)
    after_acc = acc_mod.PRVAccountant()
    rows: list[dict[str, Any]] = []
    for name, sigma, q, steps in PROFILES:
        ev = Event(noise_multiplier=sigma, sample_rate=q, steps=steps)
        for k in [int(x) for x in args.rounds.split(",")]:
            console.print(f"{name}: round {k} ...")
            prior = Event(noise_multiplier=sigma, sample_rate=q, steps=steps * (k - 1))
            out: dict[str, Any] = {"profile": name, "round": k, "operation": "reserve"}
            for label, cls, acc in (("before", LedgerBefore, before_acc),
                                    ("after", PrivacyLedger, after_acc)):
                with tempfile.TemporaryDirectory() as tmp:
                    recorded = acc.epsilon([prior], delta=DELTA) if k > 1 else 0.0
                    led = ledger_with(Path(tmp), ev, k - 1, recorded, cls)
                    led.accountant = acc

                    def reserve(led: PrivacyLedger = led, ev: Event = ev, k: int = k) -> float:
                        return float(led.reserve("site", [ev], run_id="bench",
                                                 server_round=k, delta=DELTA, limit=1e9,
                                                 dataset="d" * 32)["epsilon_after"])

                    out[f"{label}_s"], out[f"epsilon_{label}"] = timed(reserve)
            out["epsilon_pld"] = None if args.no_pld else pld(sigma, q, steps * k)
            rows.append(out)
        plan = steps * 5  # a site's noise for a 5-round run at epsilon 8
        cal: dict[str, Any] = {"profile": name, "round": 0, "operation": "calibrate"}
        for label, acc in (("before", before_acc), ("after", after_acc)):
            def calibrate(acc: acc_mod.PRVAccountant = acc, q: float = q,
                          plan: int = plan) -> float:
                return acc.noise_for(target_epsilon=8.0, delta=DELTA, sample_rate=q,
                                     steps=plan)

            cal[f"{label}_s"], cal[f"sigma_{label}"] = timed(calibrate)
        rows.append(cal)

    t = Table(title="privacy accounting per round: before (two full-resolution PRV "
                    "compositions) and after (recorded epsilon before, bounded grid), "
                    "cold, seconds")
    for col in ("profile", "round", "operation", "before s", "after s", "speed-up",
                "ε / σ before", "ε / σ after", "after / before", "ε Google PLD"):
        t.add_column(col, justify="left" if col in ("profile", "operation") else "right")
    for r in rows:
        kind = "epsilon" if r["operation"] == "reserve" else "sigma"
        vb, va = r[f"{kind}_before"], r[f"{kind}_after"]
        p = r.get("epsilon_pld")
        t.add_row(r["profile"], str(r["round"]) if r["round"] else "5-round plan",
                  r["operation"], f"{r['before_s']:.3f}", f"{r['after_s']:.3f}",
                  f"{r['before_s'] / r['after_s']:.1f}x", f"{vb:.4f}", f"{va:.4f}",
                  f"{va / vb:.4f}", "-" if p is None else f"{p:.4f}")
    console.print(t)
    reserve_after = [r["after_s"] for r in rows if r["operation"] == "reserve"]
    console.print(f"reserve after: {min(reserve_after):.3f}-{max(reserve_after):.3f} s from "
                  f"round 1 to round {args.rounds.split(',')[-1]} (max/min "
                  f"{max(reserve_after) / min(reserve_after):.1f}x)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"delta": DELTA, "rows": rows,
                                    "numpy": np.__version__}, indent=2) + "\n")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
