"""End to end on Flower's Simulation Engine (Ray), through the real command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from protocols.hashchain import read_chain, verify_chain
from tests.helpers import run_cli

pytestmark = pytest.mark.e2e


def test_digits_simulation_improves_and_writes_its_run(tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = run_cli("simulate", "--sites", "3", "--rounds", "2", "--out", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    text = r.stdout + r.stderr
    assert "DEPRECATED" not in text and "deprecated" not in text.lower()
    assert "final accuracy (federated)" in r.stdout  # HE is the default: encrypted model

    summary = json.loads((out / "summary.json").read_text())
    for key in ("task", "rounds", "sites", "final_accuracy", "history"):
        assert key in summary
    assert summary["task"] == "digits" and summary["rounds"] == 2 and summary["sites"] == 3
    hist = summary["history"]
    assert [h["round"] for h in hist] == [0, 1, 2]
    for h in hist:
        assert {"round", "accuracy", "loss", "sites_participated"} <= set(h)
    assert [h["sites_participated"] for h in hist[1:]] == [3, 3]
    assert hist[-1]["accuracy"] > hist[0]["accuracy"] + 0.2
    assert summary["final_accuracy"] == hist[-1]["accuracy"]

    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for rnd in range(3):
        assert (out / "models" / f"round-{rnd:04d}.pt").stat().st_size > 1000
    report = verify_chain(out / "events.jsonl")
    assert report.ok and report.last_hash == summary["events_last_hash"]
    kinds = [e["kind"] for e in read_chain(out / "events.jsonl")]
    assert kinds[0] == "run_started" and kinds[-1] == "run_finished"

    shown = run_cli("show", str(out))
    assert shown.returncode == 0 and "final accuracy" in shown.stdout

    # DP is on by default: every site reports its epsilon, within the run's target,
    # and keeps a verified ledger in the run directory
    privacy = summary["privacy"]
    assert privacy["dp"] and privacy["accountant"] == "prv"
    sites = privacy["sites"]
    assert sorted(s["site"] for s in sites) == ["site-0", "site-1", "site-2"]
    for s in sites:
        assert 0 < s["epsilon"] <= 8.0 and s["delta"] == 1e-5 and s["refused_rounds"] == 0
        ledger = out / "ledgers" / f"{s['site']}.jsonl"
        assert verify_chain(ledger).ok
        rep = run_cli("budget", "report", str(ledger), "--format", "json")
        data = json.loads(rep.stdout)
        assert data["scopes"][0]["epsilon_spent"] == pytest.approx(s["epsilon"], rel=1e-6)
    assert "privacy per site" in r.stdout and "max ε over sites" in r.stdout

    # No file the server side writes holds a site's raw-data hash (the sites' ledgers,
    # in the run directory only because this is a simulation, keep it locally).
    raw = [e["fingerprint"] for s in sites
           for e in read_chain(out / "ledgers" / f"{s['site']}.jsonl")
           if e["kind"] == "dataset_registered"]
    assert len(raw) == 3 and all(len(f) == 64 for f in raw)
    for f in out.rglob("*"):
        if f.is_file() and "ledgers" not in f.parts:
            blob = f.read_bytes()
            assert not any(h[:12].encode() in blob for h in raw), f


def test_encrypted_aggregation_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = run_cli("simulate", "--sites", "3", "--rounds", "2", "--he", "--out", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    s = json.loads((out / "summary.json").read_text())
    he = s["he"]
    assert he["enabled"] and he["scheme"] == "bfv" and he["poly_modulus_degree"] == 4096
    assert he["bytes_per_parameter"] > 0 and he["bytes_up_per_round"] > 0
    hist = s["history"]
    # after round 0 the global model is encrypted: federated evaluation only
    assert hist[0]["metric_source"] == "central"
    assert [h["metric_source"] for h in hist[1:]] == ["federated", "federated"]
    assert [h["encrypted"] for h in hist] == [False, True, True]
    assert hist[-1]["accuracy"] > 0.5 and s["metric_source"] == "federated"
    # the server side of the federation cannot decrypt what the run stored
    import tenseal as ts

    for f in (out / "federation" / "server").iterdir():
        assert not ts.context_from(f.read_bytes()).has_secret_key()
    assert "bytes per parameter" in r.stdout

    # release: a key holder decrypts the last version; the release is recorded
    rel = run_cli("model", "decrypt", str(out), "--site", "site-1", "--out",
                  str(tmp_path / "final.pt"))
    assert rel.returncode == 0, rel.stderr
    import torch

    from fedvault_tasks.datasets import pooled_table
    from fedvault_tasks.tasks import Table, evaluate, get_task
    from protocols.config import RunSettings

    task = get_task("digits")
    model = task.build_model()
    model.load_state_dict(torch.load(tmp_path / "final.pt"))
    _, test = pooled_table(task, RunSettings())
    _, acc = evaluate(model, Table(x=task.preprocess(test.x), y=test.y))
    assert acc > 0.5
    releases = read_chain(out / "releases.jsonl")
    assert [e["kind"] for e in releases] == ["model_decrypted", "model_decrypted"]
    assert releases[-1]["round"] == 2 and releases[-1]["site"] == "site-1"
    assert s["released_model"]["central_accuracy"] == pytest.approx(acc, abs=1e-6)
    assert "released model (round 2" in r.stdout


def test_small_budget_makes_sites_refuse_and_the_run_goes_on(tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = run_cli("simulate", "--sites", "3", "--rounds", "3", "--site-max-epsilon", "5",
                "--out", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["status"] == "completed" and s["rounds_completed"] == 3
    for site in s["privacy"]["sites"]:
        assert site["epsilon"] <= 5.0 and site["refused_rounds"] >= 1
    kinds = [e["kind"] for e in read_chain(out / "events.jsonl")]
    assert "site_refused" in kinds and "aggregate_refused" in kinds
    assert "refused" in r.stdout


def test_tabular_on_a_users_csv(tmp_path: Path) -> None:
    import numpy as np

    from client.data import save_table
    from fedvault_tasks.tasks import get_task

    t = get_task("tabular").embedded()
    csv = save_table(t.subset(np.arange(len(t))), tmp_path / "bc.csv", label_column="diagnosis")
    out = tmp_path / "run"
    r = run_cli("simulate", "--task", "tabular", "--data-path", str(csv), "--label-column",
                "diagnosis", "--sites", "2", "--min-sites", "2", "--rounds", "2", "--client-dp",
                "--client-dp-noise", "1.0", "--client-dp-clip", "5", "--out", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    s = json.loads((out / "summary.json").read_text())
    # (no accuracy bar: client-level noise sigma*C/m with m = 2 sites swamps the model)
    assert s["task"] == "tabular" and s["final_accuracy"] is not None
    # client-level DP: the server ledger holds one release per round
    central = s["privacy"]["client_level"]
    assert central["enabled"] and central["epsilon"] > 0
    server_ledger = read_chain(out / "server-ledger.jsonl")
    assert [e["round"] for e in server_ledger if e["kind"] == "reservation"] == [1, 2]
    assert "client-level DP (server ledger)" in r.stdout
