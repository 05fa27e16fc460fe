"""``fedvault model decrypt`` (release a model) and ``fedvault tasks``."""

from __future__ import annotations

import argparse
import os

from rich.table import Table as RichTable

from client.release import decrypt_model
from fedvault.cli.render import console
from fedvault_tasks.tasks import TASKS


def cmd_model_decrypt(args: argparse.Namespace) -> int:
    passphrase = os.environ.get(args.passphrase_env) if args.passphrase_env else None
    federation = args.federation or (args.run_dir / "federation")
    e = decrypt_model(args.run_dir, federation=federation, site=args.site,
                      server_round=args.round, out=args.out, passphrase=passphrase)
    sites = e["sites_in_aggregate"] or "an unknown number of"
    console.print(f"decrypted round {e['round']} (mean of {sites} sites, total weight "
                  f"{e['total_weight']}) with {e['site']}'s key -> {e['output']}",
                  soft_wrap=True)
    console.print(f"recorded in {args.run_dir / 'releases.jsonl'} (sha256 "
                  f"{e['output_sha256'][:16]}…)", soft_wrap=True)
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    t = RichTable(title="built-in tasks")
    for col in ("task", "features", "classes", "label column", "description"):
        t.add_column(col)
    for task in TASKS.values():
        t.add_row(task.name, str(task.default_num_features), str(task.default_num_classes),
                  task.default_label_column, task.description)
    console.print(t)
    return 0
