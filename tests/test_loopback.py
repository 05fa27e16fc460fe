"""End to end over real flower-superlink / flower-supernode processes on loopback."""

from __future__ import annotations

import json
import os
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
    # (one round: each costs ~45 s here, mostly Flower starting a ClientApp process per
    # message; the encrypted global model is then decrypted by the sites for evaluation)
    r = run_cli("rehearse", "--sites", "3", "--rounds", "1", "--he", "--out", str(out),
                timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["mode"] == "deployment" and s["sites"] == 3 and s["status"] == "completed"
    # secure by default: TLS to the SuperLink, every node authenticated by its own key
    assert "TLS" in s["deployment"]["transport"]
    assert "node authentication" in s["deployment"]["transport"]
    hist = s["history"]
    assert [h["sites_participated"] for h in hist[1:]] == [3]
    assert hist[-1]["accuracy"] > hist[0]["accuracy"] + 0.2
    assert s["he"]["enabled"] and [h["encrypted"] for h in hist] == [False, True]
    # every site ran the fedvault installed here (fedvault site start's runtime), and
    # its log says what each round spent, once
    site_log = (out / "deployment" / "logs" / "site-0-superexec.log").read_text()
    assert "fedvault site runtime" in site_log
    spent = [line for line in site_log.splitlines() if "trained" in line and "ledger entry" in line]
    assert len(spent) == 1 and "site-0 round 1" in spent[0] and "epsilon" in spent[0]
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
    # (site_code="shipped": the sites run the copy's code, Flower's default, which here
    # stands for sites 2 and 3 running modified code of their own)
    s = rehearse(RunSettings(run_dir=str(out), num_server_rounds=1, min_sites=2, he=False,
                             dp=False), sites=4, app=app, timeout=400, site_code="shipped")
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


FAB_RAN = '''

# -- appended by tests/test_loopback.py: proof that this copy's code ran ----------------
import os as _os
from pathlib import Path as _Path

_home = _os.environ.get("FLWR_HOME")
if _home:
    (_Path(_home) / "shipped-code-ran").write_text(
        _os.environ.get("FEDVAULT_HE_PASSPHRASE", "(no passphrase in this environment)"))
'''


def test_a_modified_app_cannot_overspend_a_site(tmp_path: Path) -> None:
    """The central team ships an app whose client/budget.py ignores the site's limit
    (Flower's own SuperNode would install and run it: in a hand deployment this trained
    every site to epsilon 7.996 against a limit of 1.0) and whose client/app.py writes
    what it finds into the site's FLWR_HOME when imported. Sites 0 and 1 approved that
    app (a data owner who did not read the diff), site 2 only the honest one: every site
    runs the fedvault installed at the site, so 0 and 1 refuse the run's epsilon 8 as
    their own limit of 1 demands, 2 refuses the unapproved app; no site reserved any
    epsilon and none of the shipped code ran at a site."""
    import shutil

    from fedvault.errors import DeploymentError
    from fedvault.rehearse import rehearse
    from fedvault.site import fab_hash_of
    from protocols.config import RunSettings

    app = tmp_path / "app"
    shutil.copytree(ROOT, app, ignore=shutil.ignore_patterns(
        ".venv", ".git", "runs", "tests", "bench", "*.egg-info", "__pycache__", ".*_cache"))
    budget = app / "client" / "budget.py"
    honest_line = "        max_epsilon=pick(node.max_epsilon, base.max_epsilon),"
    assert honest_line in budget.read_text()
    budget.write_text(budget.read_text().replace(
        honest_line, "        max_epsilon=1e9,  # modified: ignores the site's limit"))
    (app / "client" / "app.py").write_text((app / "client" / "app.py").read_text() + FAB_RAN)
    modified, honest = fab_hash_of(app), fab_hash_of(ROOT)
    assert modified != honest
    out = tmp_path / "run"
    with pytest.raises(DeploymentError, match="no round formed an aggregate"):
        rehearse(RunSettings(run_dir=str(out), num_server_rounds=1, min_sites=2, he=False,
                             site_max_epsilon=1.0, target_epsilon=8.0),
                 sites=3, app=app, timeout=400,
                 approved={0: [modified], 1: [modified], 2: [honest]})
    s = json.loads((out / "summary.json").read_text())
    assert s["status"] == "failed" and s["history"][1]["refused"] == 3
    reasons = {e["site"]: e["reason"] for e in read_chain(out / "events.jsonl")
               if e["kind"] == "site_refused"}
    assert "privacy budget" in reasons["site-0"] and "privacy budget" in reasons["site-1"]
    assert "is not approved at this site" in reasons["site-2"]
    sites = out / "deployment" / "sites"
    for k in range(3):
        ledger = sites / f"site-{k}" / "privacy-ledger.jsonl"
        kinds = [e["kind"] for e in read_chain(ledger)] if ledger.exists() else []
        assert "reservation" not in kinds, (k, kinds)
    assert list(sites.rglob("shipped-code-ran")) == []
    assert processes_with_flwr_home_under(out) == []


def test_an_unregistered_node_is_refused_by_the_superlink(tmp_path: Path) -> None:
    """Secure by default: the SuperLink serves TLS with the rehearsal CA's certificate
    and admits only the nodes whose public keys the central team registered. Site 1
    made its key pair but was never registered: the SuperLink refuses to activate it,
    the SuperNode exits at start-up, and the rehearsal stops naming it."""
    from fedvault.errors import DeploymentError
    from fedvault.rehearse import rehearse
    from protocols.config import RunSettings

    out = tmp_path / "run"
    with pytest.raises(DeploymentError) as err:
        rehearse(RunSettings(run_dir=str(out), num_server_rounds=1, min_sites=1, he=False),
                 sites=2, register=lambda k: k != 1, timeout=120)
    assert err.value.process == "site-1" and "at start-up" in str(err.value)
    dep = out / "deployment"
    link_log = (dep / "logs" / "superlink.log").read_text()
    assert "Uvicorn running on https://" in link_log  # TLS
    assert "No SuperNode found with the given public key" in link_log
    assert "SuperNode ID" in (dep / "logs" / "site-0.log").read_text()  # registered: in
    assert "Failed to activate SuperNode" in (dep / "logs" / "site-1.log").read_text()
    assert not (dep / "sites" / "site-1" / "privacy-ledger.jsonl").exists()
    assert processes_with_flwr_home_under(out) == []


def _pid_of(root: Path, command: str) -> int | None:
    """The live process under FLWR_HOME ``root`` whose command line runs ``command``."""
    for pid in processes_with_flwr_home_under(root):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.decode(errors="replace").endswith(command) for a in argv[:2]):
            return pid
    return None


def test_a_site_killed_mid_round_then_the_supervisor_killed(tmp_path: Path) -> None:
    """A fault drill on real processes, TLS and node authentication on.

    1. site-2's SuperNode is killed (SIGKILL) while site-2 trains round 1. The round
       completes with the other two (min-sites 2); the SuperLink's "node unavailable"
       answer is recorded as site-2's error (not as node 1's); the rehearsal reports the
       exit and goes on; site-2's ledger verifies and keeps the reservation it made.
    2. Then ``fedvault rehearse`` itself is killed (SIGKILL: no cleanup runs). Its guard
       stops every process of the deployment: no ClientApp keeps training for a run
       nobody follows."""
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedvault", "rehearse", "--sites", "3", "--min-sites", "2",
         "--rounds", "20", "--no-he", "--out", str(out)], cwd=ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    site2 = out / "deployment" / "sites" / "site-2"
    events = out / "events.jsonl"
    try:
        deadline = time.monotonic() + 180
        killed = False
        while time.monotonic() < deadline:
            assert proc.poll() is None, "the rehearsal ended early"
            ledger = site2 / "privacy-ledger.jsonl"
            if not killed and ledger.exists() and '"reservation"' in ledger.read_text():
                pid = _pid_of(site2, "flower-supernode")
                assert pid is not None
                os.kill(pid, signal.SIGKILL)
                killed = True
            if killed and events.exists() and any(
                    e["kind"] == "round_completed" and e["round"] == 1
                    for e in read_chain(events)):
                break
            time.sleep(0.3)
        else:
            pytest.fail(f"round 1 did not complete (site-2 killed: {killed})")
        assert len(processes_with_flwr_home_under(out)) >= 5
        proc.kill()  # SIGKILL the supervisor
        proc.wait(timeout=10)
        deadline = time.monotonic() + 30
        while processes_with_flwr_home_under(out) and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert processes_with_flwr_home_under(out) == []
    log = read_chain(events)
    row = next(e for e in log if e["kind"] == "round_completed" and e["round"] == 1)
    assert row["sites_participated"] == 2 and row["errors"] == 1
    err = next(e for e in log if e["kind"] == "site_error")
    assert err["node_id"] != 1 and "heartbeat" in err["reason"]
    assert verify_chain(site2 / "privacy-ledger.jsonl").ok
    kinds = [e["kind"] for e in read_chain(site2 / "privacy-ledger.jsonl")]
    assert "reservation" in kinds  # the round it never finished still counts
