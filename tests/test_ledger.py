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
from hypothesis import given, settings
from hypothesis import strategies as st

from privacy.accountants import PRVAccountant
from privacy.events import SubsampledGaussianEvent
from privacy.ledger import PrivacyLedger
from protocols.errors import IntegrityError, PrivacyRefused
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
    for key in ("seq", "time", "run_id", "round", "scope", "dataset", "events", "accountant",
                "delta", "epsilon_before", "epsilon_after", "insecure", "prev_hash", "hash"):
        assert key in res[0]
    assert res[0]["events"][0]["adjacency"] == "add-remove-one"
    assert res[0]["insecure"] is False
    assert res[1]["epsilon_before"] == res[0]["epsilon_after"]
    # epsilon is recomputed from the events by an accountant, not summed
    expected = PRVAccountant().epsilon([_ev(30)], delta=1e-5)
    assert led.spent(FP, delta=1e-5) == pytest.approx(expected, rel=1e-9)
    assert res[-1]["epsilon_after"] == pytest.approx(expected, rel=1e-9)


def test_refuses_before_writing_a_spend(tmp_path: Path) -> None:
    led = _ledger(tmp_path, rounds=1)
    spent = led.spent(FP, delta=1e-5)
    with pytest.raises(PrivacyRefused, match="would bring it to") as info:
        led.reserve(FP, [_ev(1000)], run_id="run-2", server_round=1, delta=1e-5,
                    limit=spent + 0.01)
    assert led.spent(FP, delta=1e-5) == spent
    refusal = led.entries()[-1]
    assert refusal["kind"] == "refusal"
    # the exception carries what the refusal reply needs: no second accountant run
    exc = info.value
    assert (exc.scope, exc.limit, exc.delta) == (FP, spent + 0.01, 1e-5)
    assert exc.epsilon_spent == refusal["epsilon_spent"] == pytest.approx(spent)
    assert exc.epsilon_requested == refusal["epsilon_requested"] > exc.limit


def test_persists_across_instances(tmp_path: Path) -> None:
    _ledger(tmp_path, rounds=2)
    again = PrivacyLedger(tmp_path / "ledger.jsonl")
    assert len(again.history(FP)) == 2
    assert again.register(FP, source="elsewhere", rows=100) is None  # same data, same budget


def test_new_data_draws_on_the_same_site_budget(tmp_path: Path) -> None:
    led = PrivacyLedger(tmp_path / "ledger.jsonl")
    led.register("d1", source="a.csv", rows=100)
    led.reserve("site", [_ev()], run_id="r", server_round=1, delta=1e-5, limit=100,
                dataset="d1")
    e = led.register("d2", source="re-exported.csv", rows=99)
    assert e is not None and "same budget" in e["note"] and e["previous"] == ["d1"]
    # a re-export is a new dataset id but not a new budget
    assert led.spent("site", delta=1e-5) > 0


def test_a_declared_disjoint_scope_is_recorded(tmp_path: Path) -> None:
    led = PrivacyLedger(tmp_path / "ledger.jsonl")
    e = led.declare_scope("cohort-2025", dataset="d9", declared_by="node-config budget-scope")
    assert e is not None and e["kind"] == "scope_declared"
    assert led.declare_scope("cohort-2025", dataset="d9", declared_by="x") is None
    with pytest.raises(ValueError, match="budget scope"):
        led.declare_scope("../etc", dataset="d9", declared_by="x")


def test_a_dataset_cannot_leave_its_budget_scope(tmp_path: Path) -> None:
    # the same records moved to a new scope would start again from zero
    led = PrivacyLedger(tmp_path / "ledger.jsonl")
    led.register("ds", source="a.csv", rows=100)
    led.reserve("site", [_ev()], run_id="r", server_round=1, delta=1e-5, limit=100,
                dataset="ds")
    with pytest.raises(PrivacyRefused, match="already draws on budget scope 'site'"):
        led.declare_scope("other", dataset="ds", declared_by="x")
    with pytest.raises(PrivacyRefused, match="already draws on budget scope 'site'"):
        led.register("ds", scope="other", source="a.csv", rows=100)
    led.declare_scope("cohort", dataset="d2", declared_by="x")
    led.register("d2", scope="cohort", source="b.csv", rows=100)
    with pytest.raises(PrivacyRefused, match="already draws on budget scope 'cohort'"):
        led.register("d2", source="b.csv", rows=100)  # and not back to the site scope


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
    with pytest.raises(IntegrityError, match="privacy ledger is broken") as info:
        PrivacyLedger(led.path)
    assert info.value.defect == "tampered" and verify_chain(led.path).defect == "tampered"


def test_budget_verify_ok(tmp_path: Path) -> None:
    led = _ledger(tmp_path)
    r = run_cli("budget", "verify", str(led.path))
    assert r.returncode == 0 and "OK, 7 entries" in r.stdout


def test_torn_last_line_is_repaired_without_losing_a_spend(tmp_path: Path) -> None:
    led = _ledger(tmp_path, rounds=2)
    spent = led.spent(FP, delta=1e-5)
    with led.path.open("ab") as fh:  # a crash in the middle of writing a non-spend entry
        fh.write(b'{"dataset":"x","delta":1e-05,"epsilon_li')
    again = PrivacyLedger(led.path)
    assert verify_chain(again.path).ok
    assert again.entries()[-1]["kind"] == "repaired"
    assert again.spent(FP, delta=1e-5) == spent
    assert list(tmp_path.glob("ledger.jsonl.torn-*"))


def test_a_cut_reservation_is_never_repaired_away(tmp_path: Path) -> None:
    # The last reservation, complete on disk, loses its last 30 bytes (an edit, or a
    # filesystem that lost the tail): its spend must still count.
    led = _ledger(tmp_path, rounds=1)
    res = led.reserve(FP, [_ev(500)], run_id="run-1", server_round=9, delta=1e-5,
                      limit=100)
    full = led.spent(FP, delta=1e-5)
    data = led.path.read_bytes()
    led.path.write_bytes(data[:-31])  # 30 bytes and the newline
    # (the anchor would catch the cut; this is the repair path on its own)
    assert led.secret is not None
    led.secret.path.unlink()
    again = PrivacyLedger(led.path)
    assert again.entries()[-1]["kind"] == "repaired"
    assert again.spent(FP, delta=1e-5) == pytest.approx(full, rel=1e-9)
    assert res["epsilon_after"] == pytest.approx(full, rel=1e-9)
    assert run_cli("budget", "verify", str(led.path)).returncode == 0


def test_a_cut_reservation_without_readable_events_refuses_to_open(tmp_path: Path) -> None:
    led = _ledger(tmp_path, rounds=1)
    assert led.secret is not None
    led.secret.path.unlink()
    with led.path.open("ab") as fh:
        fh.write(b'{"accountant":"prv","dataset":"x","delta":1e-05,"epsilon_after":3.2,'
                 b'"epsilon_before":1.0,"epsilon_limit":10,"events":[{"adjac')
    with pytest.raises(IntegrityError, match="cut reservation"):
        PrivacyLedger(led.path)


def test_a_ledger_moved_away_or_truncated_is_refused(tmp_path: Path) -> None:
    led = _ledger(tmp_path, rounds=3)
    lines = led.path.read_bytes().splitlines(keepends=True)
    # truncated to its first line: the chain still verifies, the anchor does not
    led.path.write_bytes(lines[0])
    assert verify_chain(led.path).ok
    with pytest.raises(IntegrityError, match="records") as info:
        PrivacyLedger(led.path)
    assert info.value.defect == "unanchored" and info.value.path == str(led.path)
    r = run_cli("budget", "verify", str(led.path))  # the compliance check sees it too
    assert r.returncode == 1 and "cut short" in r.stderr
    # moved away entirely
    led.path.rename(tmp_path / "elsewhere.jsonl")
    with pytest.raises(IntegrityError, match="is missing"):
        PrivacyLedger(led.path)
    # the data owner starts a new one on the record
    r = run_cli("budget", "new-ledger", str(led.path), "--reason", "disk lost; no backup")
    assert r.returncode == 0, r.stdout + r.stderr
    fresh = PrivacyLedger(led.path)
    first = fresh.entries()[0]
    assert first["kind"] == "ledger_started" and first["reason"] == "disk lost; no backup"
    assert first["previous_anchor"]["entries"] == 7


def test_site_secret_is_private(tmp_path: Path) -> None:
    led = _ledger(tmp_path, rounds=1)
    assert led.secret is not None
    assert led.secret.path.stat().st_mode & 0o777 == 0o600
    assert led.path.stat().st_mode & 0o777 == 0o600
    # the keyed dataset id does not reveal the raw-data hash
    assert led.dataset_id(FP) != FP and FP not in led.dataset_id(FP)


def test_two_processes_cannot_both_spend_the_last_budget(tmp_path: Path) -> None:
    led = _ledger(tmp_path, rounds=1)
    after_one = PRVAccountant().epsilon([_ev(20)], delta=1e-5)
    limit = after_one + 0.01  # room for exactly one more round
    script = textwrap.dedent(f"""
        import sys
        from privacy.events import SubsampledGaussianEvent
        from privacy.ledger import PrivacyLedger
        from protocols.errors import PrivacyRefused
        led = PrivacyLedger(sys.argv[1])
        ev = SubsampledGaussianEvent(noise_multiplier=1.0, sample_rate=0.2, steps=10)
        try:
            led.reserve("{FP}", [ev], run_id=sys.argv[2], server_round=2, delta=1e-5,
                        limit={limit})
            print("reserved")
        except PrivacyRefused:
            print("refused")
    """)
    # each process reaches the one ledger by another name: its path, a symlink, a
    # hard link, a relative path
    sym = tmp_path / "via-symlink.jsonl"
    sym.symlink_to(led.path)
    hard = tmp_path / "sub" / "via-hardlink.jsonl"
    hard.parent.mkdir()
    os.link(led.path, hard)
    names = [str(led.path), str(sym), str(hard), os.path.relpath(led.path, ROOT)]
    procs = [subprocess.Popen([sys.executable, "-c", script, name, f"r{i}"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
             for i, name in enumerate(names)]
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
    from fedvault_tasks.tasks import get_task
    from protocols.config import RunSettings
    arrays = ArrayRecord(get_task("digits").build_model().state_dict())
    msg = Message(content=RecordDict({"arrays": arrays, "config": ConfigRecord(
        {"server-round": 1, "local-epochs": 500, "batch-size": 16})}),
        dst_node_id=3, message_type="train")
    ctx = Context(run_id=7, node_id=3, node_config={"partition-id": 0, "num-partitions": 2},
                  state=RecordDict(), run_config=RunSettings(run_dir=sys.argv[1],
                  noise_multiplier=5.0, site_max_epsilon=1000.0).to_config())
    build_client_app(simulated=True)(msg, ctx)
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
    led = PrivacyLedger(ledger)
    spent = led.spent(res["scope"], delta=1e-5)
    assert spent == pytest.approx(res["epsilon_after"], rel=1e-9) and spent > 0
    # the interrupted round's full planned steps are counted
    assert res["events"][0]["steps"] % 500 == 0 and res["events"][0]["steps"] >= 500 * 10


def test_run_spent_is_the_epsilon_of_that_run_alone(tmp_path: Path) -> None:
    """What a site tells the server: one run's ε, never the scope's total."""
    led = PrivacyLedger(tmp_path / "l.jsonl", site_secret=False)
    for r in (1, 2):
        led.reserve(FP, [_ev()], run_id="run-1", server_round=r, delta=1e-5, limit=100)
    alone = led.run_spent(FP, run_id="run-1", delta=1e-5)
    assert alone == led.spent(FP, delta=1e-5)  # the scope holds only this run
    led.reserve(FP, [_ev()], run_id="run-2", server_round=1, delta=1e-5, limit=100)
    second = led.run_spent(FP, run_id="run-2", delta=1e-5)
    assert second == pytest.approx(PRVAccountant().epsilon([_ev()], delta=1e-5), rel=1e-9)
    assert second < alone < led.spent(FP, delta=1e-5)
    assert led.run_spent(FP, run_id="run-1", delta=1e-5) == pytest.approx(alone, rel=1e-9)
    assert led.run_spent(FP, run_id="never", delta=1e-5) == 0.0


@settings(max_examples=6, deadline=None)
@given(rounds=st.lists(st.tuples(st.floats(0.7, 4.0), st.sampled_from([0.05, 0.2, 0.5, 1.0]),
                                 st.integers(1, 400)), min_size=1, max_size=5))
def test_the_per_round_check_is_never_below_the_full_recomputation(
        tmp_path_factory: pytest.TempPathFactory,
        rounds: list[tuple[float, float, int]]) -> None:
    """Each reservation composes once, at a bounded cost: epsilon before is the last
    entry's recorded epsilon after, and epsilon after is the bounded-grid PRV. Both are
    never below a full-resolution recomputation of the whole history."""
    full = PRVAccountant(max_grid=1 << 40)
    led = PrivacyLedger(tmp_path_factory.mktemp("l") / "ledger.jsonl")
    led.register(FP, source="test", rows=100)
    led.accountant = PRVAccountant(max_grid=4096)  # reach the bound in the first rounds
    history: list[SubsampledGaussianEvent] = []
    for r, (s, q, t) in enumerate(rounds, 1):
        ev = SubsampledGaussianEvent(noise_multiplier=s, sample_rate=q, steps=t)
        res = led.reserve(FP, [ev], run_id="run", server_round=r, delta=1e-5, limit=1e9)
        assert res["epsilon_before"] >= full.epsilon(history, delta=1e-5)
        history.append(ev)
        assert res["epsilon_after"] >= full.epsilon(history, delta=1e-5)
        led.complete(res, steps_taken=t)
    before = [e["epsilon_before"] for e in led.entries() if e["kind"] == "reservation"]
    after = [e["epsilon_after"] for e in led.entries() if e["kind"] == "reservation"]
    assert before[1:] == after[:-1]  # reused, not recomputed


def test_the_recorded_epsilon_is_reused_only_when_it_covers_the_history(
        tmp_path: Path) -> None:
    led = _ledger(tmp_path, rounds=2)
    last = [e for e in led.entries() if e["kind"] == "reservation"][-1]
    assert led.recorded_epsilon(FP, delta=1e-5) == last["epsilon_after"]
    assert led.recorded_epsilon(FP, delta=1e-6) is None  # another delta: recompute
    assert led.recorded_epsilon("other-scope", delta=1e-5) == 0.0  # nothing spent there
    rdp = PrivacyLedger(tmp_path / "ledger.jsonl", accountant="rdp")
    assert rdp.recorded_epsilon(FP, delta=1e-5) is None  # another accountant: recompute
