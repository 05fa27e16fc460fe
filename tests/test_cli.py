from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import run_cli

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
    _one_line_error(run_cli("simulate", "--task", "imagenet", "--out", str(tmp_path / "r")),
                    "Unknown task 'imagenet'. Known tasks: digits, tabular.")
    _one_line_error(run_cli("rehearse", "--task", "imagenet", "--out", str(tmp_path / "r")),
                    "Unknown task 'imagenet'")


def test_csv_without_label_column(tmp_path: Path) -> None:
    p = tmp_path / "t.csv"
    p.write_text("a,b,c\n1,2,3\n4,5,6\n")
    _one_line_error(run_cli("simulate", "--task", "tabular", "--data-path", str(p),
                            "--out", str(tmp_path / "r")),
                    "no label column 'label'; columns are a, b, c")


def test_bad_option_values(tmp_path: Path) -> None:
    _one_line_error(run_cli("simulate", "--alpha", "0", "--out", str(tmp_path / "r")),
                    "alpha must be > 0")
    _one_line_error(run_cli("simulate", "--sites", "2", "--min-sites", "3",
                            "--out", str(tmp_path / "r")), "min-sites (3) exceeds")


def test_verify_and_show_of_missing_things(tmp_path: Path) -> None:
    _one_line_error(run_cli("verify", str(tmp_path / "x.jsonl")), "no such log file")
    _one_line_error(run_cli("show", str(tmp_path)), "has no summary.json")


def test_tasks() -> None:
    r = run_cli("tasks")
    assert r.returncode == 0 and "digits" in r.stdout and "tabular" in r.stdout
