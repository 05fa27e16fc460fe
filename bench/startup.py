"""Start-up time of the light commands, before and after, side by side in one run.

    python bench/startup.py [--baseline REV] [--repeat 5] [--out bench/results/startup.json]

Each row is the wall time of one whole process (median of ``--repeat`` runs, after
one warm-up run that fills the OS file cache), as a user types it:

* ``python -c pass`` and ``python -c "import flwr"``: the floors;
* ``fedvault --help``;
* ``fedvault provision --sites 3 --out DIR`` (a new directory each time: it writes
  the HE contexts, so it includes TenSEAL key generation);
* ``fedvault budget verify LEDGER`` and ``fedvault budget report LEDGER`` on a
  ledger of 20 reservations (the report recomputes every epsilon with the ledger's
  accountant, Opacus's PRV).

"before" is fedvault at ``--baseline`` (default: the commit before the layering
change), checked out in a temporary git worktree and run from there with the same
interpreter; "after" is the working tree.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
BASELINE = "5516ae5"
_LAUNCH = ("import sys; sys.path.insert(0, {root!r}); from fedvault.cli import main; "
           "sys.exit(main())")


def _make_ledger(path: Path) -> None:
    """20 rounds of DP-SGD reserved in a real ledger, as a site writes them."""
    from privacy.events import SubsampledGaussianEvent
    from privacy.ledger import PrivacyLedger

    led = PrivacyLedger(path, accountant="prv", site_secret=False)
    led.register("d" * 64, source="bench", rows=1000, fingerprint="d" * 64)
    ev = SubsampledGaussianEvent(noise_multiplier=1.1, sample_rate=0.1, steps=80)
    for r in range(1, 21):
        led.reserve("site", [ev], run_id="bench", server_round=r, delta=1e-5, limit=1e9,
                    dataset="d" * 64)


def _time(cmd: list[str], *, cwd: Path, repeat: int, fresh: Path | None = None) -> float:
    times = []
    for i in range(repeat + 1):
        argv = list(cmd)
        if fresh is not None:  # provision refuses an existing federation
            out = fresh / f"fed-{time.monotonic_ns()}"
            argv += ["--out", str(out)]
        t0 = time.perf_counter()
        r = subprocess.run(argv, cwd=cwd, capture_output=True, text=True,
                           env={**os.environ, "PYTHONDONTWRITEBYTECODE": "0"})
        dt = time.perf_counter() - t0
        if r.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()}")
        if i:  # the first run warms the file cache
            times.append(dt)
    return statistics.median(times)


def _fedvault(root: Path, *args: str) -> list[str]:
    return [sys.executable, "-c", _LAUNCH.format(root=str(root)), *args]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", default=BASELINE, help="git revision of 'before'")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "startup.json")
    args = ap.parse_args(argv)
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        ledger = tmp / "ledger.jsonl"
        _make_ledger(ledger)
        before = tmp / "before"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(before),
                        args.baseline], check=True, capture_output=True)
        try:
            rows: list[dict[str, Any]] = []
            floors = {"python -c pass": [py, "-c", "pass"],
                      "python -c 'import flwr'": [py, "-c", "import flwr"]}
            for name, cmd in floors.items():
                t = _time(cmd, cwd=tmp, repeat=args.repeat)
                rows.append({"command": name, "before": t, "after": t})
            cases = {
                "fedvault --help": (["--help"], False),
                "fedvault provision --sites 3": (["provision", "--sites", "3"], True),
                "fedvault budget verify LEDGER": (["budget", "verify", str(ledger)], False),
                "fedvault budget report LEDGER": (["budget", "report", str(ledger)], False),
            }
            for name, (cli, fresh) in cases.items():
                row: dict[str, Any] = {"command": name}
                for label, root in (("before", before), ("after", ROOT)):
                    row[label] = _time(_fedvault(root, *cli), cwd=root, repeat=args.repeat,
                                       fresh=tmp if fresh else None)
                rows.append(row)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                            str(before)], capture_output=True)
            shutil.rmtree(before, ignore_errors=True)
    flwr_s = rows[1]["after"]
    table = Table(title=f"start-up, wall seconds (median of {args.repeat}; before = "
                  f"{args.baseline})")
    for col in ("command", "before", "after", "after / import flwr"):
        table.add_column(col, justify="left" if col == "command" else "right")
    for r in rows:
        table.add_row(r["command"], f"{r['before']:.2f}", f"{r['after']:.2f}",
                      f"{r['after'] / flwr_s:.2f}x")
    Console().print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"baseline": args.baseline, "repeat": args.repeat,
                                    "python": sys.version.split()[0], "rows": rows},
                                   indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
