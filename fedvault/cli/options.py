"""Run options shared by ``simulate`` and ``rehearse``: one command-line flag per
:class:`~protocols.config.RunSettings` field (``tests/test_config.py`` checks that
the flags, ``RunSettings``, ``pyproject.toml`` and the scenario keys agree)."""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path
from typing import Any

from protocols.config import RunSettings, cli_options
from protocols.errors import ConfigError
from protocols.rundir import check_output_dir


def add_run_options(p: argparse.ArgumentParser) -> None:
    d = RunSettings()
    g = p.add_argument_group("run configuration")
    for flag, field, typ, help_, group in cli_options():
        if group != "run":
            continue
        default = getattr(d, field)
        g.add_argument(flag, dest=field, type=typ, default=None,
                       help=f"{help_} (default: {default!r})")
    g.add_argument("--no-central-eval", dest="central_eval", action="store_false", default=None,
                   help="skip evaluation on the held-out central test split")
    dp = p.add_argument_group("differential privacy (on by default)")
    dp.add_argument("--dp", dest="dp", action=argparse.BooleanOptionalAction, default=None,
                    help="sample-level DP-SGD at every site (on by default; --no-dp trains "
                    "without it, and sites that require DP refuse)")
    for flag, field, typ, help_, group in cli_options():
        if group != "dp":
            continue
        dp.add_argument(flag, dest=field, type=typ, default=None,
                        help=f"{help_} (default: {getattr(d, field)!r})")
    he = p.add_argument_group("encrypted aggregation")
    he.add_argument("--he", dest="he", action=argparse.BooleanOptionalAction, default=None,
                    help="the server sums TenSEAL ciphertexts it cannot decrypt (BFV; on by "
                    "default, off with --no-he or --client-dp); a federation is provisioned "
                    "in the run directory")
    he.add_argument("--he-federation", dest="he_federation", default=None,
                    help="use this provisioned federation (fedvault provision) instead")
    dp.add_argument("--client-dp", dest="client_dp", action="store_true", default=None,
                    help="also add client-level DP (DP-FedAvg) at the server")
    dp.add_argument("--insecure-noise", dest="secure_mode", action="store_false", default=None,
                    help="DP noise from torch's seeded PRNG instead of the OS CSPRNG "
                    "(reproducible; warns at every round)")
    p.add_argument("--out", type=Path, default=None,
                   help="run directory (default: runs/<mode>-<UTC time>)")
    p.add_argument("--json", action="store_true", help="print summary.json instead of a table")


def explicit(args: argparse.Namespace) -> dict[str, Any]:
    """The run options given on the command line (field name -> value)."""
    changes: dict[str, Any] = {}
    for _, field, _, _, _ in cli_options():
        v = getattr(args, field)
        if v is not None:
            changes[field] = v
    if args.he_federation:
        changes["he_federation"] = str(Path(args.he_federation).resolve())
        changes["he"] = True
    for flag_field in ("central_eval", "dp", "secure_mode", "client_dp", "he"):
        if getattr(args, flag_field) is not None:
            changes[flag_field] = getattr(args, flag_field)
    return changes


def check_cpus_per_site(cpus: float, *, ray_address: str = "") -> float:
    """``--cpus-per-site``: a positive number, and on this machine's own Ray no more than
    its CPUs (Ray could place no site: the run would hang)."""
    if not (math.isfinite(cpus) and cpus > 0):
        raise ConfigError(f"--cpus-per-site must be > 0 (CPUs Ray reserves per simulated "
                          f"site). Found {cpus:g}.")
    total = os.cpu_count() or 1
    if not ray_address and cpus > total:
        raise ConfigError(f"--cpus-per-site {cpus:g} exceeds this machine's {total} CPUs: "
                          "Ray could not place a single site (give --ray-address for a "
                          "cluster).")
    return cpus


def default_out(mode: str) -> Path:
    return Path("runs") / f"{mode}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"


def settings_from(args: argparse.Namespace, mode: str, **fixed: Any) -> RunSettings:
    changes = explicit(args)
    # Encrypted aggregation is the default of the command line; client-level DP needs
    # plaintext updates at the server, so asking for it turns HE off unless --he is given.
    changes.setdefault("he", not changes.get("client_dp", False))
    out = check_output_dir(args.out or default_out(mode))
    changes["run_dir"] = str(out.resolve())
    changes.update(fixed)
    try:
        return RunSettings(**changes)
    except TypeError as exc:  # pragma: no cover - programming error
        raise ConfigError(str(exc)) from exc


def passphrase_from_env(var: str | None) -> str | None:
    """The passphrase in environment variable ``var`` (``--passphrase-env``); ``None``
    without one; a ``ConfigError`` if it is named but empty or unset."""
    if not var:
        return None
    value = os.environ.get(var)
    if not value:
        raise ConfigError(f"environment variable {var} is empty or unset.")
    return value
