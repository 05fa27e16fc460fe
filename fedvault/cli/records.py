"""``fedvault show``, ``verify`` and ``budget verify``: reading records, kept light
(no torch, no Opacus) so that an auditor's checks start at once."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.markup import escape

from fedvault.cli.render import console, err_console, finish, print_scenario
from privacy.site_secret import anchor_problem
from protocols.errors import IntegrityError
from protocols.hashchain import verify_chain
from protocols.rundir import RunDirectory, check_input_file


def cmd_show(args: argparse.Namespace) -> int:
    run_dir = RunDirectory(args.run_dir)
    summary = run_dir.read_summary()
    code = finish(args, summary, args.run_dir)
    if not args.json and "simulation" in summary:
        print_scenario(summary, args.run_dir)
    return code


def verify_log(path: Path) -> int:
    """Verify any hash-chained log (events, ledger, releases): 0 if intact, else 1
    with the first bad entry named."""
    report = verify_chain(path)
    if report.ok:
        console.print(f"[green]{escape(report.describe())}[/]", soft_wrap=True)
        return 0
    err_console.print(f"[red]{escape(report.describe())}[/]", soft_wrap=True)
    return 1


def cmd_verify(args: argparse.Namespace) -> int:
    path: Path = args.path
    return verify_log(path / "events.jsonl" if path.is_dir() else path)


def cmd_budget_verify(args: argparse.Namespace) -> int:
    """The hash chain, and, where the site secret is beside the ledger, its anchor: a
    chain cannot show that its tail was cut or that the whole file was replaced."""
    check_input_file(args.ledger, what="ledger file")
    if args.ledger.exists() and args.ledger.stat().st_size == 0:
        raise IntegrityError(f"{args.ledger} is empty: not a privacy ledger.")
    if args.ledger.exists():
        status = verify_log(args.ledger)
        if status:
            return status  # the first edited, deleted or reordered entry, named
    problem = anchor_problem(args.ledger)
    if problem:
        err_console.print(f"[red]{escape(problem)}[/]", soft_wrap=True)
        return 1
    if not args.ledger.exists():
        return verify_log(args.ledger)
    return 0
