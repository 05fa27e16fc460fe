"""Scenario runs end to end on Flower's Simulation Engine (Ray), through the real CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from protocols.hashchain import read_chain
from simulations.behaviour import OFFLINE, fate
from simulations.scenario import load_scenario
from tests.helpers import cli_in_process, run_cli, run_cli_together

pytestmark = pytest.mark.e2e

PNG = b"\x89PNG\r\n\x1a\n"

UNRELIABLE = """
name = "unreliable"
description = "4 steady sites, one that always drops out, one on a hopeless link"
[data]
task = "digits"
partition = "iid"
[run]
num-server-rounds = 3
fraction-evaluate = 0.5
dp = false
he = false
min-sites = 3
round-timeout = 30.0
seed = 5
local-epochs = 2
[defaults]
compute = 500.0
[[sites]]
group = "steady"
count = 4
[[sites]]
group = "flaky"
dropout = 1.0
[[sites]]
group = "far-away"
uplink-mbps = 0.001     # 1 kbit/s: its update cannot arrive within 30 s
[[sites]]
group = "part-time"
availability = 0.5
"""


def _rounds(run: Path) -> list[dict[str, str]]:
    with (run / "rounds.csv").open() as fh:
        return list(csv.DictReader(fh))


def test_unreliable_sites_are_counted_and_runs_are_reproducible(tmp_path: Path) -> None:
    scenario = tmp_path / "unreliable.toml"
    scenario.write_text(UNRELIABLE)
    runs = [tmp_path / "a", tmp_path / "b"]
    for r in run_cli_together(*(["simulate", str(scenario), "--out", str(run)]
                                for run in runs)):
        assert r.returncode == 0, r.stdout + r.stderr
    assert "simulated time" in r.stdout and "rounds.csv" in r.stdout

    a, b = (json.loads((run / "summary.json").read_text()) for run in runs)
    assert a["status"] == "completed" and a["rounds_completed"] == 3
    part_time = load_scenario(scenario).site(6)
    offline = [fate(part_time, seed=5, site=6, server_round=r) == OFFLINE for r in (1, 2, 3)]
    assert any(offline) and not all(offline)  # seed 5 exercises both cases
    for h, off in zip(a["history"][1:], offline, strict=True):
        assert h["offline"] == int(off)
        assert h["sites_sampled"] == 7 - off  # an offline site is not sampled
        assert h["sites_participated"] == 5 - off  # the survivors, and only them
        # training-phase counts only, although evaluation samples half the sites
        assert h["dropped"] == 1 and h["timed_out"] == 1
        # the server's own view: the sites it sent a message that never answered
        assert h["silent"] >= 2
        assert h["train_seconds_simulated"] == pytest.approx(30.0)  # waited for the late
        if h["eval_missing"]:
            assert h["simulated_seconds"] == pytest.approx(60.0)
        else:  # evaluation of the sampled half takes well under a second
            assert 30.0 < h["simulated_seconds"] < 31.0
        assert h["bytes_up"] > 0 and h["bytes_down"] > h["bytes_up"]
        assert h["bytes_lost"] > 0  # the late upload
        assert h["slowest_site"] == "site-5" and h["slowest_site_seconds"] > 30.0
    sites = {s["site"]: s for s in a["simulation"]["per_site"]}
    assert sites["site-4"]["dropped"] == 3 and sites["site-4"]["trained"] == 0
    assert sites["site-5"]["timed_out"] == 3 and sites["site-5"]["trained"] == 0
    assert sites["site-6"]["offline"] == sum(offline)
    assert sites["site-6"]["trained"] == 3 - sum(offline)
    assert sites["site-0"]["trained"] == 3 and sites["site-0"]["role"] == "honest"

    # same seed, same results
    keys = ("accuracy", "loss", "sites_participated", "simulated_seconds", "bytes_up",
            "bytes_down", "model_sha256")
    assert [[h.get(k) for k in keys] for h in a["history"]] == \
        [[h.get(k) for k in keys] for h in b["history"]]
    assert _rounds(runs[0])[-1]["accuracy"] == _rounds(runs[1])[-1]["accuracy"]
    assert float(_rounds(runs[0])[-1]["simulated_elapsed"]) == pytest.approx(
        a["simulated_seconds"])
    for fig in ("progress.png", "bytes.png", "accuracy.png"):
        assert (runs[0] / fig).read_bytes()[:8] == PNG
    assert (runs[0] / "scenario.toml").read_text() == UNRELIABLE

    r = run_cli("simulate", "--compare", str(runs[0]), str(runs[1]))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "final accuracy" in r.stdout and "simulated time" in r.stdout
    assert (runs[1] / "compare.png").read_bytes()[:8] == PNG


def test_a_site_that_drops_mid_upload_still_pays_epsilon(tmp_path: Path) -> None:
    """DP and HE on: a mid-upload dropout trained and spent privacy budget, so its own
    ledger, the summary and the printed table must say so although the server never
    saw its update; with --insecure-noise two runs give the same metrics."""
    scenario = tmp_path / "dp.toml"
    scenario.write_text("""
name = "dp-mid-upload"
[data]
task = "digits"
partition = "iid"
[run]
num-server-rounds = 1
fraction-evaluate = 0.5
min-sites = 3
dp = true
he = true
target-epsilon = 4.0
[defaults]
max-epsilon = 6.0
[[sites]]
group = "drops-mid-upload"
dropout = 1.0
dropout-mode = "mid-upload"
[[sites]]
count = 3
""")
    runs = [tmp_path / "a", tmp_path / "b"]
    for r in run_cli_together(*(["simulate", str(scenario), "--out", str(run),
                                 "--insecure-noise"] for run in runs)):
        assert r.returncode == 0, r.stdout + r.stderr
    assert "from each site's own ledger" in r.stdout and "max ε over sites" in r.stdout
    s = json.loads((runs[0] / "summary.json").read_text())
    h = s["history"][-1]
    assert h["sites_participated"] == 3 and h["dropped"] == 1 and h["bytes_lost"] > 0
    sites = {x["site"]: x for x in s["simulation"]["per_site"]}
    reported = {x["site"]: x for x in s["privacy"]["sites"]}
    for k in range(4):
        eps = sites[f"site-{k}"]["epsilon"]
        assert eps is not None and 3.5 < eps <= 4.0  # calibrated to target 4, counted
        assert reported[f"site-{k}"]["epsilon"] == eps
    entries = read_chain(runs[0] / "ledgers" / "site-0.jsonl")
    assert any(e["kind"] == "reservation" for e in entries)
    assert s["he"]["enabled"] and s["released_model"]["central_accuracy"] > 0.3
    assert (runs[0] / "epsilon.png").read_bytes()[:8] == PNG
    b = json.loads((runs[1] / "summary.json").read_text())
    keys = ("accuracy", "loss", "federated_accuracy", "sites_participated", "dropped")
    assert [[x.get(k) for k in keys] for x in s["history"]] == \
        [[x.get(k) for k in keys] for x in b["history"]]
    assert s["released_model"]["central_accuracy"] == b["released_model"]["central_accuracy"]


def test_a_round_with_too_few_sites_online_is_skipped(tmp_path: Path) -> None:
    """Fewer than min-sites online: nobody is sent anything (so nobody trains or spends
    ε), the round waits out its timeout, and the next round goes on."""
    scenario = tmp_path / "sparse.toml"
    scenario.write_text("""
name = "sparse"
[data]
task = "digits"
[run]
num-server-rounds = 3
min-sites = 3
dp = false
he = false
seed = 0
round-timeout = 45.0
local-epochs = 1
[[sites]]
count = 4
availability = 0.6
""")
    sc = load_scenario(scenario)
    online = [sum(fate(sc.site(k), seed=0, site=k, server_round=r) != OFFLINE for k in range(4))
              for r in (1, 2, 3)]
    assert online == [3, 3, 1]  # seed 0: round 3 is short
    run = tmp_path / "run"
    r = run_cli("simulate", str(scenario), "--out", str(run))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "round 3: skipped: 1 sites online < min-sites 3" in r.stdout
    s = json.loads((run / "summary.json").read_text())
    h1, h2, h3 = s["history"][1:]
    for h in (h1, h2):
        assert not h["skipped"] and h["sites_participated"] == 3 and h["offline"] == 1
    assert h3["skipped"] and h3["sites_sampled"] == 0 and h3["sites_participated"] == 0
    assert h3["offline"] == 3 and h3["bytes_down"] == 0
    assert h3["simulated_seconds"] == pytest.approx(45.0)
    assert h3["model_sha256"] == h2["model_sha256"]  # no aggregate: the model stays
    kinds = [e["kind"] for e in read_chain(run / "events.jsonl")]
    assert "round_skipped" in kinds


def test_list_and_bad_scenarios_from_the_command_line(tmp_path: Path) -> None:
    # (the real main() in this process: these fail, or list, before anything starts)
    r = cli_in_process("simulate", "--list")
    assert r.returncode == 0
    for name in ("hospitals", "cross-device-1000", "cross-device-10k", "poisoning",
                 "hostile-replies"):
        assert name in r.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\n[[sites]]\ncount = 2\nuplink-mbps = -1\n')
    r = cli_in_process("simulate", str(bad))
    assert r.returncode == 2
    assert "uplink-mbps" in r.stderr and "must be > 0" in r.stderr
    r = cli_in_process("simulate", "hospitals", "--sites", "3")
    assert r.returncode == 2 and "--sites does not apply" in r.stderr
    r = cli_in_process("simulate", "hospitals", "--alpha", "0.1")
    assert r.returncode == 2 and "[data] alpha" in r.stderr


def _kill_processes_mentioning(marker: str) -> None:
    import os
    import signal

    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if marker.encode() in (d / "cmdline").read_bytes():
                os.kill(int(d.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            continue


def test_a_scenario_runs_on_an_existing_ray_cluster(tmp_path: Path) -> None:
    """--ray-address: the simulated sites run on a Ray cluster started with `ray start`
    (a one-node cluster here), not on a Ray that the simulation starts itself: the
    cluster's own session logs gain the workers."""
    import shutil
    import socket
    import subprocess
    import sys
    import tempfile

    ray = Path(sys.executable).parent / "ray"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    temp = tempfile.mkdtemp(prefix="/tmp/fvray")  # short: Ray puts sockets in it
    start = subprocess.run([str(ray), "start", "--head", "--num-cpus", "2", "--port", port,
                            "--disable-usage-stats", "--include-dashboard=false",
                            f"--temp-dir={temp}"], capture_output=True, text=True, timeout=120)
    try:
        assert start.returncode == 0, start.stdout + start.stderr
        logs = Path(temp) / "session_latest" / "logs"
        before = len(list(logs.glob("*worker*")))
        scenario = tmp_path / "s.toml"
        scenario.write_text(UNRELIABLE.replace("num-server-rounds = 3", "num-server-rounds = 1"))
        run = tmp_path / "run"
        r = run_cli("simulate", str(scenario), "--out", str(run), "--ray-address",
                    f"127.0.0.1:{port}")
        assert r.returncode == 0, r.stdout + r.stderr
        s = json.loads((run / "summary.json").read_text())
        assert s["status"] == "completed" and s["rounds_completed"] == 1
        assert len(list(logs.glob("*worker*"))) > before
    finally:
        _kill_processes_mentioning(temp)  # this cluster only, not any other Ray
        shutil.rmtree(temp, ignore_errors=True)


def test_hostile_replies_are_rejected_or_refused_and_the_honest_sites_finish(
        tmp_path: Path) -> None:
    """The built-in scenario: ten sites running modified code (real ClientApps on the
    Simulation Engine, real TenSEAL) against five honest ones."""
    run = tmp_path / "hostile"
    r = run_cli("simulate", "hostile-replies", "--out", str(run))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "hostile replies: what each attack met" in r.stdout
    s = json.loads((run / "summary.json").read_text())
    assert s["status"] == "completed" and s["rounds_completed"] == 5
    outcomes = {o["behaviour"]: o for o in s["simulation"]["hostile_replies"]}
    assert set(outcomes) == {"shape-lie", "non-finite-metrics", "extra-records",
                             "inflated-examples", "oversize", "duplicate-replies", "replay",
                             "raw-slots", "weight-lie", "foreign-key"}
    for name in ("shape-lie", "non-finite-metrics", "extra-records", "inflated-examples",
                 "oversize", "duplicate-replies", "replay"):
        assert outcomes[name]["rejected"] >= 1, outcomes[name]
    # what the server cannot see into, the honest sites refuse when they decrypt it
    for name, rnd in (("raw-slots", 2), ("weight-lie", 3), ("foreign-key", 4)):
        assert outcomes[name]["detected_by_sites"], outcomes[name]
        assert f"aggregate of round {rnd} refused by 5 honest site(s)" in outcomes[name]["outcome"]
    assert [(b["refused_version"], b["to_version"]) for b in s["rollbacks"]] == [
        (2, 1), (3, 1), (4, 1)]
    # the inflated evaluation never set the federated accuracy, and the run recovered
    hist = {h["round"]: h for h in s["history"]}
    assert hist[1]["federated_accuracy"] < 0.99 and hist[5]["federated_accuracy"] > 0.85
    assert s["released_model"]["central_accuracy"] > 0.85
    # each honest site recorded the corrupted aggregates as incidents
    incidents = sorted(run.rglob("*.incidents.jsonl"))
    assert len(incidents) == 15  # every site evaluates, every site refused them
    kinds = {e["version"] for e in read_chain(incidents[0])}
    assert kinds == {2, 3, 4}

