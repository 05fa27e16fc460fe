"""Wall time and peak memory of fedvault's two main jobs, measured side by side.

    python bench/footprint.py [--only simulate|rehearse] [--out bench/results/footprint.json]

Runs, each as a fresh process:
  * ``fedvault simulate``            the default simulation (digits, 10 sites, Dirichlet
                                     0.5, 5 rounds) on Flower's Simulation Engine (Ray)
  * ``fedvault rehearse --sites 3``  the loopback deployment (real SuperLink + 3
                                     SuperNodes, 5 rounds)

Peak memory is the largest *sum* of resident set sizes over the whole process
tree (Ray's GCS, raylet and workers; SuperLink, SuperNodes, ServerApp and
ClientApp processes), sampled every 0.2 s from /proc. A single-process
``ru_maxrss`` would miss all but the largest process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
PAGE = os.sysconf("SC_PAGE_SIZE")


def _pss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def tree_rss(root_pid: int) -> tuple[int, int, int]:
    """(total RSS bytes, total PSS bytes, process count) of ``root_pid`` and all its
    descendants. PSS splits shared pages (torch's libraries, mapped by every
    process) between the processes sharing them, so its sum is the real footprint;
    the RSS sum counts shared pages once per process."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            fields = stat.rsplit(") ", 1)[1].split()
            ppid = int(fields[1])
            rss[int(d.name)] = int(fields[21]) * PAGE
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(d.name))
    total, pss, count, stack = 0, 0, 0, [root_pid]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        pss += _pss(pid)
        count += 1
        stack.extend(children.get(pid, []))
    return total, pss, count


def measure(name: str, argv: list[str]) -> dict[str, object]:
    peak, peak_pss, peak_procs = 0, 0, 0
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak, peak_pss, peak_procs
        while not stop.is_set():
            total, pss, n = tree_rss(proc.pid)
            if total > peak:
                peak, peak_procs = total, n
            peak_pss = max(peak_pss, pss)
            stop.wait(0.2)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, _ = proc.communicate()
    stop.set()
    th.join()
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed ({proc.returncode}):\n{out}")
    return {"job": name, "command": " ".join(argv[2:]), "wall_seconds": round(wall, 1),
            "peak_pss_mib": round(peak_pss / 2**20, 1), "peak_rss_sum_mib": round(peak / 2**20, 1),
            "processes_at_peak": peak_procs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--only", choices=["simulate", "rehearse"])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "footprint.json")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fedvault-bench-"))
    jobs = {
        "simulate": [sys.executable, "-m", "fedvault", "simulate", "--out", str(tmp / "sim"),
                     "--json"],
        "rehearse": [sys.executable, "-m", "fedvault", "rehearse", "--sites", "3",
                     "--out", str(tmp / "reh"), "--json"],
    }
    rows = []
    for name, argv in jobs.items():
        if args.only and name != args.only:
            continue
        row = measure(name, argv)
        summary = json.loads((tmp / ("sim" if name == "simulate" else "reh") / "summary.json")
                             .read_text())
        row["final_accuracy"] = summary["final_accuracy"]
        row["rounds"] = summary["rounds"]
        row["sites"] = summary["sites"]
        rows.append(row)
    t = Table(title=f"fedvault footprint ({os.cpu_count()} cores)")
    cols = ("job", "sites", "rounds", "wall_seconds", "peak_pss_mib", "peak_rss_sum_mib",
            "processes_at_peak", "final_accuracy")
    for col in cols:
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(*(str(r[c]) for c in cols))
    Console(width=140).print(t)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cores": os.cpu_count(), "results": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
