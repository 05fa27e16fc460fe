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
from fedvault.errors import ConfigError, IntegrityError
from fedvault.site import approve, fab_hash_of, load_site_config, runtime_shim
from tests.helpers import ROOT, cli_in_process

pytestmark = pytest.mark.usefixtures("flower_identity")
H1, H2 = "a" * 64, "b" * 64


def _site(tmp_path: Path, extra: str = "") -> Path:
    data = tmp_path / "data.csv"
    data.write_text("x,y\n1,0\n")
    p = tmp_path / "site.toml"
    p.write_text(f'[site]\nname = "clinic"\nsuperlink = "127.0.0.1:9092"\ninsecure = true\n'
                 f'{extra}\n[node-config]\ndata-path = "{data}"\nmax-epsilon = 4.0\n')
    return p


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
    from fedvault.rundir import RunDirectory
    from protocols.config import RunSettings
    from protocols.hashchain import read_chain
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
