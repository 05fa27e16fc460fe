"""The ``fedvault`` command line: the parser, and ``main``.

::

    fedvault simulate            run a simulated federation (default: digits, 10 sites)
    fedvault rehearse --sites 3  run on a real loopback SuperLink + SuperNodes
    fedvault show RUN_DIR        print a finished run's table
    fedvault verify PATH         verify a hash-chained log (a run's events.jsonl)
    fedvault budget ...          verify and report a site's privacy ledger
    fedvault provision ...       create a federation (HE contexts and a manifest)
    fedvault federation ...      TLS certificates; fingerprints to compare by phone
    fedvault site ...            a data owner's node: keygen, start, approve, preview
    fedvault model decrypt ...   release a model (key holders)
    fedvault tasks               list the built-in tasks

One module per command group (:mod:`.run`, :mod:`.records`, :mod:`.budget`,
:mod:`.federation`, :mod:`.site`, :mod:`.model`),
the shared run options (:mod:`.options`) and what is printed (:mod:`.render`).
Any :class:`~protocols.errors.FedvaultError` is printed as one line
``error: ...`` with exit status 2; an unexpected exception too, with its
traceback under ``--debug`` (or ``FEDVAULT_DEBUG=1``). Ctrl-C exits with 130
after cleaning up.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from rich.markup import escape

from fedvault import __version__
from fedvault.cli.options import add_run_options
from fedvault.cli.render import err_console
from protocols.errors import FedvaultError
from protocols.names import HE_PROFILES, AccountantName, values


def _handler(module: str, name: str) -> tuple[str, str]:
    return (f"fedvault.cli.{module}", name)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedvault",
        description="Privacy-preserving federated learning on Flower.",
    )
    p.add_argument("--version", action="version", version=f"fedvault {__version__}")
    p.add_argument("--debug", action="store_true",
                   help="show the traceback of an unexpected error (or FEDVAULT_DEBUG=1)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    s = sub.add_parser("simulate", help="run a simulated federation on Flower's Simulation "
                       "Engine (default: digits, 10 sites, Dirichlet alpha 0.5, 5 rounds), or "
                       "a scenario file",
                       description="Run fedvault's ServerApp and ClientApp with simulated "
                       "sites on Flower's Simulation Engine (Ray). With SCENARIO (a TOML file "
                       "or a built-in name, see --list), the sites get the scenario's data, "
                       "links, failures and behaviours, and a simulated clock; run options "
                       "given on the command line override its [run] table.")
    s.add_argument("scenario", nargs="?", default=None, metavar="SCENARIO",
                   help="a scenario TOML file or a built-in scenario name")
    s.add_argument("--list", action="store_true", help="list the built-in scenarios")
    s.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"), default=None,
                   help="put two finished runs side by side (table and plot; --out names "
                   "the plot, default B/compare.png)")
    s.add_argument("--sites", type=int, default=None,
                   help="number of simulated sites without a scenario (default: 10)")
    s.add_argument("--cpus-per-site", type=float, default=1.0,
                   help="CPUs Ray reserves per simulated site (default: 1)")
    s.add_argument("--ray-address", default="", metavar="ADDR",
                   help="run the simulated sites on an existing Ray cluster (e.g. 'auto' or "
                   "HEAD:6379, from `ray start --head`); the run directory must be on a "
                   "filesystem every Ray node shares")
    s.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    add_run_options(s)
    s.set_defaults(handler=_handler("run", "cmd_simulate"))

    r = sub.add_parser("rehearse", help="run on a real loopback deployment: flower-superlink "
                       "+ N flower-supernode processes",
                       description="Start a real SuperLink and N SuperNodes on 127.0.0.1, "
                       "each site with its own data file, run, and stop them all.")
    r.add_argument("--sites", type=int, default=3, help="number of SuperNodes (default: 3)")
    r.add_argument("--timeout", type=float, default=3600.0,
                   help="give up after this many seconds (default: 3600)")
    r.add_argument("--insecure", action="store_true",
                   help="no TLS and no node authentication (a loud warning; by default the "
                   "rehearsal makes a CA, a TLS certificate for the SuperLink and a node key "
                   "per site, and registers each site's public key)")
    add_run_options(r)
    r.set_defaults(handler=_handler("run", "cmd_rehearse"))

    sh = sub.add_parser("show", help="print the table of a finished run",
                        description="Print the per-round table of a finished run directory.")
    sh.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    sh.add_argument("--json", action="store_true", help="print summary.json")
    sh.set_defaults(handler=_handler("records", "cmd_show"))

    v = sub.add_parser("verify", help="verify a hash-chained log (a run's events.jsonl)",
                       description="Check every entry's hash and link; exit 1 naming the "
                       "first bad entry.")
    v.add_argument("path", type=Path, metavar="PATH", help="a log file or a run directory")
    v.set_defaults(handler=_handler("records", "cmd_verify"))

    b = sub.add_parser("budget", help="privacy ledgers: verify their integrity, report "
                       "the budget spent", description="Compliance tools for a site's "
                       "privacy ledger.")
    bsub = b.add_subparsers(dest="budget_command", metavar="ACTION", required=True)
    bv = bsub.add_parser("verify", help="verify a ledger's hash chain",
                         description="Check every entry's hash, sequence number and link; "
                         "exit 1 naming the first edited, deleted or reordered entry.")
    bv.add_argument("ledger", type=Path, metavar="LEDGER")
    bv.set_defaults(handler=_handler("records", "cmd_budget_verify"))
    br = bsub.add_parser("report", help="per budget scope: epsilon spent, limit, remaining, ...",
                         description="Report a verified ledger: per budget scope epsilon "
                         "spent (recomputed from the stored mechanisms), limit, remaining, "
                         "delta, accountant, neighbouring relation, runs, rounds, last use; "
                         "rounds with insecure (seeded) noise make a scope's epsilon "
                         "unbounded, shown in red.")
    br.add_argument("ledger", type=Path, metavar="LEDGER")
    br.add_argument("--format", choices=["table", "json", "csv", "html"], default="table",
                    help="table (default, for a terminal), json, csv, or html (one "
                    "self-contained file with a plot)")
    br.add_argument("--out", type=Path, default=None, help="write to FILE instead of stdout")
    br.add_argument("--accountant", choices=values(AccountantName), default=None,
                    help="recompute with this accountant (default: the ledger's own)")
    br.add_argument("--adjacency", choices=["add-remove-one", "replace-one"],
                    default="add-remove-one",
                    help="also give epsilon under replace-one adjacency (group privacy of "
                    "two add/remove steps); spends are accounted add/remove-one")
    br.set_defaults(handler=_handler("budget", "cmd_budget_report"))
    bn = bsub.add_parser("new-ledger", help="start a new ledger on the record",
                         description="Where a site's ledger is missing or cut short and "
                         "cannot be restored from a backup, start a new one: the old file "
                         "is kept aside and the new ledger's first entry records your "
                         "reason and the anchor it replaces. The site refuses to train "
                         "until you restore the ledger or do this.")
    bn.add_argument("ledger", type=Path, metavar="LEDGER")
    bn.add_argument("--reason", required=True, help="why (recorded in the ledger)")
    bn.set_defaults(handler=_handler("budget", "cmd_budget_new_ledger"))

    pv = sub.add_parser("provision", help="create a federation: HE contexts and a manifest",
                        description="Create a federation directory: the server's public HE "
                        "context (no secret key), each site's secret context (mode 0600), "
                        "and a manifest with the parameters and their fingerprint.")
    pv.add_argument("--sites", type=int, required=True, help="number of sites")
    pv.add_argument("--out", type=Path, required=True, help="federation directory to create")
    pv.add_argument("--scheme", choices=HE_PROFILES, default="bfv",
                    help="bfv (default: quantised, exact sums, ~7.2 bytes/parameter), "
                    "bfv-compact (up to 16 sites: ~5.4 bytes/parameter and less CPU for an "
                    "8x coarser step) or ckks")
    pv.add_argument("--passphrase-env", metavar="VAR", default=None,
                    help="encrypt each site's secret context at rest with the passphrase in "
                    "environment variable VAR")
    pv.set_defaults(handler=_handler("federation", "cmd_provision"))

    mdl = sub.add_parser("model", help="release a model: decrypt an encrypted version",
                         description="Model release tools for key holders.")
    msub = mdl.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    md = msub.add_parser("decrypt", help="decrypt a stored encrypted global model (key holder)",
                         description="Turn a stored encrypted version of the global model into "
                         "a plaintext PyTorch state dict with a site's secret context; the "
                         "release is recorded in the run's releases.jsonl.")
    md.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    md.add_argument("--site", required=True, help="the key holder's site name (site-K)")
    md.add_argument("--federation", type=Path, default=None,
                    help="the provisioned federation (default: RUN_DIR/federation)")
    md.add_argument("--round", type=int, default=None, help="round (default: the last one)")
    md.add_argument("--out", type=Path, default=None, help="where to write the state dict")
    md.add_argument("--passphrase-env", metavar="VAR", default=None,
                    help="environment variable holding the secret context's passphrase")
    md.set_defaults(handler=_handler("model", "cmd_model_decrypt"))

    fd = sub.add_parser("federation", help="the central team's TLS certificates; "
                        "fingerprints to compare out of band",
                        description="Keys and certificates of a deployment.")
    fsub = fd.add_subparsers(dest="federation_command", metavar="ACTION", required=True)
    ft = fsub.add_parser("tls", help="a CA and the SuperLink's TLS certificate",
                         description="Create DIR/ca (ca.pem, and ca.key mode 0600: keep it "
                         "offline) and DIR/superlink (superlink.pem, superlink.key mode 0600, "
                         "and a copy of ca.pem) for flower-superlink --ssl-ca-certfile "
                         "--ssl-certfile --ssl-keyfile. Give every --host the sites dial.")
    ft.add_argument("--out", type=Path, required=True, metavar="DIR")
    ft.add_argument("--host", action="append", required=True,
                    help="an IP address or DNS name of the SuperLink (repeat for more)")
    ft.set_defaults(handler=_handler("federation", "cmd_federation_tls"))
    fa = fsub.add_parser("add-site", help="add a site's public keys (key ceremony)",
                         description="Copy a site's node-auth.pub and kx.pub into the "
                         "federation directory FED (created if new) and its manifest. Compare "
                         "their fingerprints with the data owner's first. Register the node "
                         "with the SuperLink too: flwr supernode register KEYS/node-auth.pub.")
    fa.add_argument("federation", type=Path, metavar="FED")
    fa.add_argument("--name", required=True, help="the site's name in the federation")
    fa.add_argument("--keys", type=Path, required=True, metavar="DIR",
                    help="the directory holding the site's node-auth.pub and kx.pub")
    fa.set_defaults(handler=_handler("federation", "cmd_federation_add_site"))
    fs = fsub.add_parser("show", help="fingerprints short enough to compare over the phone",
                         description="Print the fingerprint (first 128 bits of SHA-256) of "
                         "every certificate, node public key and HE federation manifest "
                         "found in the given files or directories. The central team and "
                         "each data owner run it on their own copies and read the "
                         "fingerprints to each other.")
    fs.add_argument("paths", type=Path, nargs="+", metavar="PATH")
    fs.set_defaults(handler=_handler("federation", "cmd_federation_show"))

    st = sub.add_parser("site", help="a data owner's node: keys, start, approve apps, preview",
                        description="Run this site's node with the fedvault installed here "
                        "(never the code a SuperLink ships) and decide which apps it serves.")
    ssub = st.add_subparsers(dest="site_command", metavar="ACTION", required=True)
    ss = ssub.add_parser("start", help="start this site's SuperNode and its ClientApp runtime",
                         description="Start flower-supernode (--isolation process) and a "
                         "flower-superexec whose ClientApp processes run the fedvault "
                         "installed here, for approved apps only; stop both on Ctrl-C.")
    ss.add_argument("--config", type=Path, required=True, metavar="SITE.toml")
    ss.set_defaults(handler=_handler("site", "cmd_site_start"))
    sk = ssub.add_parser("keygen", help="create this node's authentication key pair",
                         description="Create node-auth.key (EC P-384, OpenSSH format, mode "
                         "0600: it never leaves this site) and node-auth.pub in DIR, and print "
                         "the public key's fingerprint. Send node-auth.pub to the central team, "
                         "who register it (`flwr supernode register`), and read them the "
                         "fingerprint over the phone; set site.toml's auth-key to the key.")
    sk.add_argument("--dir", type=Path, required=True, metavar="DIR")
    sk.add_argument("--name", default="", help="a comment in the public key (the site's name)")
    sk.set_defaults(handler=_handler("site", "cmd_site_keygen"))
    for name, helptext, desc in (
            ("he-keys", "the key maker: make the federation's HE keys",
             "At the one site agreed as key maker, once the central team added every site "
             "(`fedvault federation add-site`): generate the HE context, keep its secret at "
             "this site (--out), and write into the federation directory the public context "
             "(no secret key: the server's) and, for every other site, the secret context "
             "sealed to that site's kx.pub (X25519 + AES-256-GCM). The central team relays "
             "what it cannot open."),
            ("he-receive", "open the HE secret the key maker sealed to this site",
             "Open sites/NAME/he-secret.sealed of the federation directory with this site's "
             "kx.key, check the context against the manifest's fingerprint, and keep it at "
             "this site (--out, mode 0600). Compare the printed fingerprint with the key "
             "maker's over the phone.")):
        sh = ssub.add_parser(name, help=helptext, description=desc)
        sh.add_argument("--federation", type=Path, required=True, metavar="FED",
                        help="the federation directory the central team relays")
        sh.add_argument("--name", required=True, help="this site's name in the federation")
        sh.add_argument("--keys", type=Path, required=True, metavar="DIR",
                        help="this site's keys (from `fedvault site keygen`)")
        sh.add_argument("--out", type=Path, required=True, metavar="DIR",
                        help="this site's own federation directory (node-config "
                        "he-federation)")
        sh.add_argument("--passphrase-env", default=None, metavar="VAR",
                        help="encrypt the secret context at rest with the passphrase in VAR "
                        "(then node-config he-passphrase-env = VAR)")
        if name == "he-keys":
            sh.add_argument("--scheme", choices=HE_PROFILES, default="bfv",
                            help="bfv (default: exact integer sums), bfv-compact (up to 16 "
                            "sites: fewer bytes, coarser step) or ckks")
        sh.set_defaults(handler=_handler("site", "cmd_site_" + name.replace("-", "_")))
    sa = ssub.add_parser("approve", help="serve runs of an app (by its FAB's SHA-256)",
                         description="Append an approval (or, with --revoke, its withdrawal) "
                         "to the site's hash-chained approvals file. Give the app as a "
                         "directory (hashed as `flwr run` builds it), a .fab file, or a hash.")
    what = sa.add_mutually_exclusive_group(required=True)
    what.add_argument("--app", type=Path, metavar="DIR_OR_FAB",
                      help="the app you reviewed: its directory or its .fab file")
    what.add_argument("--hash", metavar="SHA256", help="the FAB's SHA-256")
    sa.add_argument("--config", type=Path, required=True, metavar="SITE.toml")
    sa.add_argument("--note", default="", help="why (recorded)")
    sa.add_argument("--revoke", action="store_true", help="withdraw an approval")
    sa.set_defaults(handler=_handler("site", "cmd_site_approve"))
    sp = ssub.add_parser("preview", help="what a run will do and cost here, before any "
                         "budget is reserved",
                         description="Apply the run config the central team published to "
                         "this site's data, limits and ledger: task, rounds, local steps, "
                         "sampling rate, noise, delta, the epsilon the run will cost this "
                         "budget scope and what remains, what leaves the site; every check "
                         "a round makes before its reservation. Nothing is written.")
    sp.add_argument("--config", type=Path, required=True, metavar="SITE.toml")
    sp.add_argument("--run-config", type=Path, default=None, metavar="FILE.toml",
                    help="the run config: its keys at the top level, or an app's "
                    "pyproject.toml ([tool.flwr.app.config]); default: the defaults")
    sp.add_argument("--check", action="store_true", help="exit 1 if any check fails")
    sp.set_defaults(handler=_handler("site", "cmd_site_preview"))
    sl = ssub.add_parser("approvals", help="list the apps this site serves",
                         description="Verify the approvals file and list what it approves.")
    sl.add_argument("--config", type=Path, required=True, metavar="SITE.toml")
    sl.set_defaults(handler=_handler("site", "cmd_site_approvals"))

    t = sub.add_parser("tasks", help="list the built-in tasks",
                       description="List the built-in tasks.")
    t.set_defaults(handler=_handler("model", "cmd_tasks"))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get("FEDVAULT_DEBUG", "") not in ("", "0")
    module, name = args.handler
    try:
        # Imported here, once per invocation, on purpose: each command group loads only
        # what it needs, so `fedvault --help`, `provision` and `budget` never pay for
        # torch, Opacus or Ray (bench/startup.py measures it).
        func: Callable[[argparse.Namespace], int] = getattr(importlib.import_module(module), name)
        return func(args)
    except FedvaultError as exc:
        if debug:
            traceback.print_exc()
        err_console.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted; every process was stopped.[/]")
        return 130
    except Exception as exc:  # a bug, or a library error fedvault did not map
        if debug:
            traceback.print_exc()
            return 3
        err_console.print(f"[red]error:[/] unexpected {type(exc).__name__}: "
                          f"{escape(str(exc))} (run with --debug or FEDVAULT_DEBUG=1 for "
                          "the traceback)", highlight=False, soft_wrap=True)
        return 3


if __name__ == "__main__":
    sys.exit(main())
