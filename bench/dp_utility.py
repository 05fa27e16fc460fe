"""Utility of DP: the default digits federation at epsilon 1, 3, 8 and without DP,
side by side in one run, plus the per-step cost of DP-SGD.

    python bench/dp_utility.py [--seeds 3] [--out bench/results/dp_utility.json]

Each configuration is the default simulation (digits, 10 sites, Dirichlet 0.5,
5 rounds, the run config's defaults), repeated over ``--seeds`` seeds (secure
mode on: the noise differs at every run, so the mean and spread are reported).
Every site's epsilon is its ledger's, at delta 1e-5 (PRV accountant).

The per-step table times one site's local training on its partition, the same
model and batch, with plain SGD, DP-SGD with the CSPRNG noise (secure mode,
the default) and DP-SGD with torch's PRNG noise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from client.dp_sgd import plan_round, train_dp  # noqa: E402
from client.site_data import resolve_site_data  # noqa: E402
from client.training import train_local  # noqa: E402
from fedvault_tasks.tasks import get_task  # noqa: E402
from protocols.config import RunSettings  # noqa: E402
from protocols.node_config import NodeConfig  # noqa: E402
from simulations.runner import simulate  # noqa: E402

CONFIGS: list[tuple[str, dict[str, object]]] = [
    ("no DP", {"dp": False}),
    ("ε = 8", {"target_epsilon": 8.0}),
    ("ε = 3", {"target_epsilon": 3.0}),
    ("ε = 1", {"target_epsilon": 1.0}),
]


def utility(seeds: int, tmp: Path, he: bool) -> list[dict[str, object]]:
    rows = []
    for label, changes in CONFIGS:
        accs, eps, walls = [], [], []
        for seed in range(seeds):
            settings = RunSettings(run_dir=str(tmp / f"{label}-{seed}".replace(" ", "")),
                                   seed=seed, he=he, **changes)  # type: ignore[arg-type]
            t0 = time.monotonic()
            s = simulate(settings, sites=10)
            walls.append(time.monotonic() - t0)
            # Under HE the server cannot evaluate: score the released model (decrypted by
            # a simulated key holder) on the same central test split.
            acc = s["released_model"]["central_accuracy"] if he else s["final_accuracy"]
            accs.append(float("nan") if acc is None else float(acc))
            site_eps = [x["epsilon"] for x in s["privacy"]["sites"] if x["epsilon"] is not None]
            eps.append(max(site_eps) if site_eps else 0.0)
            print(f"  {label} seed {seed}: accuracy {accs[-1]:.4f}, max site ε {eps[-1]:.3f}",
                  flush=True)
        rows.append({
            "config": label, "target_epsilon": changes.get("target_epsilon"),
            "accuracy_mean": round(statistics.mean(accs), 4),
            "accuracy_std": round(statistics.pstdev(accs), 4),
            "accuracy_min": round(min(accs), 4),
            "accuracies": accs,
            "max_site_epsilon": round(max(eps), 4),
            "wall_seconds_mean": round(statistics.mean(walls), 1),
        })
    return rows


def per_step(repeats: int = 5) -> list[dict[str, object]]:
    torch.set_num_threads(1)
    settings = RunSettings()
    site = resolve_site_data(settings, NodeConfig.parse({"partition-id": 0, "num-partitions": 10},
                                                         simulated=True),
                             key=b"bench-site-0")
    task = get_task("digits")
    plan = plan_round(num_examples=len(site.train), batch_size=32, epochs=5,
                      noise_multiplier=1.0, max_grad_norm=1.0)
    out = []
    for label, fn in (
        ("SGD (no DP)", lambda m: train_local(m, site.train, epochs=5, batch_size=32,
                                              learning_rate=0.1, momentum=0.9, seed=0)),
        ("DP-SGD, CSPRNG noise", lambda m: train_dp(m, site.train, plan, learning_rate=0.1,
                                                   momentum=0.9, secure_mode=True, seed=0)),
        ("DP-SGD, PRNG noise", lambda m: train_dp(m, site.train, plan, learning_rate=0.1,
                                                 momentum=0.9, secure_mode=False, seed=0)),
    ):
        times = []
        for _ in range(repeats):
            model = task.build_model()
            t0 = time.perf_counter()
            res = fn(model)
            times.append((time.perf_counter() - t0) / max(res.steps, 1))
        out.append({"mode": label, "ms_per_step": round(1000 * statistics.median(times), 3),
                    "batch": 32, "examples": len(site.train)})
    base = float(out[0]["ms_per_step"])  # type: ignore[arg-type]
    for r in out:
        r["overhead_x"] = round(float(r["ms_per_step"]) / base, 2)  # type: ignore[arg-type]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--he", action="store_true",
                    help="with encrypted aggregation (the CLI's default), scoring the released "
                    "model on the central test split")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "dp_utility.json")
    args = ap.parse_args()
    console = Console(width=120)
    tmp = Path(tempfile.mkdtemp(prefix="fedvault-dp-bench-"))
    console.print("[bold]utility[/] (digits, 10 sites, Dirichlet 0.5, 5 rounds)")
    rows = utility(args.seeds, tmp, args.he)
    steps = per_step()
    t = Table(title=f"final accuracy vs privacy ({args.seeds} seeds each, δ = 1e-5, PRV"
              f"{', encrypted aggregation' if args.he else ''})")
    for c in ("config", "accuracy (mean ± sd)", "min", "max site ε", "wall s"):
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(str(r["config"]), f"{r['accuracy_mean']:.4f} ± {r['accuracy_std']:.4f}",
                  f"{r['accuracy_min']:.4f}", f"{r['max_site_epsilon']:.3f}",
                  f"{r['wall_seconds_mean']:.1f}")
    console.print(t)
    t2 = Table(title="local training cost per step (one site, batch 32, 1 thread)")
    for c in ("mode", "ms / step", "× SGD"):
        t2.add_column(c, justify="right")
    for r in steps:
        t2.add_row(str(r["mode"]), f"{r['ms_per_step']:.3f}", f"{r['overhead_x']:.2f}")
    console.print(t2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"he": args.he, "utility": rows, "per_step": steps},
                                   indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
