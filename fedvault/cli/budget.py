"""``fedvault budget verify | report | new-ledger``: compliance tools for a site's
privacy ledger."""

from __future__ import annotations

import argparse
import sys

from fedvault import compliance
from fedvault.cli.render import console, print_budget_table
from privacy.ledger import PrivacyLedger
from protocols.errors import ConfigError
from protocols.rundir import check_input_file, check_output_file


def cmd_budget_report(args: argparse.Namespace) -> int:
    if args.out and args.format == "table":
        raise ConfigError("--out needs --format json, csv or html.")
    if args.out:  # before the report is computed: recomputing every epsilon takes a while
        check_output_file(args.out)
    data = compliance.ledger_report(args.ledger, accountant=args.accountant,
                                 adjacency=args.adjacency)
    if args.format == "table":
        print_budget_table(data)
        text = None
    elif args.format == "json":
        text = compliance.to_json(data)
    elif args.format == "csv":
        text = compliance.to_csv(data)
    else:
        text = compliance.to_html(data)
    if text is not None:
        if args.out:
            try:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(text, encoding="utf-8")
            except OSError as exc:
                raise ConfigError(f"--out {args.out}: cannot write it "
                                  f"({exc.strerror or exc}).") from None
            console.print(f"wrote {args.out}")
        else:
            sys.stdout.write(text)
    return 0


def cmd_budget_new_ledger(args: argparse.Namespace) -> int:
    check_input_file(args.ledger, what="ledger file")  # never set a directory aside
    led = PrivacyLedger.start_new(args.ledger, reason=args.reason)
    console.print(f"started a new privacy ledger at {led.path}; the decision is its first "
                  "entry", soft_wrap=True, highlight=False)
    return 0
