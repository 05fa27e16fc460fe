"""Privacy accounting cost, before and after, side by side in one run.

    python bench/accounting.py [--baseline-timeout 120] [--out bench/results/accounting.json]

What a site and a compliance officer really run, each timed cold (every cache
cleared) on a real ledger file:

* ``reserve``: ``PrivacyLedger.reserve`` of one more round on top of a history
  (reads and verifies the ledger, epsilon before and after, writes and fsyncs);
* ``report``: ``fedvault.reports.ledger_report`` of that ledger (every scope's
  epsilon recomputed from its stored events);
* ``calibrate``: the noise multiplier a site calibrates for a run
  (``noise_multiplier_for_run``'s accountant call).

"before" is the accounting as it stood before this change (commit 03373bf):
Opacus's ``PRVAccountant`` run twice per epsilon (a coarse pass, then the
relative-error pass) on every history, whatever its sample rate, and calibration
by bisection from sigma = 1. It is reproduced here, not imported, so that both
run in one process on one machine; a baseline case still running after
``--baseline-timeout`` seconds is stopped and shown as "> N s". "after" is
fedvault's code as it is. Each epsilon is printed too: "after" must never be
below "before" by more than PRV's own error (0.1%), and is checked against
Google's PLD accountant where ``dp_accounting`` is installed.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
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

DELTA = 1e-5

#: (name, history of (sigma, q, steps) per round, one more round, calibration case)
CASES: list[dict[str, Any]] = [
    {"name": "demo site, 20 rounds", "history": [(3.8, 0.25, 32)] * 20,
     "planned": (3.8, 0.25, 32)},
    {"name": "q = 1, sigma = 10, 1e5 steps", "history": [(10.0, 1.0, 100_000)],
     "planned": (10.0, 1.0, 100)},
    {"name": "q = 1, sigma = 50, 1e6 steps", "history": [(50.0, 1.0, 1_000_000)],
     "planned": (50.0, 1.0, 100)},
    {"name": "q = 0.01, sigma = 1, 1e5 steps", "history": [(1.0, 0.01, 100_000)],
     "planned": (1.0, 0.01, 100)},
    {"name": "mixed: q = 0.1 and q = 1, 1e5 steps", "history": [(2.0, 0.1, 50_000),
                                                                (30.0, 1.0, 50_000)],
     "planned": (2.0, 0.1, 100)},
]
CALIBRATIONS: list[tuple[str, float, int]] = [  # (name, q, steps): a run's whole plan
    ("phone: q = 0.1, 5 rounds x 8 epochs", 0.1, 400),
    ("demo site: q = 0.25, 5 rounds x 8 epochs", 0.25, 160),
    ("cross-silo: q = 0.01, 5 rounds x 1 epoch", 0.01, 500),
]


# -- the accounting before this change (reproduced) ----------------------------------------
def legacy_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    from opacus.accountants import PRVAccountant

    merged: dict[tuple[float, float], int] = {}
    for s, q, t in history:
        merged[(s, q)] = merged.get((s, q), 0) + t
    acc = PRVAccountant()
    acc.history = [(s, q, t) for (s, q), t in sorted(merged.items())]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        coarse = float(acc.get_epsilon(delta=delta, eps_error=0.05))
        return float(acc.get_epsilon(delta=delta, eps_error=1e-3 * max(coarse, 1.0)))


def legacy_calibrate(q: float, steps: int, target: float = 8.0) -> float:
    def eps(s: float) -> float:
        return legacy_epsilon([(s, q, steps)], DELTA)

    lo, hi = 0.0, 1.0
    while eps(hi) > target:
        lo, hi = hi, hi * 2
    while hi - lo > 0.01 * hi:
        mid = (lo + hi) / 2
        if eps(mid) > target:
            lo = mid
        else:
            hi = mid
    return hi


def _legacy_job(kind: str, args: Any, out: Any) -> None:
    t0 = time.perf_counter()
    if kind == "reserve":
        history, planned = args
        legacy_epsilon(history, DELTA)  # epsilon before
        value = legacy_epsilon([*history, planned], DELTA)  # and after
    elif kind == "report":
        value = legacy_epsilon(args, DELTA)
    else:
        value = legacy_calibrate(*args)
    out.put((time.perf_counter() - t0, value))


def run_legacy(kind: str, args: Any, timeout: float) -> tuple[float | None, float | None]:
    """(seconds, value) of a baseline job in its own process; (None, None) past timeout."""
    q: Any = mp.get_context("fork").Queue()
    p = mp.get_context("fork").Process(target=_legacy_job, args=(kind, args, q))
    p.start()
    p.join(timeout)
    if p.is_alive():
        p.kill()
        p.join()
        return None, None
    return q.get() if not q.empty() else (None, None)


# -- fedvault as it is --------------------------------------------------------------------
def _cold() -> None:
    acc_mod._cached_epsilon.cache_clear()
    acc_mod._rdp_per_step.cache_clear()


def _ledger_with(history: list[tuple[float, float, int]], root: Path) -> Any:
    from privacy.ledger import PrivacyLedger

    led = PrivacyLedger(root / "ledger.jsonl")
    led.register("d" * 32, source="bench", rows=1000)
    for i, (s, q, t) in enumerate(history):
        # written as the ClientApp writes them (the ledger recomputes at each round)
        led._append("reservation", run_id="bench", round=i + 1, scope="site",
                    dataset="d" * 32, events=[Event(noise_multiplier=s, sample_rate=q,
                                                    steps=t).to_dict()],
                    accountant="prv", delta=DELTA, epsilon_before=0.0, epsilon_after=0.0,
                    epsilon_limit=1e9, insecure=False)
    return led


def timed(fn: Callable[[], float]) -> tuple[float, float]:
    _cold()
    t0 = time.perf_counter()
    value = fn()
    return time.perf_counter() - t0, value


def pld(history: list[tuple[float, float, int]]) -> float | None:
    try:
        import dp_accounting as dpa
        from dp_accounting.pld import pld_privacy_accountant
    except ImportError:
        return None
    ev = dpa.ComposedDpEvent([
        dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(s)), t)
        if q < 1 else dpa.GaussianDpEvent(s / np.sqrt(t)) for s, q, t in history])
    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-3)
    return float(acc.compose(ev).get_epsilon(DELTA))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline-timeout", type=float, default=120.0)
    ap.add_argument("--no-pld", action="store_true", help="skip the dp_accounting check")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "accounting.json")
    args = ap.parse_args()
    from fedvault.reports import ledger_report
    from privacy.accountants import get_accountant

    console = Console(width=150)
    rows: list[dict[str, Any]] = []
    for case in CASES:
        history, planned = case["history"], case["planned"]
        with tempfile.TemporaryDirectory() as tmp:
            led = _ledger_with(history, Path(tmp))
            ev = Event(noise_multiplier=planned[0], sample_rate=planned[1], steps=planned[2])

            def reserve(led: Any = led, ev: Event = ev) -> float:
                return float(led.reserve("site", [ev], run_id="bench", server_round=0,
                                         delta=DELTA, limit=1e9,
                                         dataset="d" * 32)["epsilon_after"])

            t_res, _ = timed(reserve)
            # the report of the history (before the reservation above was added)
            led2 = _ledger_with(history, Path(tmp) / "r")

            def report(p: Path = led2.path) -> float:
                return float(ledger_report(p)["scopes"][0]["epsilon_spent"])

            t_rep, eps = timed(report)
        b_res, _ = run_legacy("reserve", (history, planned), args.baseline_timeout)
        b_rep, b_eps = run_legacy("report", history, args.baseline_timeout)
        ref = None if args.no_pld else pld(history)
        for op, before, after in (("reserve", b_res, t_res), ("report", b_rep, t_rep)):
            rows.append({"case": case["name"], "operation": op, "before_s": before,
                         "after_s": round(after, 4),
                         "epsilon_before": None if b_eps is None else round(b_eps, 5),
                         "epsilon_after": round(eps, 5),
                         "epsilon_pld": None if ref is None else round(ref, 5)})
    prv = get_accountant("prv")
    for name, q, steps in CALIBRATIONS:
        def calibrate(q: float = q, steps: int = steps) -> float:
            return prv.noise_for(target_epsilon=8.0, delta=DELTA, sample_rate=q, steps=steps)

        t_cal, sigma = timed(calibrate)
        b_cal, b_sigma = run_legacy("calibrate", (q, steps), args.baseline_timeout)
        rows.append({"case": name, "operation": "calibrate", "before_s": b_cal,
                     "after_s": round(t_cal, 4),
                     "sigma_before": None if b_sigma is None else round(b_sigma, 5),
                     "sigma_after": round(sigma, 5)})

    t = Table(title="privacy accounting: before and after (cold, seconds)")
    for col in ("case", "operation", "before", "after", "speed-up", "ε / σ before",
                "ε / σ after", "ε PLD"):
        t.add_column(col, justify="left" if col in ("case", "operation") else "right")
    for r in rows:
        before = r["before_s"]
        b = f"> {args.baseline_timeout:g}" if before is None else f"{before:.3f}"
        speed = (f"> {args.baseline_timeout / r['after_s']:.0f}x" if before is None
                 else f"{before / r['after_s']:.1f}x")
        vb = r.get("epsilon_before", r.get("sigma_before"))
        va = r.get("epsilon_after", r.get("sigma_after"))
        t.add_row(r["case"], r["operation"], b, f"{r['after_s']:.3f}", speed,
                  "-" if vb is None else f"{vb:.4f}", f"{va:.4f}",
                  "-" if r.get("epsilon_pld") is None else f"{r['epsilon_pld']:.4f}")
    console.print(t)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"delta": DELTA, "baseline_timeout_s": args.baseline_timeout,
                                    "rows": rows}, indent=2) + "\n")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
