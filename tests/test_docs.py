"""The operations guides (docs/) run as written: every ``bash`` block carries a step
marker, and each step is executed here, verbatim, with bash, on real Flower processes on
loopback: the central team's TLS certificates and SuperLink (node authentication on),
the sites' keys, the key ceremony, site.toml from the guide's own template, approvals,
the preview, `fedvault site start`, `flwr run`, and the compliance checks on the
records the run left.

The same deployment is the fault drill: a third node whose key was never registered is
refused by the SuperLink; site B's SuperNode is killed (SIGKILL) while it trains, and
the round completes with site A; B's node is restarted and rejoins under the same node
id; then A's `fedvault site start` is killed outright and its guard stops the processes
it started."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import tomli_w

from protocols.hashchain import read_chain, verify_chain
from tests.helpers import ROOT, processes_with_flwr_home_under

DOCS = ROOT / "docs" / "guides"
GUIDES = ("data-owner.md", "central-team.md", "compliance.md")
_BLOCK = re.compile(r"<!-- step: ([a-z0-9-]+) -->\n```(\w+)\n(.*?)```", re.S)


def steps() -> dict[str, tuple[str, str]]:
    """step name -> (language, body) of every marked block in the guides."""
    found: dict[str, tuple[str, str]] = {}
    for guide in GUIDES:
        text = (DOCS / guide).read_text(encoding="utf-8")
        for name, lang, body in _BLOCK.findall(text):
            assert name not in found, f"step {name} twice"
            found[name] = (lang, body)
        # every bash block is a step this test runs
        assert text.count("```bash") == len(re.findall(r"-->\n```bash", text)), guide
    return found


def test_every_guide_command_is_a_real_command() -> None:
    """Each `fedvault` line parses with fedvault's own parser; each flag given to a
    Flower command is one that command's --help lists."""
    from fedvault.cli import build_parser

    parser = build_parser()
    helps: dict[str, str] = {}
    for name, (lang, body) in steps().items():
        if lang != "bash":
            continue
        for line in body.strip().splitlines():
            words = shlex.split(line)
            if words[0] == "fedvault":
                parser.parse_args(words[1:])  # exits (SystemExit) on an unknown flag
            elif words[0] in ("flower-superlink", "flwr"):
                tool = words[0] if words[0] != "flwr" else f"flwr {words[1]} {words[2]}" \
                    if words[1] == "supernode" else f"flwr {words[1]}"
                if tool not in helps:
                    helps[tool] = subprocess.run(
                        [str(Path(sys.executable).parent / tool.split()[0]),
                         *tool.split()[1:], "--help"], capture_output=True, text=True,
                        env={**os.environ, "COLUMNS": "200"}).stdout
                for flag in (w for w in words if w.startswith("--")):
                    assert flag in helps[tool], (name, flag)
            else:
                pytest.fail(f"step {name}: unexpected command {line!r}")


def _bash(body: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-euo", "pipefail", "-c", body], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def _together(body: str | list[str], envs: list[dict[str, str]], cwd: Path) -> list[str]:
    """Run steps at once (a step at several sites: each is its own machine; or several
    independent steps), wait for all."""
    bodies = body if isinstance(body, list) else [body] * len(envs)
    procs = [subprocess.Popen(["bash", "-euo", "pipefail", "-c", b], env=e, cwd=cwd,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for b, e in zip(bodies, envs, strict=True)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out
    return outs


def _ok(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def _start(body: str, env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    fh = log.open("wb")
    return subprocess.Popen(["bash", "-euo", "pipefail", "-c", f"exec {body.strip()}"],
                            env=env, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _wait(what: str, ok: object, timeout: float, *procs: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(ok) and ok():
            return
        for p in procs:
            assert p.poll() is None, f"{p.args!r} exited with {p.returncode} while waiting {what}"
        time.sleep(0.3)
    pytest.fail(f"timed out waiting {what}")


def _pid(home: Path, command: str) -> int | None:
    for pid in processes_with_flwr_home_under(home):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.decode(errors="replace").endswith(command) for a in argv[:2]):
            return pid
    return None


@pytest.mark.loopback
def test_the_hand_deployment_in_the_guides_works_and_survives_faults(tmp_path: Path) -> None:
    from fedvault.node import stage_app
    from fedvault.processes import free_port
    from fedvault.rehearse import write_site_data
    from protocols.config import RunSettings

    s = steps()
    bin_dir = str(Path(sys.executable).parent)
    base = {k: v for k, v in os.environ.items() if not k.startswith("FLWR_")}
    base["PATH"] = bin_dir + os.pathsep + base.get("PATH", "")
    base["COLUMNS"] = "200"
    port = free_port()
    central, fed = tmp_path / "central", tmp_path / "fed"
    cli_home = tmp_path / "cli-home"
    # the app the central team ships: this checkout, staged as its FAB holds it (so that
    # `flwr run` does not walk the virtualenv)
    app = stage_app(ROOT, tmp_path / "app")
    env = {**base, "CENTRAL": str(central), "FED": str(fed), "PORT": str(port),
           "APP": str(app)}
    procs: list[subprocess.Popen[bytes]] = []
    data = write_site_data(RunSettings(partitioner="iid"), 3, tmp_path)
    names = ["clinic-a", "clinic-b", "intruder"]
    site_env = [{**env, "SITE": str(d.parent), "NAME": n, "KEYS": str(d.parent / "keys"),
                 "LEDGER": str(d.parent / "ledger.jsonl")} for d, n in zip(data, names,
                                                                          strict=True)]
    t0 = time.monotonic()

    def mark(what: str) -> None:
        print(f"[{time.monotonic() - t0:6.1f} s] {what}", flush=True)

    try:
        # -- the central team: certificates and the SuperLink ------------------------------
        out = _ok(_bash(s["central-tls"][1], env, tmp_path))
        assert "CA fingerprint" in out
        link = _start(s["central-superlink"][1], {**env, "FLWR_HOME": str(tmp_path / "lh")},
                      tmp_path, tmp_path / "superlink.log")
        procs.append(link)
        _wait("for the SuperLink", lambda: "Uvicorn running on https://" in
              (tmp_path / "superlink.log").read_text(), 60, link)
        cfg = tomllib.loads(s["central-cli-config"][1])
        cfg["superlink"]["fedvault"].update(
            address=f"127.0.0.1:{port}",
            **{"root-certificates": str(central / "superlink" / "ca.pem")})
        cli_home.mkdir()
        (cli_home / "config.toml").write_text(tomli_w.dumps(cfg))
        central_env = {**env, "FLWR_HOME": str(cli_home)}

        mark("superlink up")
        # -- each site makes its keys; the central team admits two of them -------------------
        _together(s["owner-keygen"][1], site_env, tmp_path)
        for e in site_env[:2]:
            _ok(_bash(s["central-add-site"][1], {**central_env, "NAME": e["NAME"],
                                                 "KEYS": e["KEYS"]}, tmp_path))
        mark("keys, add-site")
        # -- the key ceremony: clinic-a makes the HE keys, clinic-b receives its copy -------
        made = _ok(_bash(s["owner-he-keys"][1], site_env[0], tmp_path))
        got = _ok(_bash(s["owner-he-receive"][1], site_env[1], tmp_path))
        fp = re.search(r"HE context fingerprint: ([0-9a-f ]{39})", made)
        assert fp and fp.group(1) in got
        shown = _ok(_bash(s["central-show"][1], central_env, tmp_path))
        assert fp.group(1) in shown and "node public key" in shown

        mark("ceremony")
        # -- run config, published; each site writes site.toml from the guide's template ---
        run_dir = tmp_path / "run"
        run_config = tmp_path / "run.toml"
        run_config.write_text(tomli_w.dumps({
            "num-server-rounds": 1, "min-sites": 1, "fraction-train": 1.0,
            "fraction-evaluate": 1.0, "target-epsilon": 4.0, "he": True,
            "he-federation": str(fed), "run-dir": str(run_dir), "round-timeout": 300.0}))
        template = tomllib.loads(s["owner-site-toml"][1])
        shutil.copyfile(central / "superlink" / "ca.pem", tmp_path / "ca.pem")
        for k, (e, d) in enumerate(zip(site_env, data, strict=True)):
            site = Path(e["SITE"])
            shutil.copyfile(tmp_path / "ca.pem", site / "ca.pem")
            doc = {"site": {**template["site"], "name": e["NAME"],
                            "superlink": f"127.0.0.1:{port}", "runtime-port": free_port()},
                   "node-config": {**template["node-config"], "data-path": str(d),
                                   "label-column": "label", "task": "digits",
                                   "ledger-path": e["LEDGER"], "site-name": e["NAME"],
                                   "release-eval-metrics": True}}
            if k == 2:  # the intruder holds no HE key
                del doc["node-config"]["he-federation"]
            (site / "site.toml").write_text(tomli_w.dumps(doc))
            e["RUN_CONFIG"] = str(run_config)
        # (the intruder's preview --check would fail: it holds no HE key)
        for out in _together(s["owner-approve-preview"][1], site_env[:2], tmp_path):
            assert "approved" in out and "what leaves the site" in out
        mark("site.toml, approve, preview")
        # -- start the nodes: the unregistered one is refused ------------------------------
        nodes = [_start(s["owner-start"][1], e, tmp_path, Path(e["SITE"]) / "start.log")
                 for e in site_env]
        procs += nodes
        for k in (0, 1):
            _wait(f"for {names[k]} to connect", lambda k=k: "connected to" in (
                Path(site_env[k]["SITE"]) / "start.log").read_text(), 90, nodes[k])
        _wait("for the intruder to be refused", lambda: nodes[2].poll() is not None, 90)
        assert nodes[2].returncode == 2
        assert "Failed to activate SuperNode" in (
            Path(site_env[2]["SITE"]) / "site.flwr-home" / "logs" / "intruder.log").read_text()
        assert "No SuperNode found with the given public key" in (
            tmp_path / "superlink.log").read_text()

        mark("nodes started")
        # -- the central team launches; site B's SuperNode dies while it trains -----------
        runner = _start(s["central-run"][1], {**central_env, "RUN_CONFIG": str(run_config)},
                        app, tmp_path / "flwr-run.log")
        procs.append(runner)
        b_home = Path(site_env[1]["SITE"]) / "site.flwr-home"
        b_ledger = Path(site_env[1]["LEDGER"])
        _wait("for clinic-b to reserve", lambda: b_ledger.exists() and
              '"reservation"' in b_ledger.read_text(), 240, runner)
        mark("b reserved")
        b_node = _pid(b_home, "flower-supernode")
        assert b_node is not None
        b_id = re.search(r"SuperNode ID: (\d+)", (b_home / "logs" / "clinic-b.log").read_text())
        os.kill(b_node, signal.SIGKILL)
        # while the SuperLink waits out B's heartbeats (up to a minute): the checks that do
        # not need the run's end. B's own ledger, as its data owner checks it:
        b_env = {**site_env[1], "REPORT": str(Path(site_env[1]["SITE"]) / "r.html")}
        _ok(_bash(s["owner-ledger"][1], b_env, tmp_path))
        keys = _ok(_bash(s["compliance-keys"][1], central_env, tmp_path))
        assert fp.group(1) in keys and "SuperLink TLS certificate" in keys
        _wait("for the run to end", lambda: runner.poll() is not None, 300)
        assert runner.returncode == 0, (tmp_path / "flwr-run.log").read_text()[-3000:]
        mark("run ended")
        # -- what the run recorded ------------------------------------------------------------
        events = read_chain(run_dir / "events.jsonl")
        row = next(e for e in events if e["kind"] == "round_completed" and e["round"] == 1)
        assert row["sites_participated"] == 1 and row["errors"] == 1 and row["aggregated"]
        err = next(e for e in events if e["kind"] == "site_error")
        assert b_id and err["node_id"] == int(b_id.group(1)) and "heartbeat" in err["reason"]
        assert any(e["kind"] == "central_evaluation_off" for e in events)
        kinds = [e["kind"] for e in read_chain(b_ledger)]
        assert "reservation" in kinds  # the round B never finished still counts

        mark("records checked")
        # -- the compliance checks, and the central team's view ----------------------------
        ce = {**site_env[0], "RUN_DIR": str(run_dir),
              "REPORT": str(Path(site_env[0]["SITE"]) / "r.html")}
        renv = {**central_env, "RUN_DIR": str(run_dir)}
        # (the central team's result commands are the compliance run checks: run once)
        assert sorted(s["central-results"][1].split("\n")) == sorted(
            s["compliance-run"][1].split("\n"))
        _together([s["compliance-ledger"][1], s["compliance-run"][1]], [ce, renv], tmp_path)
        assert Path(ce["REPORT"]).read_text().lower().startswith("<!doctype html>")
        assert verify_chain(Path(site_env[0]["LEDGER"])).ok
        mark("compliance done")
        # -- site B's node restarted: it rejoins, its key still registered, same node id ---
        _wait("for clinic-b's supervisor to stop", lambda: nodes[1].poll() is not None, 30)
        assert nodes[1].returncode == 2  # its SuperNode died: it stopped and said so
        again = Path(site_env[1]["SITE"]) / "start-again.log"
        procs.append(_start(s["owner-start"][1], site_env[1], tmp_path, again))
        _wait("for clinic-b to rejoin", lambda: "connected to" in again.read_text(), 90,
              procs[-1])
        assert f"SuperNode ID: {b_id.group(1)}" in (b_home / "logs" / "clinic-b.log").read_text()
        # -- site A's supervisor killed outright: its guard stops what it started ----------
        a_home = Path(site_env[0]["SITE"]) / "site.flwr-home"
        assert processes_with_flwr_home_under(a_home)
        nodes[0].kill()
        _wait("for site A's processes to stop",
              lambda: not processes_with_flwr_home_under(a_home), 30)
    finally:
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for p in procs:
            p.wait(timeout=10)
        for pid in processes_with_flwr_home_under(tmp_path):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_the_deploy_units_start_real_commands() -> None:
    """deploy/: the systemd units' ExecStart and the container's ENTRYPOINT are commands
    and flags that exist (the units are not run here: no systemd, no container engine)."""
    from fedvault.cli import build_parser

    lines = [line.split("=", 1)[1] for unit in ("fedvault-site.service",
                                                "fedvault-superlink.service")
             for line in (ROOT / "deploy" / unit).read_text().splitlines()
             if line.startswith("ExecStart=")]
    entry = next(line for line in (ROOT / "deploy" / "Containerfile").read_text().splitlines()
                 if line.startswith("ENTRYPOINT"))
    import json

    lines.append(" ".join(json.loads(entry.split(" ", 1)[1])))
    assert len(lines) == 3
    link_help = subprocess.run([str(Path(sys.executable).parent / "flower-superlink"),
                                "--help"], capture_output=True, text=True).stdout
    for line in lines:
        words = shlex.split(line)
        tool = Path(words[0]).name
        if tool == "fedvault":
            build_parser().parse_args(words[1:])
        else:
            assert tool == "flower-superlink"
            for flag in (w for w in words if w.startswith("--")):
                assert flag in link_help, flag
