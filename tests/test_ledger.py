"""The privacy ledger: enforcement, durability, tamper evidence (real files, real kills)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fedvault.errors import IntegrityError, PrivacyRefused
from privacy.accountants import PRVAccountant
from privacy.events import SubsampledGaussianEvent
from privacy.ledger import PrivacyLedger
from protocols.hashchain import read_chain, verify_chain
from tests.helpers import ROOT, run_cli

FP = "ab" * 32


def _ev(steps: int = 10) -> SubsampledGaussianEvent:
    return SubsampledGaussianEvent(noise_multiplier=1.0, sample_rate=0.2, steps=steps)


def _ledger(tmp_path: Path, rounds: int = 3) -> PrivacyLedger:
    led = PrivacyLedger(tmp_path / "ledger.jsonl")
    led.register(FP, source="test", rows=100)
    for r in range(1, rounds + 1):
        res = led.reserve(FP, [_ev()], run_id="run-1", server_round=r, delta=1e-5, limit=100)
        led.complete(res, steps_taken=10)
    return led


def test_entries_carry_what_a_regulator_needs(tmp_path: Path) -> None:
    led = _ledger(tmp_path)
    res = [e for e in led.entries() if e["kind"] == "reservation"]
    for key in ("seq", "time", "run_id", "round", "fingerprint", "events", "accountant",
                "delta", "epsilon_before", "epsilon_after", "prev_hash", "hash"):
        assert key in res[0]
    assert res[1]["epsilon_before"] == res[0]["epsilon_after"]
    # epsilon is recomputed from the events by an accountant, not summed
    expected = PRVAccountant().epsilon([_ev(30)], delta=1e-5)
    assert led.spent(FP, delta=1e-5) == pytest.approx(expected, rel=1e-9)
    assert res[-1]["epsilon_after"] == pytest.approx(expected, rel=1e-9)


def test_refuses_before_writing_a_spend(tmp_path: Path) -> None:
    led = _ledger(tmp_path, rounds=1)
    spent = led.spent(FP, delta=1e-5)
    with pytest.raises(PrivacyRefused, match="would bring it to"):
        led.reserve(FP, [_ev(1000)], run_id="run-2", server_round=1, delta=1e-5,
                    limit=spent + 0.01)
    assert led.spent(FP, delta=1e-5) == spent
    assert led.entries()[-1]["kind"] == "refusal"


def test_persists_across_instances(tmp_path: Path) -> None:
    _ledger(tmp_path, rounds=2)
    again = PrivacyLedger(tmp_path / "ledger.jsonl")
    assert len(again.history(FP)) == 2
    assert again.register(FP, source="elsewhere", rows=100) is None  # same data, same budget


def test_new_data_is_a_new_dataset_and_says_so(tmp_path: Path) -> None:
    led = _ledger(tmp_path, rounds=1)
    e = led.register("cd" * 32, source="changed.csv", rows=99)
    assert e is not None and "new dataset" in e["note"] and e["previous"] == [FP]
    assert led.spent("cd" * 32, delta=1e-5) == 0.0


@pytest.mark.parametrize("tamper", ["edit", "delete", "reorder"])
def test_budget_verify_names_the_first_bad_entry(tmp_path: Path, tamper: str) -> None:
    led = _ledger(tmp_path)
    lines = led.path.read_text().splitlines(keepends=True)
    if tamper == "edit":
        e = json.loads(lines[2])
        e["epsilon_after"] = 0.001  # under-state the spend
        lines[2] = json.dumps(e) + "\n"
        bad = 3
    elif tamper == "delete":
        del lines[3]
        bad = 4
    else:
        lines[2], lines[4] = lines[4], lines[2]
        bad = 3
    led.path.write_text("".join(lines))
    r = run_cli("budget", "verify", str(led.path))
    assert r.returncode == 1
    assert f"line {bad}" in r.stdout + r.stderr
    with pytest.raises(IntegrityError, match="privacy ledger is broken"):
        PrivacyLedger(led.path)


def test_budget_verify_ok(tmp_path: Path) -> None:
    led = _ledger(tmp_path)
    r = run_cli("budget", "verify", str(led.path))
    assert r.returncode == 0 and "OK, 7 entries" in r.stdout


def test_torn_last_line_is_repaired_without_losing_a_spend(tmp_path: Path) -> None:
    led = _ledger(tmp_path, rounds=2)
    spent = led.spent(FP, delta=1e-5)
    with led.path.open("ab") as fh:  # a crash in the middle of writing an entry
        fh.write(b'{"seq":7,"kind":"reservation","ev')
    again = PrivacyLedger(led.path)
    assert verify_chain(again.path).ok
    assert again.entries()[-1]["kind"] == "repaired"
    assert again.spent(FP, delta=1e-5) == spent
    assert list(tmp_path.glob("ledger.jsonl.torn-*"))


def test_two_processes_cannot_both_spend_the_last_budget(tmp_path: Path) -> None:
    led = _ledger(tmp_path, rounds=1)
    after_one = PRVAccountant().epsilon([_ev(20)], delta=1e-5)
    limit = after_one + 0.01  # room for exactly one more round
    script = textwrap.dedent(f"""
        import sys
        from privacy.events import SubsampledGaussianEvent
        from privacy.ledger import PrivacyLedger
        from fedvault.errors import PrivacyRefused
        led = PrivacyLedger(sys.argv[1])
        ev = SubsampledGaussianEvent(noise_multiplier=1.0, sample_rate=0.2, steps=10)
        try:
            led.reserve("{FP}", [ev], run_id=sys.argv[2], server_round=2, delta=1e-5,
                        limit={limit})
            print("reserved")
        except PrivacyRefused:
            print("refused")
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(led.path), f"r{i}"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True) for i in range(4)]
    outs = sorted(p.communicate(timeout=120)[0].strip() for p in procs)
    assert outs == ["refused", "refused", "refused", "reserved"]
    assert led.spent(FP, delta=1e-5) <= limit


KILL_SCRIPT = textwrap.dedent("""
    import sys
    from flwr.supercore.task_identity import TaskIdentity
    TaskIdentity.task_id = 1; TaskIdentity.run_id = 7; TaskIdentity.node_id = 1
    import torch
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
    from client.app import build_client_app
    from fedvault.tasks import get_task
    from protocols.config import RunSettings
    arrays = ArrayRecord(get_task("digits").build_model().state_dict())
    msg = Message(content=RecordDict({"arrays": arrays, "config": ConfigRecord(
        {"server-round": 1, "local-epochs": 500, "batch-size": 16})}),
        dst_node_id=3, message_type="train")
    ctx = Context(run_id=7, node_id=3, node_config={"partition-id": 0, "num-partitions": 2},
                  state=RecordDict(), run_config=RunSettings(run_dir=sys.argv[1],
                  noise_multiplier=5.0, site_max_epsilon=1000.0).to_config())
    build_client_app()(msg, ctx)
""")


def test_killed_mid_round_still_counts(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(tmp_path)], cwd=ROOT)
    ledger = tmp_path / "ledgers" / "site-0.jsonl"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if ledger.exists() and '"reservation"' in ledger.read_text():
                break
            assert proc.poll() is None, "the client exited before training"
            time.sleep(0.1)
        time.sleep(1.0)  # well into training (500 epochs take minutes)
        assert proc.poll() is None
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert verify_chain(ledger).ok
    entries = read_chain(ledger)
    assert [e["kind"] for e in entries] == ["dataset_registered", "reservation"]
    res = entries[1]
    fp = res["fingerprint"]
    led = PrivacyLedger(ledger)
    spent = led.spent(fp, delta=1e-5)
    assert spent == pytest.approx(res["epsilon_after"], rel=1e-9) and spent > 0
    # the interrupted round's full planned steps are counted
    assert res["events"][0]["steps"] % 500 == 0 and res["events"][0]["steps"] >= 500 * 10
