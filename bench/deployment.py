"""The secure-by-default rehearsal against the insecure one, side by side.

    python bench/deployment.py [--sites 3] [--rounds 1] [--repeats 1]
                               [--out bench/results/deployment.json]

Runs ``fedvault rehearse --sites N --rounds R`` (the command the first-deployment
tutorial gives: real ``flower-superlink``, N sites started as ``fedvault site start``
starts them, ``flwr run``) alternately with the secure default (TLS, node
authentication, the key ceremony, DP and HE) and with ``--insecure`` (no TLS, no node
authentication, HE provisioned by one party), ``--repeats`` times each, interleaved so
that a drift of the machine hits
both. Per run:

* ``wall s``: the command's wall time, start to exit;
* ``CPU s``: user + system CPU of the whole process tree (the rehearsal reaps every
  process of the deployment, so ``getrusage(RUSAGE_CHILDREN)`` of this process covers
  them all);
* ``peak MiB``: the peak, over 0.25 s samples, of the summed resident memory (VmRSS) of
  the ``fedvault rehearse`` process and every process whose FLWR_HOME lies under the
  run directory (SuperLink, ServerApp, SuperNodes, superexecs, ClientApps);
* ``rounds s``: the rounds' own seconds (from the run's summary), so the rest of the
  wall time is set-up (certificates, keys, the ceremony, processes up) and tear-down.

Prints one table and writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _tree_rss_kib(root: Path, top: int) -> int:
    prefix = f"FLWR_HOME={root.resolve()}".encode()
    total = _rss_kib(top)
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == top:
            continue
        try:
            env = (d / "environ").read_bytes()
        except OSError:
            continue
        if any(v.startswith(prefix) for v in env.split(b"\0")):
            total += _rss_kib(int(d.name))
    return total


def run_once(secure: bool, sites: int, rounds: int, work: Path) -> dict[str, Any]:
    out = work / f"{'secure' if secure else 'insecure'}-{time.monotonic_ns()}"
    argv = [sys.executable, "-m", "fedvault", "rehearse", "--sites", str(sites),
            "--rounds", str(rounds), "--out", str(out), "--json"]
    if not secure:
        argv.append("--insecure")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "COLUMNS": "120"})
    peak = 0
    stop = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _tree_rss_kib(out, proc.pid))
            stop.wait(0.25)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    stdout, stderr = proc.communicate(timeout=1800)
    wall = time.monotonic() - t0
    stop.set()
    watcher.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"rehearse failed ({proc.returncode}):\n{stderr.decode()[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    del stdout
    return {
        "secure": secure,
        "wall_s": round(wall, 1),
        "cpu_s": round((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), 1),
        "peak_mib": round(peak / 1024, 1),
        "status": summary["status"],
        "final_accuracy": summary.get("final_accuracy"),
        "transport": summary["deployment"]["transport"],
        "round_seconds": [h["seconds"] for h in summary["history"][1:]],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "deployment.json")
    args = ap.parse_args()
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fedvault-bench-") as tmp:
        for _ in range(args.repeats):
            for secure in (False, True):
                r = run_once(secure, args.sites, args.rounds, Path(tmp))
                print(f"{'secure' if secure else 'insecure'}: {r['wall_s']} s wall, "
                      f"{r['cpu_s']} s CPU, {r['peak_mib']} MiB peak", flush=True)
                runs.append(r)
    rows = []
    for secure in (False, True):
        mine = [r for r in runs if r["secure"] is secure]
        rows.append({
            "run": "secure default (TLS, node auth, key ceremony)" if secure else
                   "--insecure (no TLS, no node auth, one-party HE)",
            "wall_s": round(sum(r["wall_s"] for r in mine) / len(mine), 1),
            "cpu_s": round(sum(r["cpu_s"] for r in mine) / len(mine), 1),
            "peak_mib": round(max(r["peak_mib"] for r in mine), 1),
            "round_s": round(sum(sum(r["round_seconds"]) for r in mine) / len(mine), 1),
        })
    base = rows[0]
    print(f"\nfedvault rehearse --sites {args.sites} --rounds {args.rounds} "
          f"(mean of {args.repeats}; peak: max)")
    print("| run | wall s | CPU s | peak MiB | rounds s | wall vs insecure |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['run']} | {row['wall_s']} | {row['cpu_s']} | {row['peak_mib']} | "
              f"{row['round_s']} | {row['wall_s'] / base['wall_s']:.2f}x |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"sites": args.sites, "rounds": args.rounds,
                                    "repeats": args.repeats, "table": rows, "runs": runs},
                                   indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
