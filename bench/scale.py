"""Scale benchmark: the ``cross-device-1000`` and ``cross-device-10k`` scenarios, each
against plain Flower, in one run.

    python bench/scale.py [--rounds 10] [--repeat 1]
                          [--scenarios cross-device-1000,cross-device-10k]
                          [--out bench/results/scale.json]

Two jobs, each a fresh process measured from outside (wall time, peak PSS of the
whole process tree, as ``bench/footprint.py``):

* ``fedvault``: ``fedvault simulate cross-device-1000`` — fedvault's ServerApp and
  ClientApp with every layer on: per-reply validation, hash-chained run records
  and per-round model files, the simulated network (site discovery, byte
  counting, clock, dropouts), the scenario's per-site data partition.
* ``plain-flower``: Flower's own Message-API ``FedAvg`` on the same Simulation
  Engine and Ray resources, with the same 1000 clients, the same data file and
  partition, the same model, local training loop and hyper-parameters, the same
  per-round central evaluation and the same clients dropping out in the same
  rounds (a dropped client raises, so Flower discards it) — and none of
  fedvault's layers.

Targets: fedvault's wall time at most 1.2x plain Flower's (issue #5), and 10,000
sites x 10 rounds in under 10 minutes on this 2-core machine (issue #13); the
table shows how each job's wall time grows from 1,000 to 10,000 sites.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

TARGET_RATIO = 1.2
TARGET_SECONDS = 600.0


# --------------------------------------------------------------------------------------
# the plain Flower baseline (runs inside its own process: --plain-worker)
# --------------------------------------------------------------------------------------
def plain_flower(scenario_name: str, rounds: int, work: Path) -> dict[str, Any]:
    import hashlib

    import numpy as np
    import torch
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    from client.data import load_table, split_site
    from client.training import train_local
    from fedvault_tasks.tasks import (
        TEST_FRACTION,
        FeatureBounds,
        Table,
        evaluate,
        get_task,
        split_train_test,
    )
    from simulations.behaviour import ONLINE, fate
    from simulations.runner import generate_table, quiet_flower
    from simulations.scenario import load_scenario

    scenario = load_scenario(scenario_name)
    s = scenario.settings(run_dir=str(work)).replace(num_server_rounds=rounds)
    task = get_task(s.task)
    data = generate_table(work / "data.npz", *scenario.data.generate, seed=s.seed)
    n_sites = scenario.num_sites
    cache: dict[str, Any] = {}

    def pool() -> tuple[Table, Table, np.ndarray]:
        if not cache:
            full = load_table(str(data), label_column="label")
            train, test = split_train_test(full, test_fraction=TEST_FRACTION, seed=s.seed)
            cache["p"] = (train, test, scenario.owners(train.y, seed=s.seed))
        return cache["p"]

    def site_data(k: int) -> tuple[Table, Table]:
        train, _, owners = pool()
        raw = train.subset(np.flatnonzero(owners == k))
        # the same per-record keyed split and declared-bounds scaling as fedvault's sites
        tr, va = split_site(raw, key=hashlib.sha256(f"bench-site-{k}".encode()).digest())
        b = bounds()
        return (Table(x=task.preprocess(tr.x, b), y=tr.y),
                Table(x=task.preprocess(va.x, b), y=va.y))

    def bounds() -> FeatureBounds | None:
        if task.fixed_scale is not None:
            return None
        train, _, _ = pool()
        lo, hi = train.x.min(axis=0), train.x.max(axis=0)
        return FeatureBounds(low=lo, high=np.where(hi > lo, hi, lo + 1.0).astype(np.float32))

    def model() -> torch.nn.Module:
        return task.build_model(num_features=s.num_features, num_classes=s.num_classes)

    client = ClientApp()

    def receive(msg: Message, context: Context) -> tuple[Table, Table, torch.nn.Module]:
        """The site's (train, validation) data and the global model; a client that
        drops out this round raises, so Flower discards it as fedvault's network does."""
        torch.set_num_threads(1)
        k = int(context.node_config["partition-id"])
        r = int(msg.content.config_records["config"]["server-round"])  # type: ignore[arg-type]
        if fate(scenario.site(k), seed=s.seed, site=k, server_round=r) != ONLINE:
            raise RuntimeError("dropped out")
        m = model()
        m.load_state_dict(msg.content.array_records["arrays"].to_torch_state_dict())
        return (*site_data(k), m)

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        tr, _, m = receive(msg, context)
        res = train_local(m, tr, epochs=s.local_epochs, batch_size=s.batch_size,
                          learning_rate=s.learning_rate, momentum=s.momentum,
                          seed=int(context.node_config["partition-id"]),
                          max_grad_norm=s.max_grad_norm)
        return Message(RecordDict({"arrays": ArrayRecord(m.state_dict()), "metrics":
                                   MetricRecord({"num-examples": res.num_examples})}),
                       reply_to=msg)

    @client.evaluate()
    def evaluate_fn(msg: Message, context: Context) -> Message:
        _, val, m = receive(msg, context)
        loss, acc = evaluate(m, val)
        return Message(RecordDict({"metrics": MetricRecord(
            {"eval-loss": loss, "eval-acc": acc, "num-examples": len(val)})}), reply_to=msg)

    server = ServerApp()
    history: list[dict[str, float]] = []

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        torch.manual_seed(s.seed)
        _, test, _ = pool()
        test_p = Table(x=task.preprocess(test.x, bounds()), y=test.y)

        def central(rnd: int, arrays: ArrayRecord) -> MetricRecord:
            m = model()
            m.load_state_dict(arrays.to_torch_state_dict())
            loss, acc = evaluate(m, test_p)
            history.append({"round": rnd, "accuracy": acc, "loss": loss})
            return MetricRecord({"accuracy": acc, "loss": loss})

        FedAvg(fraction_train=s.fraction_train, fraction_evaluate=s.fraction_evaluate,
               min_train_nodes=s.min_sites, min_evaluate_nodes=1,
               min_available_nodes=s.min_sites).start(
            grid=grid, initial_arrays=ArrayRecord(model().state_dict()), num_rounds=rounds,
            timeout=3600, train_config=ConfigRecord({}), evaluate_fn=central)

    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    t0 = time.monotonic()
    with quiet_flower(False):
        run_simulation(server_app=server, client_app=client, num_supernodes=n_sites,
                       backend_config={"client_resources": {"num_cpus": 1.0, "num_gpus": 0.0},
                                       "init_args": {"num_cpus": os.cpu_count() or 1,
                                                     "logging_level": "ERROR",
                                                     "log_to_driver": False,
                                                     "include_dashboard": False}})
    out = {"history": history, "wall_seconds": time.monotonic() - t0,
           "final_accuracy": history[-1]["accuracy"] if history else None}
    (work / "plain.json").write_text(json.dumps(out, indent=2))
    return out


# --------------------------------------------------------------------------------------
# the benchmark
# --------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--scenarios", default="cross-device-1000,cross-device-10k",
                    help="scenarios to run, each against plain Flower (comma-separated)")
    ap.add_argument("--scenario", default=None, help=argparse.SUPPRESS)  # the worker's
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=1,
                    help="run each job this many times, interleaved; report the median "
                    "wall time and the largest peak memory")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "scale.json")
    ap.add_argument("--plain-worker", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--sweep", default="",
                    help="instead: fedvault alone at these numbers of sites (e.g. "
                    "100,1000,5000), same data and 100 training sites sampled per round, "
                    "to show how memory and time grow with the federation")
    args = ap.parse_args()
    if args.plain_worker is not None:
        plain_flower(args.scenario or "cross-device-1000", args.rounds, args.plain_worker)
        return
    if args.sweep:
        sweep(args.scenario or "cross-device-1000", [int(n) for n in args.sweep.split(",")],
              args.rounds, args.out)
        return

    import statistics

    from footprint import measure
    from rich.console import Console
    from rich.table import Table

    from simulations.scenario import load_scenario

    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    rows: list[dict[str, Any]] = []
    for name in names:
        scenario = load_scenario(name)
        settings = scenario.settings(run_dir="x")
        tmp = Path(tempfile.mkdtemp(prefix="fedvault-scale-"))
        (tmp / "plain").mkdir()
        fed_run = tmp / "fedvault"
        jobs = {
            "fedvault": [sys.executable, "-m", "fedvault", "simulate", name,
                         "--rounds", str(args.rounds), "--out", str(fed_run), "--json"],
            "plain Flower": [sys.executable, str(Path(__file__).resolve()), "--scenario",
                             name, "--rounds", str(args.rounds),
                             "--plain-worker", str(tmp / "plain")],
        }
        # sampled client-rounds (train + evaluate messages) in either run
        per_round = (round(settings.fraction_train * scenario.num_sites)
                     + round(settings.fraction_evaluate * scenario.num_sites))
        samples: dict[str, list[dict[str, Any]]] = {job: [] for job in jobs}
        for i in range(args.repeat):  # interleaved, so drift hits both jobs alike
            for job, argv in jobs.items():
                print(f"running {name}: {job} ({i + 1}/{args.repeat}) ...", flush=True)
                if job == "fedvault" and fed_run.exists():
                    shutil.rmtree(fed_run)
                samples[job].append(measure(job, argv))
        for job, runs in samples.items():
            walls = [float(r["wall_seconds"]) for r in runs]
            row = dict(runs[0])
            row.update(scenario=name, sites=scenario.num_sites, job=job)
            row["wall_seconds"] = round(statistics.median(walls), 1)
            row["wall_seconds_all"] = walls
            row["peak_pss_mib"] = max(float(r["peak_pss_mib"]) for r in runs)
            row["peak_rss_sum_mib"] = max(float(r["peak_rss_sum_mib"]) for r in runs)
            if job == "fedvault":
                summary = json.loads((fed_run / "summary.json").read_text())
                row["final_accuracy"] = summary["final_accuracy"]
                row["simulated_seconds"] = summary.get("simulated_seconds")
                events = [json.loads(line) for line in (fed_run / "events.jsonl").open()]
                # round 1 holds the one-off costs: Ray's actors starting, the nodes
                # joining and the site identities, then the first round's work
                row["round1_seconds"] = next(e["seconds"] for e in events
                                             if e["kind"] == "round_completed"
                                             and e["round"] == 1)
                later = [e["seconds"] for e in events
                         if e["kind"] == "round_completed" and e["round"] > 1]
                row["later_round_seconds"] = round(sum(later) / max(len(later), 1), 2)
            else:
                plain = json.loads((tmp / "plain" / "plain.json").read_text())
                row["final_accuracy"] = round(plain["final_accuracy"], 6)
            row["ms_per_client_round"] = round(1000 * row["wall_seconds"] /
                                               (per_round * args.rounds), 2)
            rows.append(row)
        fed = rows[-2]
        fed["over_plain"] = round(fed["wall_seconds"] / rows[-1]["wall_seconds"], 3)
        fed["seconds_met"] = fed["wall_seconds"] < TARGET_SECONDS
    t = Table(title=f"scale: fedvault against plain Flower, {args.rounds} rounds, "
              f"median of {args.repeat} ({os.cpu_count()} cores)")
    cols = ("scenario", "sites", "job", "wall_seconds", "wall_seconds_all", "round1_seconds",
            "later_round_seconds", "over_plain", "ms_per_client_round", "peak_pss_mib",
            "peak_rss_sum_mib", "final_accuracy")
    for c in cols:
        t.add_column(c.replace("_", " "), justify="right")
    for r in rows:
        t.add_row(*(str(r.get(c, "")) for c in cols))
    Console(width=170).print(t)
    growth: dict[str, float] = {}
    if len(names) > 1:
        for job in ("fedvault", "plain Flower"):
            mine = [r for r in rows if r["job"] == job]
            growth[job] = round(mine[-1]["wall_seconds"] / mine[0]["wall_seconds"], 2)
        print(f"wall time from {rows[0]['sites']} to {rows[-1]['sites']} sites: fedvault "
              f"{growth['fedvault']}x, plain Flower {growth['plain Flower']}x")
    for r in rows:
        if r["job"] == "fedvault":
            print(f"{r['scenario']}: fedvault {r['wall_seconds']} s (target < "
                  f"{TARGET_SECONDS:.0f} s: {'met' if r['seconds_met'] else 'NOT met'}), "
                  f"{r['over_plain']}x plain Flower (target <= {TARGET_RATIO}x)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cores": os.cpu_count(), "rounds": args.rounds,
                                    "repeat": args.repeat, "results": rows,
                                    "growth": growth, "overhead_target": TARGET_RATIO,
                                    "seconds_target": TARGET_SECONDS}, indent=2) + "\n")
    print(f"wrote {args.out}")


def sweep(name: str, sizes: list[int], rounds: int, out: Path) -> None:
    """fedvault alone on the scenario rescaled to each size (group shares kept)."""
    import tomllib

    import tomli_w
    from footprint import measure
    from rich.console import Console
    from rich.table import Table

    from simulations.scenario import builtin_path, builtin_scenarios

    src = builtin_path(name) if name in builtin_scenarios() else Path(name)
    doc = tomllib.loads(src.read_text())
    total = sum(int(g.get("count", 1)) for g in doc["sites"])
    run = doc.setdefault("run", {})
    sampled = int(run.pop("sites-per-round", 0)) or round(
        float(run.get("fraction-train", 1.0)) * total)
    evaluated = round(float(run.get("fraction-evaluate", 1.0)) * total)
    tmp = Path(tempfile.mkdtemp(prefix="fedvault-sweep-"))
    rows = []
    for n in sizes:
        variant = {**doc, "name": f"{doc.get('name', 'scenario')}-{n}",
                   "run": {**run, "num-server-rounds": rounds,
                           "fraction-train": min(1.0, sampled / n),
                           "fraction-evaluate": min(1.0, evaluated / n)},
                   "sites": [{**g, "count": max(1, round(int(g.get("count", 1)) * n / total))}
                             for g in doc["sites"]]}
        path = tmp / f"{n}.toml"
        path.write_text(tomli_w.dumps(variant))
        print(f"running fedvault with {n} sites ...", flush=True)
        row = measure(f"fedvault-{n}", [sys.executable, "-m", "fedvault", "simulate", str(path),
                                        "--out", str(tmp / f"run-{n}"), "--json"])
        events = [json.loads(line) for line in (tmp / f"run-{n}" / "events.jsonl").open()]
        first = next(e for e in events if e["kind"] == "round_completed")
        row["sites"] = n
        # from the ServerApp's start: waiting for the nodes, site discovery, round 0
        row["start_seconds"] = first["seconds"]
        rows.append(row)
    t = Table(title=f"fedvault at scale: {name} rescaled, {rounds} rounds ({os.cpu_count()} cores)")
    cols = ("sites", "wall_seconds", "start_seconds", "peak_pss_mib", "peak_rss_sum_mib")
    for c in cols:
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(*(str(r[c]) for c in cols))
    Console(width=140).print(t)
    out = out.with_name("scale-sweep.json") if out.name == "scale.json" else out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cores": os.cpu_count(), "scenario": name, "rounds": rounds,
                               "results": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
