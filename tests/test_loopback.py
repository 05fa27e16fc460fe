"""End to end over real flower-superlink / flower-supernode processes on loopback."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from protocols.hashchain import read_chain, verify_chain
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


HOSTILE_PATCH = '''

# -- appended by tests/test_loopback.py: site-2 and site-3 run modified code ----------
def _hostile(msg: Message, context: Context, call_next: Any) -> Message:
    import numpy as np
    from flwr.app import Array

    reply = call_next(msg, context)
    site = context.node_config.get("site-name")
    if (reply.has_error() or not msg.metadata.message_type.startswith("train")
            or "arrays" not in reply.content.array_records):
        return reply
    if site == "site-2":  # claims a billion examples: ~100% of the FedAvg weight
        reply.content.metric_records["metrics"]["num-examples"] = 10**9
    if site == "site-3":  # a 64 MiB layer
        rec = reply.content.array_records["arrays"]
        rec[next(iter(rec.keys()))] = Array(np.zeros(16 * 2**20, dtype=np.float32))
    return reply


app = build_client_app(mods=[_hostile])
'''


def test_sites_running_hostile_code_are_rejected_on_a_real_deployment(tmp_path: Path) -> None:
    """Two attack classes on real flower-superlink / flower-supernode processes: the app
    `flwr run` ships is a modified copy in which site-2 claims 1e9 examples (the server
    rejects it) and site-3 sends a 64 MiB layer (the ServerApp stops pulling it at its
    reply budget, server/transport.py, and records the error for site-3); the two
    honest sites carry the run."""
    import shutil

    from fedvault.rehearse import rehearse
    from protocols.config import RunSettings

    app = tmp_path / "app"
    shutil.copytree(ROOT, app, ignore=shutil.ignore_patterns(
        ".venv", ".git", "runs", "tests", "bench", "*.egg-info", "__pycache__", ".*_cache"))
    (app / "client" / "app.py").write_text(
        (app / "client" / "app.py").read_text() + HOSTILE_PATCH)
    out = tmp_path / "run"
    # (DP off: the attacks are on the messages, and DP calibration would double the time)
    # (one round: each costs ~1 min here, mostly Flower starting a ClientApp process per
    # message)
    s = rehearse(RunSettings(run_dir=str(out), num_server_rounds=1, min_sites=2, he=False,
                             dp=False), sites=4, app=app, timeout=400)
    assert s["status"] == "completed" and s["rounds_completed"] == 1
    assert s["history"][1]["sites_participated"] == 2
    assert (s["history"][1]["rejected"], s["history"][1]["errors"]) == (1, 1)
    # (the server never learns their names: their replies carry no valid privacy record)
    liar = [p for p in s["participants"] if p["rejected"]]
    assert len(liar) == 1 and "[1, 1000000]" in liar[0]["last_reason"]
    big = [p for p in s["participants"] if p["errors"]]
    assert len(big) == 1
    assert "reply not received: larger than 4194304 bytes" in big[0]["last_reason"]
    first, last = s["history"][0]["accuracy"], s["history"][-1]["accuracy"]
    assert first is not None and last is not None and last > first + 0.2
    budget = [e for e in read_chain(out / "events.jsonl") if e["kind"] == "reply_budget"]
    assert budget and budget[0]["bytes"] == 4 * 2**20
    assert processes_with_flwr_home_under(out) == []
