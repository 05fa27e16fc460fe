"""End to end over real flower-superlink / flower-supernode processes on loopback."""

from __future__ import annotations

import json
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


HOSTILE_PATCH = '''

# -- appended by tests/test_loopback.py: site-1 and site-2 run modified code ----------
def _hostile(msg: Message, context: Context, call_next: Any) -> Message:
    import numpy as np
    from flwr.app import Array

    reply = call_next(msg, context)
    site = context.node_config.get("site-name")
    if (reply.has_error() or not msg.metadata.message_type.startswith("train")
            or "arrays" not in reply.content.array_records):
        return reply
    if site == "site-1":  # claims a billion examples: ~100% of the FedAvg weight
        reply.content.metric_records["metrics"]["num-examples"] = 10**9
    if site == "site-2":  # a 64 MiB layer
        rec = reply.content.array_records["arrays"]
        rec[next(iter(rec.keys()))] = Array(np.zeros(16 * 2**20, dtype=np.float32))
    return reply


app = build_client_app(mods=[_hostile])
'''


def test_sites_running_hostile_code_are_rejected_on_a_real_deployment(tmp_path: Path) -> None:
    """Two attack classes on real flower-superlink / flower-supernode processes: the app
    `flwr run` ships is a modified copy in which site-1 claims 1e9 examples (the server
    rejects it) and site-2 sends a 64 MiB layer (the ServerApp stops pulling it at its
    reply budget, server/transport.py, and records the error for site-2); the honest
    site carries the run."""
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
    # stands for sites 1 and 2 running modified code of their own)
    s = rehearse(RunSettings(run_dir=str(out), num_server_rounds=1, min_sites=1, he=False,
                             dp=False), sites=3, app=app, timeout=400, site_code="shipped")
    assert s["status"] == "completed" and s["rounds_completed"] == 1
    assert s["history"][1]["sites_participated"] == 1
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
    what it finds into the site's FLWR_HOME when imported. Site 0 approved that app (a
    data owner who did not read the diff), site 1 only the honest one: every site runs
    the fedvault installed at the site, so 0 refuses the run's epsilon 8 as its own
    limit of 1 demands, 1 refuses the unapproved app; no site reserved any epsilon and
    none of the shipped code ran at a site."""
    import shutil

    from fedvault.node import fab_hash_of
    from fedvault.rehearse import rehearse
    from protocols.config import RunSettings
    from protocols.errors import DeploymentError

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
                 sites=2, app=app, timeout=400, approved={0: [modified], 1: [honest]})
    s = json.loads((out / "summary.json").read_text())
    assert s["status"] == "failed" and s["history"][1]["refused"] == 2
    reasons = {e["site"]: e["reason"] for e in read_chain(out / "events.jsonl")
               if e["kind"] == "site_refused"}
    assert "privacy budget" in reasons["site-0"]
    assert "is not approved at this site" in reasons["site-1"]
    sites = out / "deployment" / "sites"
    for k in range(2):
        ledger = sites / f"site-{k}" / "privacy-ledger.jsonl"
        kinds = [e["kind"] for e in read_chain(ledger)] if ledger.exists() else []
        assert "reservation" not in kinds, (k, kinds)
    assert list(sites.rglob("shipped-code-ran")) == []
    assert processes_with_flwr_home_under(out) == []
