"""Compliance reports of a privacy ledger, the HTML one checked in real headless Chromium."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from privacy.events import SubsampledGaussianEvent
from privacy.ledger import PrivacyLedger
from protocols.errors import PrivacyRefused
from tests.helpers import cli_in_process, run_cli

FP1, FP2 = "site", "cohort-b"  # the default scope and one the data owner declared


@pytest.fixture
def ledger(tmp_path: Path) -> Path:
    led = PrivacyLedger(tmp_path / "site" / "privacy-ledger.jsonl")
    led.register("d" * 32, source="/data/site.csv", rows=400)
    ev = SubsampledGaussianEvent(noise_multiplier=1.6, sample_rate=0.1, steps=5)
    for run, rounds in (("run-1", 3), ("run-2", 2)):
        for r in range(1, rounds + 1):
            try:
                res = led.reserve(FP1, [ev], run_id=run, server_round=r, delta=1e-5, limit=1.5)
                led.complete(res, steps_taken=16)
            except PrivacyRefused:
                pass  # the refusals are part of what the report must show
    led.declare_scope(FP2, dataset="e" * 32, declared_by="node-config budget-scope")
    led.register("e" * 32, scope=FP2, source="/data/site-v2.csv", rows=410)
    res = led.reserve(FP2, [ev], run_id="run-3", server_round=1, delta=1e-5, limit=8.0)
    led.complete(res, steps_taken=16)
    return led.path


def test_table(ledger: Path) -> None:
    r = run_cli("budget", "report", str(ledger))
    assert r.returncode == 0, r.stderr
    for word in ("ε spent", "ε limit", "remaining", "accountant: prv", "cohort-b",
                 "declared disjoint", "add/remove-one", "hash chain verified"):
        assert word in r.stdout, word
    assert "unbounded" not in r.stdout


def test_insecure_rounds_make_a_scope_unbounded(ledger: Path) -> None:
    from fedvault.compliance import ledger_report, to_html

    led = PrivacyLedger(ledger)
    ev = SubsampledGaussianEvent(noise_multiplier=1.6, sample_rate=0.1, steps=5)
    led.reserve(FP2, [ev], run_id="run-4", server_round=1, delta=1e-5, limit=8.0,
                insecure=True)
    r = cli_in_process("budget", "report", str(ledger))
    assert r.returncode == 0 and "unbounded" in r.stdout and "insecure" in r.stdout
    data = ledger_report(ledger)
    by = {d["scope"]: d for d in data["scopes"]}
    assert by[FP2]["epsilon_bound"].startswith("unbounded") and by[FP2]["insecure_rounds"] == 1
    assert by[FP1]["epsilon_bound"] == "dp"
    assert 'class="insecure"' in to_html(data)


def test_replace_one_adjacency_on_request(ledger: Path) -> None:
    from fedvault.compliance import ledger_report
    from privacy.analysis import replace_one_epsilon

    data = ledger_report(ledger, adjacency="replace-one")
    assert data["adjacency"] == "replace-one"
    led = PrivacyLedger(ledger)
    for d in data["scopes"]:
        add_remove = d["epsilon_spent"]
        rep = d["epsilon_replace_one"]
        assert rep > add_remove  # replacing is removing and adding
        hist = led.history(d["scope"])

        def eps_at(x: float, h: list[SubsampledGaussianEvent] = hist) -> float:
            return led.accountant.epsilon(h, delta=x)

        eps, d1 = replace_one_epsilon(delta=1e-5, epsilon_of=eps_at)
        # the group-privacy conversion holds: (2 eps1, (1 + e^eps1) delta1) with delta1 fit
        assert (1 + np.exp(eps / 2)) * d1 <= 1e-5 * (1 + 1e-9)
        assert rep == pytest.approx(eps, rel=1e-6)
    r = cli_in_process("budget", "report", str(ledger), "--adjacency", "replace-one")
    assert "ε replace-one" in r.stdout


def test_json_and_csv_agree_with_the_ledger(ledger: Path, tmp_path: Path) -> None:
    r = cli_in_process("budget", "report", str(ledger), "--format", "json")
    data = json.loads(r.stdout)
    by_fp = {d["scope"]: d for d in data["scopes"]}
    led = PrivacyLedger(ledger)
    for fp in (FP1, FP2):
        d = by_fp[fp]
        for key in ("scope", "epsilon_spent", "epsilon_limit", "delta", "accountant",
                    "adjacency", "epsilon_bound", "datasets", "entries"):
            assert key in d
        assert d["adjacency"] == "add-remove-one"
        assert d["epsilon_spent"] == pytest.approx(led.spent(fp, delta=1e-5), rel=1e-6)
        assert d["delta"] == 1e-5 and d["accountant"] == "prv"
    assert by_fp[FP1]["epsilon_limit"] == 1.5 and by_fp[FP2]["epsilon_limit"] == 8.0
    assert by_fp[FP1]["refusals"] >= 1 and by_fp[FP1]["epsilon_spent"] <= 1.5
    assert by_fp[FP1]["runs"] == ["run-1", "run-2"]
    out = tmp_path / "r.csv"
    assert cli_in_process("budget", "report", str(ledger), "--format", "csv", "--out",
                   str(out)).returncode == 0
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert {r["scope"] for r in rows} == {FP1, FP2}
    assert float(rows[0]["epsilon_spent"]) == pytest.approx(
        by_fp[rows[0]["scope"]]["epsilon_spent"])


def test_no_report_for_a_tampered_ledger(ledger: Path) -> None:
    lines = ledger.read_text().splitlines(keepends=True)
    del lines[2]
    ledger.write_text("".join(lines))
    r = cli_in_process("budget", "report", str(ledger))
    assert r.returncode == 2 and "no report for a broken ledger" in r.stderr


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_html_is_self_contained_and_renders_in_chromium(ledger: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    r = cli_in_process("budget", "report", str(ledger), "--format", "html", "--out", str(out))
    assert r.returncode == 0, r.stderr
    html = out.read_text()
    assert "data:image/png;base64," in html
    assert "http://" not in html and "https://" not in html  # nothing to fetch
    browser = _chromium()
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: .ci/run must install Debian's chromium")
        pytest.skip("chromium not installed (CI installs it)")
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*flags, "--dump-dom", out.as_uri()], capture_output=True, text=True,
                         timeout=120)
    assert dom.returncode == 0, dom.stderr
    assert dom.stdout.count("<tr>") >= 2 + 6  # datasets + mechanisms rows rendered
    assert "Hash chain verified" in dom.stdout
    shot = tmp_path / "report.png"
    subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1200,1400", out.as_uri()],
                   capture_output=True, timeout=120, check=True)
    from PIL import Image

    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[0] >= 1000 and img.shape[1] >= 1000
    # the plot is drawn: matplotlib's first two line colours appear on the page
    for rgb in ((31, 119, 180), (255, 127, 14)):
        near = np.all(np.abs(img.astype(int) - np.array(rgb)) < 12, axis=-1)
        assert near.sum() > 200, rgb
    if os.environ.get("FEDVAULT_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["FEDVAULT_KEEP_SCREENSHOT"])
