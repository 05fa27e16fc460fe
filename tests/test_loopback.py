"""End to end over real flower-superlink / flower-supernode processes on loopback."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from protocols.hashchain import verify_chain
from tests.helpers import ROOT, processes_with_flwr_home_under, run_cli

pytestmark = pytest.mark.loopback


def test_rehearsal_runs_a_real_deployment_and_cleans_up(tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = run_cli("rehearse", "--sites", "3", "--rounds", "2", "--he", "--out", str(out),
                timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["mode"] == "deployment" and s["sites"] == 3 and s["status"] == "completed"
    hist = s["history"]
    assert [h["sites_participated"] for h in hist[1:]] == [3, 3]
    assert hist[-1]["accuracy"] > hist[0]["accuracy"] + 0.2
    assert s["he"]["enabled"] and [h["encrypted"] for h in hist] == [False, True, True]
    assert verify_chain(out / "events.jsonl").ok
    # every site had its own data file and FLWR_HOME; the SuperLink really ran the app
    dep = out / "deployment"
    assert sorted(p.name for p in (dep / "sites").iterdir()) == ["site-0", "site-1", "site-2"]
    assert "SuperNode ID" in (dep / "logs" / "site-0.log").read_text()
    assert "Starting Flower SuperLink" in (dep / "logs" / "superlink.log").read_text()
    assert processes_with_flwr_home_under(out) == []
    # each SuperNode kept its privacy ledger at the node-config path
    for site in sorted(p.name for p in (dep / "sites").iterdir()):
        ledger = dep / "sites" / site / "privacy-ledger.jsonl"
        assert verify_chain(ledger).ok
        assert oct(ledger.stat().st_mode & 0o777) == "0o600"
    eps = {x["site"]: float(x["epsilon"]) for x in s["privacy"]["sites"]}
    assert sorted(eps) == ["site-0", "site-1", "site-2"] and all(0 < e <= 8 for e in eps.values())


def test_ctrl_c_stops_every_process(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedvault", "rehearse", "--sites", "2", "--min-sites", "2",
         "--rounds", "20",
         "--out", str(out)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        events = out / "events.jsonl"
        while time.monotonic() < deadline:
            if events.exists() and '"round_completed"' in events.read_text():
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.5)
        else:
            pytest.fail("the run never started")
        assert len(processes_with_flwr_home_under(out)) >= 3  # superlink + 2 supernodes
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert processes_with_flwr_home_under(out) == []
