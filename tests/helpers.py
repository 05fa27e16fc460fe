"""Helpers for tests that run the real command line and real processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str, timeout: float = 600, cwd: Path | None = None
            ) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "120"}
    return subprocess.run([sys.executable, "-m", "fedvault", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd or ROOT, env=env)


def processes_with_flwr_home_under(root: Path) -> list[int]:
    """PIDs of live (non-zombie) processes whose FLWR_HOME lies under ``root``."""
    found = []
    prefix = f"FLWR_HOME={root.resolve()}".encode()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            env = (d / "environ").read_bytes()
            state = (d / "stat").read_text().split(") ", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and any(v.startswith(prefix) for v in env.split(b"\0")):
            found.append(int(d.name))
    return found
