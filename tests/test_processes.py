"""Process supervision on real processes (fedvault.processes): a supervisor stopped with
Ctrl-C stops what it started; one killed outright (SIGKILL: no cleanup runs) is cleaned
up by its guard, grandchildren in sessions of their own included. (The loopback guide
test plays the same on Flower's processes, with `fedvault site start`.)"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT, processes_with_flwr_home_under

SUPERVISOR = """
import sys, time
from pathlib import Path
from fedvault.processes import Deployment, sigterm_as_interrupt

root = Path(sys.argv[1])
dep = Deployment(root=root)
env = {"FLWR_HOME": str(root / "home"), "PATH": "/usr/bin:/bin"}
dep.spawn("sleeper", [sys.argv[2], "300"], env=env)
# a child that starts a grandchild in a session of its own, as Flower's SuperNode does
dep.spawn("parent", [sys.executable, "-c", "import subprocess, sys, time; "
                     f"subprocess.Popen([{sys.argv[2]!r}, '300'], start_new_session=True); "
                     "time.sleep(300)"], env=env)
with sigterm_as_interrupt():
    try:
        print("ready", dep.guard.pid if dep.guard else 0, flush=True)
        time.sleep(300)
    except KeyboardInterrupt:
        sys.exit(130)
    finally:
        dep.stop(grace=2)
"""


def _supervise(root: Path) -> tuple[subprocess.Popen[str], int]:
    sleep = shutil.which("sleep")
    assert sleep
    proc = subprocess.Popen([sys.executable, "-c", SUPERVISOR, str(root), sleep], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    assert line and line[0] == "ready", proc.communicate(timeout=10)
    deadline = time.monotonic() + 20
    while len(processes_with_flwr_home_under(root)) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)  # sleeper, parent's interpreter, its grandchild
    assert len(processes_with_flwr_home_under(root)) >= 3
    return proc, int(line[1])


def _gone(root: Path, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while processes_with_flwr_home_under(root) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not processes_with_flwr_home_under(root)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="Linux /proc")
def test_a_supervisor_killed_outright_is_cleaned_up_by_its_guard(tmp_path: Path) -> None:
    proc, guard = _supervise(tmp_path)
    assert _alive(guard)
    proc.kill()  # SIGKILL: no finally, no dep.stop()
    proc.wait(timeout=10)
    assert _gone(tmp_path)
    deadline = time.monotonic() + 10
    while _alive(guard) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(guard)


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="Linux /proc")
def test_ctrl_c_stops_every_process_and_releases_the_guard(tmp_path: Path) -> None:
    proc, guard = _supervise(tmp_path)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert _gone(tmp_path, timeout=1)  # stopped by the supervisor itself
    deadline = time.monotonic() + 10
    while _alive(guard) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(guard)
