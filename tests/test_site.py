"""A data owner's node: site.toml, approvals, and the runtime's decision per message
(real Flower messages; the processes themselves are tested on loopback)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from client.runtime import answer, approved_hashes
from fedvault.node import approve, fab_hash_of, load_site_config, runtime_shim
from protocols.errors import ConfigError, IntegrityError
from tests.helpers import ROOT, cli_in_process, write_site_toml

pytestmark = pytest.mark.usefixtures("flower_identity")
H1, H2 = "a" * 64, "b" * 64


def _site(tmp_path: Path, extra: str = "") -> Path:
    return write_site_toml(tmp_path, f"insecure = true\n{extra}", "max-epsilon = 4.0\n")


def test_site_config_is_validated(tmp_path: Path) -> None:
    cfg = load_site_config(_site(tmp_path))
    assert cfg.name == "clinic" and cfg.node_config["site-name"] == "clinic"
    assert cfg.approvals.name == "site.approvals.jsonl"
    bad = tmp_path / "bad"
    bad.mkdir()
    with pytest.raises(ConfigError, match="unknown key"):
        load_site_config(_site(bad, 'port = 1'))
    tls = tmp_path / "tls"
    tls.mkdir()
    p = _site(tls)
    p.write_text(p.read_text().replace("insecure = true", "insecure = false"))
    with pytest.raises(ConfigError, match="root-certificates"):
        load_site_config(p)
    p.write_text(p.read_text().replace("insecure = false", "insecure = true")
                 .replace("max-epsilon = 4.0", "max_epsilon = 4.0"))
    with pytest.raises(ConfigError, match="did you mean 'max-epsilon'"):
        load_site_config(p)


def test_approvals_are_hash_chained_private_and_revocable(tmp_path: Path) -> None:
    cfg = load_site_config(_site(tmp_path))
    assert approved_hashes(cfg.approvals) == set()
    approve(cfg, H1.upper(), note="reviewed v1")
    approve(cfg, H2)
    approve(cfg, H2, revoke=True)
    assert approved_hashes(cfg.approvals) == {H1}
    assert stat.S_IMODE(cfg.approvals.stat().st_mode) == 0o600
    with pytest.raises(ConfigError, match="64 hex digits"):
        approve(cfg, "not-a-hash")
    lines = cfg.approvals.read_text().splitlines()
    entry = json.loads(lines[0])
    entry["fab_hash"] = H2  # someone edits the file to approve another app
    lines[0] = json.dumps(entry)
    cfg.approvals.write_text("\n".join(lines) + "\n")
    with pytest.raises(IntegrityError, match="do not verify"):
        approved_hashes(cfg.approvals)
    # and the runtime refuses every run, the approved one included, until it is restored
    reply = answer(_msg("train"), _ctx(), H1, "acme/app", "1.0", str(cfg.approvals))
    assert "this site's approvals" in str(reply.content.config_records["refusal"]["reason"])


def test_the_fab_hash_of_a_directory_is_what_flwr_run_ships() -> None:
    import hashlib

    from flwr.cli.build import build_fab_from_disk

    assert fab_hash_of(ROOT) == hashlib.sha256(build_fab_from_disk(ROOT)).hexdigest()


def _ctx() -> Context:
    return Context(run_id=4242, node_id=11, node_config={"site-name": "clinic"},
                   state=RecordDict(), run_config={})


def _msg(kind: str) -> Message:
    return Message(content=RecordDict({"config": ConfigRecord({"server-round": 1})}),
                   dst_node_id=11, message_type=kind)


def test_an_unapproved_app_is_refused_without_running_anything(tmp_path: Path) -> None:
    cfg = load_site_config(_site(tmp_path))
    approve(cfg, H1)
    reply = answer(_msg("train"), _ctx(), H2, "acme/app", "1.0", str(cfg.approvals))
    refusal = dict(reply.content.config_records["refusal"])
    assert "is not approved at this site" in str(refusal["reason"]) and refusal["site"] == "clinic"
    ev = answer(_msg("evaluate"), _ctx(), H2, "acme/app", "1.0", str(cfg.approvals))
    assert "is not approved" in str(ev.content.config_records["declined"]["reason"])
    # no approvals file named at all: fail closed
    none = answer(_msg("train"), _ctx(), H1, "acme/app", "1.0", None)
    assert "refusal" in none.content.config_records


def test_the_server_records_the_refusal(tmp_path: Path) -> None:
    from protocols.config import RunSettings
    from protocols.hashchain import read_chain
    from protocols.rundir import RunDirectory
    from server.recorder import RunRecorder
    from server.strategy import FedVaultFedAvg

    cfg = load_site_config(_site(tmp_path))
    reply = answer(_msg("train"), _ctx(), H2, "acme/app", "1.0", str(cfg.approvals))
    rec = RunRecorder(RunDirectory(tmp_path / "run"), settings=RunSettings(), run_id=1,
                      mode="test")
    FedVaultFedAvg(recorder=rec, min_sites=1).aggregate_train(1, [reply])
    refused = [e for e in read_chain(rec.dir.events) if e["kind"] == "site_refused"]
    assert refused and "is not approved" in refused[0]["reason"]


def test_the_runtime_shim_runs_this_interpreter(tmp_path: Path) -> None:
    bin_dir = runtime_shim(tmp_path)
    script = bin_dir / "flwr-clientapp"
    assert os.access(script, os.X_OK)
    assert "-m client.runtime" in script.read_text()


def test_site_approve_and_approvals_commands(tmp_path: Path) -> None:
    p = _site(tmp_path)
    r = cli_in_process("site", "approve", "--config", str(p), "--hash", H1, "--note", "ok")
    assert r.returncode == 0 and f"approved: {H1}" in r.stdout
    r = cli_in_process("site", "approvals", "--config", str(p))
    assert r.returncode == 0 and H1[:20] in r.stdout
    r = cli_in_process("site", "approve", "--config", str(p), "--hash", "zz")
    assert r.returncode == 2 and "64 hex digits" in r.stderr


def _real_site(tmp_path: Path, **node: object) -> Path:
    import numpy as np

    from client.data import save_table
    from fedvault_tasks.tasks import get_task

    data = save_table(get_task("tabular").embedded().subset(np.arange(300)),
                      tmp_path / "site.csv", label_column="y")
    extra = "".join(f"{k} = {json.dumps(v)}\n" for k, v in node.items())
    p = tmp_path / "site.toml"
    p.write_text(f'[site]\nname = "clinic"\nsuperlink = "127.0.0.1:9092"\ninsecure = true\n'
                 f'[node-config]\ndata-path = "{data}"\nlabel-column = "y"\ntask = "tabular"\n'
                 f'ledger-path = "{tmp_path / "ledger.jsonl"}"\n{extra}')
    return p


def test_preview_shows_the_cost_and_spends_nothing(tmp_path: Path) -> None:
    p = _real_site(tmp_path, **{"max-epsilon": 9.0})
    run = tmp_path / "run.toml"
    run.write_text('task = "tabular"\nnum-server-rounds = 3\ntarget-epsilon = 4.0\n')
    r = cli_in_process("site", "preview", "--config", str(p), "--run-config", str(run),
                       "--check")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "site clinic" in r.stdout and "3 round(s)" in r.stdout
    assert "0.0000 spent -> 4.0" in r.stdout.replace("3.99", "4.0") and "of 9" in r.stdout
    assert "what leaves the site each round" in r.stdout
    assert not (tmp_path / "ledger.jsonl").exists()  # nothing written, not even a secret
    assert not list(tmp_path.glob("*.secret"))


def test_preview_check_fails_before_any_spend(tmp_path: Path) -> None:
    p = _real_site(tmp_path, **{"max-epsilon": 2.0})
    run = tmp_path / "run.toml"
    run.write_text('task = "tabular"\nnum-server-rounds = 3\ntarget-epsilon = 4.0\n')
    r = cli_in_process("site", "preview", "--config", str(p), "--run-config", str(run),
                       "--check")
    assert r.returncode == 1 and "FAILS" in r.stdout and "> limit 2" in r.stdout
    digits = tmp_path / "digits.toml"
    digits.write_text('task = "digits"\n')
    r = cli_in_process("site", "preview", "--config", str(p), "--run-config", str(digits),
                       "--check")
    assert r.returncode == 1 and "serves task 'tabular'" in r.stdout
