from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import cli_in_process, run_cli

COMMANDS = ["simulate", "rehearse", "show", "verify", "tasks", "budget", "provision", "model"]


def test_help_lists_every_command() -> None:
    r = run_cli("--help")
    assert r.returncode == 0
    for c in COMMANDS:
        assert c in r.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_help(command: str) -> None:
    r = run_cli(command, "--help")
    assert r.returncode == 0 and "usage: fedvault " + command in r.stdout


def _one_line_error(r: object, pattern: str) -> None:
    assert r.returncode == 2, r.stderr  # type: ignore[attr-defined]
    err = r.stderr.strip()  # type: ignore[attr-defined]
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and pattern in err, err


def test_bad_data_path(tmp_path: Path) -> None:
    _one_line_error(run_cli("simulate", "--data-path", str(tmp_path / "nope.csv"),
                            "--out", str(tmp_path / "run")), "does not exist")


def test_unknown_task(tmp_path: Path) -> None:
    _one_line_error(cli_in_process("simulate", "--task", "imagenet", "--out", str(tmp_path / "r")),
                    "Unknown task 'imagenet'. Known tasks: digits, tabular.")
    _one_line_error(cli_in_process("rehearse", "--task", "imagenet", "--out", str(tmp_path / "r")),
                    "Unknown task 'imagenet'")


def test_csv_without_label_column(tmp_path: Path) -> None:
    p = tmp_path / "t.csv"
    p.write_text("a,b,c\n1,2,3\n4,5,6\n")
    _one_line_error(cli_in_process("simulate", "--task", "tabular", "--data-path", str(p),
                            "--out", str(tmp_path / "r")),
                    "no label column 'label'; columns are a, b, c")


def test_bad_option_values(tmp_path: Path) -> None:
    _one_line_error(cli_in_process("simulate", "--alpha", "0", "--out", str(tmp_path / "r")),
                    "alpha must be > 0")
    _one_line_error(cli_in_process("simulate", "--sites", "2", "--min-sites", "3",
                            "--out", str(tmp_path / "r")), "min-sites (3) exceeds")


def test_verify_and_show_of_missing_things(tmp_path: Path) -> None:
    _one_line_error(cli_in_process("verify", str(tmp_path / "x.jsonl")), "no such log file")
    _one_line_error(cli_in_process("show", str(tmp_path)), "has no summary.json")


def test_tasks() -> None:
    r = run_cli("tasks")
    assert r.returncode == 0 and "digits" in r.stdout and "tabular" in r.stdout


# -- bad inputs: one `error:` line, exit 2, before anything expensive starts ---------------

_EVENT = {"kind": "poisson_subsampled_gaussian", "noise_multiplier": 1.6, "sample_rate": 0.1,
          "steps": 5, "adjacency": "add-remove-one"}
_RESERVATION = {"run_id": "run-1", "round": 1, "scope": "site", "dataset": "d" * 32,
                "events": [_EVENT], "accountant": "prv", "delta": 1e-5,
                "epsilon_before": 0.0, "epsilon_after": 0.5, "epsilon_limit": 10.0,
                "insecure": False}


def _chain(path: Path, *entries: tuple[str, dict[str, object]]) -> Path:
    """A log whose hash chain verifies, holding ``(kind, fields)`` entries."""
    from protocols.hashchain import HashChainLog

    log = HashChainLog(path)
    for kind, fields in entries:
        log.append(kind, **fields)
    return path


def _ledger(path: Path, **reservation: object) -> Path:
    return _chain(path, ("dataset_registered", {"scope": "site", "dataset": "d" * 32,
                                                "source": "a.csv", "rows": 100}),
                  ("reservation", {**_RESERVATION, **reservation}))


@pytest.mark.parametrize("command", [("simulate",), ("rehearse",), ("provision", "--sites", "3")])
def test_out_that_is_a_file_or_under_a_file(tmp_path: Path, command: tuple[str, ...]) -> None:
    f = tmp_path / "a-file"
    f.write_text("not a directory\n")
    _one_line_error(cli_in_process(*command, "--out", str(f), timeout=120),
                    f"--out {f}: is a file, not a directory")
    _one_line_error(cli_in_process(*command, "--out", str(f / "sub"), timeout=120),
                    f"{f} is a file, not a directory")
    assert f.read_text() == "not a directory\n"


@pytest.mark.parametrize("command", [("simulate",), ("provision", "--sites", "3")])
def test_out_in_an_unwritable_place(command: tuple[str, ...]) -> None:
    # /proc accepts no new directories, whoever asks (root included); HE is on by default
    _one_line_error(cli_in_process(*command, "--out", "/proc/fedvault-x", timeout=120),
                    "--out /proc/fedvault-x: cannot create the directory: /proc is not writable")


@pytest.mark.parametrize("content, problem", [
    (bytes(range(256)), "not UTF-8 text"),
    ("name = 'caf\u00e9'\n".encode("latin-1"), "not UTF-8 text"),
    (b"name = [\n", "not valid TOML"),
])
def test_scenario_that_is_not_a_toml_file(tmp_path: Path, content: bytes, problem: str
                                          ) -> None:
    p = tmp_path / "scenario.toml"
    p.write_bytes(content)
    r = cli_in_process("simulate", str(p), "--out", str(tmp_path / "r"), timeout=120)
    _one_line_error(r, f"{p}: not")
    assert problem in r.stderr


def test_scenario_that_is_a_directory(tmp_path: Path) -> None:
    _one_line_error(cli_in_process("simulate", str(tmp_path), timeout=120),
                    f"scenario '{tmp_path}' is a directory, not a scenario (TOML) file")


@pytest.mark.parametrize("action", ["verify", "report", "new-ledger"])
def test_budget_commands_on_a_directory(tmp_path: Path, action: str) -> None:
    extra = ("--reason", "test") if action == "new-ledger" else ()
    _one_line_error(cli_in_process("budget", action, str(tmp_path), *extra),
                    f"{tmp_path} is a directory, not a ledger file")
    assert tmp_path.is_dir() and not list(tmp_path.parent.glob(f"{tmp_path.name}.replaced-*"))


def test_budget_report_out_that_is_a_directory_or_under_a_file(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path / "ledger.jsonl")
    _one_line_error(cli_in_process("budget", "report", str(ledger), "--format", "json",
                            "--out", str(tmp_path)), f"--out {tmp_path}: is a directory")
    f = tmp_path / "a-file"
    f.write_text("x")
    _one_line_error(cli_in_process("budget", "report", str(ledger), "--format", "json",
                            "--out", str(f / "sub")), f"{f} is a file, not a directory")


@pytest.mark.parametrize("cpus", ["0", "-1"])
def test_cpus_per_site_must_be_positive(tmp_path: Path, cpus: str) -> None:
    _one_line_error(cli_in_process("simulate", "--cpus-per-site", cpus, "--out",
                                   str(tmp_path / "r")), "--cpus-per-site must be > 0")
    assert not (tmp_path / "r").exists()  # refused before anything started


_MISSING = object()


@pytest.mark.parametrize("fields, problem", [
    ({"events": _MISSING}, "'events' is missing"),
    ({"events": None}, "'events' is not a list"),
    ({"events": "σ=1.6"}, "'events' is not a list"),
    ({"events": [1.6, 0.1, 5]}, "event 0 is not an object"),
    ({"events": [{"noise_multiplier": 1.6, "steps": 5}]}, "event 0 has no 'sample_rate'"),
    ({"events": [{**_EVENT, "noise_multiplier": -1}]}, "event 0: noise_multiplier must be > 0"),
    ({"delta": "1e-5"}, "'delta' must be a finite number"),
    ({"accountant": "gdp"}, "'accountant' must be one of prv, rdp"),
])
def test_budget_report_of_a_ledger_with_a_malformed_entry(
        tmp_path: Path, fields: dict[str, object], problem: str) -> None:
    ledger = tmp_path / "ledger.jsonl"
    entry = {k: v for k, v in {**_RESERVATION, **fields}.items() if v is not _MISSING}
    _chain(ledger, ("dataset_registered", {"scope": "site", "dataset": "d" * 32}),
           ("reservation", entry))
    assert cli_in_process("verify", str(ledger)).returncode == 0  # the chain itself is intact
    _one_line_error(cli_in_process("budget", "report", str(ledger)),
                    f"malformed ledger entry seq 1 (reservation): {problem}")


def test_budget_report_of_a_well_formed_hand_written_ledger(tmp_path: Path) -> None:
    from fedvault.compliance import ledger_report

    data = ledger_report(_ledger(tmp_path / "ledger.jsonl"))
    assert data["verified"]["entries"] == 2 and data["scopes"][0]["scope"] == "site"


def test_budget_report_refuses_what_is_not_a_ledger(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.touch()
    _one_line_error(cli_in_process("budget", "report", str(empty)),
                    f"{empty} is empty: not a privacy ledger")
    _one_line_error(cli_in_process("budget", "verify", str(empty)),
                    f"{empty} is empty: not a privacy ledger")
    events = _chain(tmp_path / "events.jsonl",
                    ("run_started", {"run_id": "1", "mode": "simulation"}),
                    ("round_completed", {"round": 1, "accepted": 3}),
                    ("run_finished", {"status": "completed"}))
    assert cli_in_process("verify", str(events)).returncode == 0
    _one_line_error(cli_in_process("budget", "report", str(events)),
                    f"{events} is not a privacy ledger (its entries are run events)")
    other = _chain(tmp_path / "other.jsonl", ("note", {"text": "hello"}))
    _one_line_error(cli_in_process("budget", "report", str(other)),
                    f"{other} is not a privacy ledger (no entry is a ledger entry")


def test_an_unexpected_error_is_one_line_and_debug_shows_its_traceback(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import fedvault.cli.model

    def bug(args: object) -> int:
        raise RuntimeError("a bug")

    monkeypatch.setattr(fedvault.cli.model, "cmd_tasks", bug)
    r = cli_in_process("tasks")
    err = r.stderr.strip()
    assert r.returncode == 3 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("error: unexpected RuntimeError: a bug") and "--debug" in err
    r = cli_in_process("--debug", "tasks")
    assert r.returncode == 3 and "Traceback" in r.stderr and "RuntimeError: a bug" in r.stderr


def test_light_modules_and_commands_load_no_torch() -> None:
    """The architecture page's promise (docs/explanation/architecture.md): --help,
    provision, show, verify and budget verify (their command modules), and
    privacy.events, protocols and client.data, load neither torch nor Opacus."""
    import subprocess
    import sys

    code = ("import sys, fedvault.cli, fedvault.cli.records, fedvault.cli.federation, "
            "privacy.events, protocols, client.data; "
            "print(sorted(m for m in ('torch', 'opacus') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120, check=True)
    assert r.stdout.strip() == "[]", r.stdout + r.stderr
