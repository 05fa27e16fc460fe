"""The ``fedvault`` command line.

::

    fedvault simulate            run a simulated federation (default: digits, 10 sites)
    fedvault rehearse --sites 3  run on a real loopback SuperLink + SuperNodes
    fedvault show RUN_DIR        print a finished run's table
    fedvault verify PATH         verify a hash-chained log (a run's events.jsonl)
    fedvault tasks               list the built-in tasks

Any :class:`~fedvault.errors.FedvaultError` is printed as one line
``error: ...`` with exit status 2; Ctrl-C exits with 130 after cleaning up.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table as RichTable

from fedvault import __version__
from fedvault.errors import FedvaultError
from protocols.config import RunSettings, config_key

console = Console()
err_console = Console(stderr=True)
#: above this many sites, privacy is summarised rather than listed site by site
MAX_SITE_ROWS = 30


# --------------------------------------------------------------------------------------
# options shared by simulate and rehearse
# --------------------------------------------------------------------------------------
_RUN_OPTIONS: list[tuple[str, str, type, str]] = [
    ("--task", "task", str, "built-in task (see `fedvault tasks`)"),
    ("--rounds", "num_server_rounds", int, "federated rounds"),
    ("--partition", "partitioner", str, "how data is split across sites: iid | dirichlet"),
    ("--alpha", "alpha", float, "Dirichlet concentration; smaller = more label skew"),
    ("--local-epochs", "local_epochs", int, "local epochs per round"),
    ("--batch-size", "batch_size", int, "local mini-batch size"),
    ("--lr", "learning_rate", float, "local SGD learning rate"),
    ("--momentum", "momentum", float, "local SGD momentum"),
    ("--fraction-train", "fraction_train", float, "fraction of sites sampled per round"),
    ("--min-sites", "min_sites", int, "fewest valid updates that form an aggregate"),
    ("--seed", "seed", int, "seed of model init, splits and sampling"),
    ("--data-path", "data_path", str, "a CSV/Parquet/NPZ table to split across the sites "
     "(default: the task's embedded data)"),
    ("--label-column", "label_column", str, "label column of --data-path"),
    ("--num-features", "num_features", int, "model input width (0 = task default)"),
    ("--num-classes", "num_classes", int, "number of classes (0 = task default)"),
    ("--round-timeout", "round_timeout", float, "seconds to wait for replies in a round"),
]

_DP_OPTIONS: list[tuple[str, str, type, str]] = [
    ("--target-epsilon", "target_epsilon", float,
     "epsilon this run may spend at each site (noise is calibrated per site)"),
    ("--noise-multiplier", "noise_multiplier", float,
     "fixed noise multiplier instead of --target-epsilon (0 = calibrate)"),
    ("--max-grad-norm", "max_grad_norm", float, "per-example clipping norm"),
    ("--delta", "dp_delta", float, "delta the run asks for"),
    ("--accountant", "accountant", str, "prv (tight) | rdp"),
    ("--site-max-epsilon", "site_max_epsilon", float,
     "each site's total epsilon budget (simulated sites / rehearsal node config)"),
    ("--site-delta", "site_delta", float, "each site's delta"),
    ("--site-min-noise", "site_min_noise_multiplier", float,
     "each site refuses rounds with less noise than this"),
    ("--client-dp-noise", "client_dp_noise_multiplier", float,
     "client-level DP: noise multiplier per release"),
    ("--client-dp-clip", "client_dp_clipping_norm", float,
     "client-level DP: L2 bound of a site's model update"),
    ("--client-dp-max-epsilon", "client_dp_max_epsilon", float,
     "client-level DP: central epsilon budget of the server ledger"),
]


def _add_run_options(p: argparse.ArgumentParser) -> None:
    d = RunSettings()
    g = p.add_argument_group("run configuration")
    for flag, field, typ, help_ in _RUN_OPTIONS:
        default = getattr(d, field)
        g.add_argument(flag, dest=field, type=typ, default=None,
                       help=f"{help_} (default: {default!r})")
    g.add_argument("--no-central-eval", dest="central_eval", action="store_false", default=None,
                   help="skip evaluation on the held-out central test split")
    dp = p.add_argument_group("differential privacy (on by default)")
    dp.add_argument("--dp", dest="dp", action=argparse.BooleanOptionalAction, default=None,
                    help="sample-level DP-SGD at every site (on by default; --no-dp trains "
                    "without it, and sites that require DP refuse)")
    for flag, field, typ, help_ in _DP_OPTIONS:
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


def _explicit(args: argparse.Namespace) -> dict[str, Any]:
    """The run options given on the command line (field name -> value)."""
    changes: dict[str, Any] = {}
    for _, field, _, _ in _RUN_OPTIONS + _DP_OPTIONS:
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


def _default_out(mode: str) -> Path:
    return Path("runs") / f"{mode}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"


def _settings_from(args: argparse.Namespace, mode: str, **fixed: Any) -> RunSettings:
    changes = _explicit(args)
    # Encrypted aggregation is the default of the command line; client-level DP needs
    # plaintext updates at the server, so asking for it turns HE off unless --he is given.
    changes.setdefault("he", not changes.get("client_dp", False))
    out = args.out or _default_out(mode)
    changes["run_dir"] = str(out.resolve())
    changes.update(fixed)
    try:
        return RunSettings(**changes)
    except TypeError as exc:  # pragma: no cover - programming error
        raise FedvaultError(str(exc)) from exc


# --------------------------------------------------------------------------------------
# progress and results
# --------------------------------------------------------------------------------------
class RoundProgress:
    """A rich progress bar driven by the run's event log."""

    def __init__(self, rounds: int, label: str, *, to_stderr: bool = False) -> None:
        self.rounds = rounds
        self.console = err_console if to_stderr else console
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            console=self.console,
            transient=False,
        )
        self.task_id = self.progress.add_task(label, total=rounds, detail="starting…")
        self.simulated = 0.0

    def __enter__(self) -> RoundProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def status(self, msg: str) -> None:
        self.progress.update(self.task_id, detail=msg)

    def on_event(self, e: dict[str, Any]) -> None:
        kind = e.get("kind")
        if kind == "run_started":
            self.status(f"{e.get('sites')} sites connected, round 1 running")
        elif kind == "round_completed":
            r = int(e.get("round", 0))
            acc = e.get("accuracy")
            acc_s = f"acc {acc:.3f}" if isinstance(acc, int | float) else "acc n/a"
            if r == 0:
                self.status(f"initial model {acc_s}")
            else:
                clock = ""
                if isinstance(e.get("simulated_seconds"), int | float):
                    self.simulated += float(e["simulated_seconds"])
                    clock = f", simulated {self.simulated / 60:.1f} min"
                self.progress.update(
                    self.task_id, completed=r,
                    detail=f"round {r}: {acc_s}, {e.get('sites_participated')} sites{clock}",
                )
        elif kind in ("update_rejected", "site_error"):
            self.console.print(f"[yellow]round {e.get('round')}: node {e.get('node_id')} "
                          f"{'rejected' if kind == 'update_rejected' else 'failed'}: "
                          f"{e.get('reason')}[/]")
        elif kind == "site_refused":
            self.console.print(f"[yellow]round {e.get('round')}: {e.get('site') or 'a site'} "
                               f"refused: {e.get('reason')}[/]", soft_wrap=True)
        elif kind == "release_refused":
            self.console.print(f"[yellow]round {e.get('round')}: no aggregate released: "
                               f"{e.get('reason')}[/]", soft_wrap=True)
        elif kind == "round_skipped":
            self.console.print(f"[yellow]round {e.get('round')}: skipped: {e.get('reason')}[/]")
        elif kind == "aggregate_refused":
            self.console.print(
                f"[yellow]round {e.get('round')}: no aggregate: {e.get('reason')}[/]"
            )


def print_summary(summary: dict[str, Any], run_dir: Path) -> None:
    t = RichTable(title=f"fedvault · {summary.get('mode')} · task {summary.get('task')} · "
                        f"{summary.get('sites')} sites")
    for col in ("round", "accuracy", "loss", "sites", "refused", "rejected", "seconds"):
        t.add_column(col, justify="right")
    for h in summary.get("history", []):
        t.add_row(
            str(h["round"]),
            "-" if h.get("accuracy") is None else f"{h['accuracy']:.4f}",
            "-" if h.get("loss") is None else f"{h['loss']:.4f}",
            str(h.get("sites_participated", "")),
            str(h.get("refused", 0)),
            str(h.get("rejected", 0) + h.get("errors", 0)),
            f"{h.get('seconds', 0):.1f}",
        )
    console.print(t)
    acc = summary.get("final_accuracy")
    console.print(
        f"final accuracy ({summary.get('metric_source')}): "
        f"[bold]{'n/a' if acc is None else f'{acc:.4f}'}[/]   "
        f"wall time: {summary.get('wall_seconds', 0):.1f} s"
    )
    privacy = summary.get("privacy") or {}
    if privacy.get("dp"):
        sites = privacy.get("sites", [])
        spent = [s for s in sites if s["epsilon"] is not None]
        source = privacy.get("epsilon_source", "as reported by each site")
        if len(sites) <= MAX_SITE_ROWS:
            pt = RichTable(title=f"privacy per site (sample-level DP-SGD, "
                           f"{privacy.get('accountant')})")
            for col in ("site", "ε spent", "δ", "noise σ", "refused rounds"):
                pt.add_column(col, justify="left" if col == "site" else "right")
            for s in sites:
                pt.add_row(s["site"], "-" if s["epsilon"] is None else f"{s['epsilon']:.3f}",
                           "-" if s["delta"] is None else f"{s['delta']:g}",
                           "-" if s["noise_multiplier"] is None
                           else f"{s['noise_multiplier']:.3f}",
                           str(s["refused_rounds"]))
            console.print(pt)
        else:
            console.print(f"privacy ({privacy.get('accountant')}; ε {source}): "
                          f"{len(spent)} of {summary.get('sites') or len(sites)} sites "
                          "spent budget")
        if spent:
            eps = sorted(float(s["epsilon"]) for s in spent)
            deltas = sorted({s["delta"] for s in spent if s["delta"] is not None})
            console.print(f"max ε over sites: [bold]{eps[-1]:.3f}[/] (median "
                          f"{eps[len(eps) // 2]:.3f}; δ = "
                          f"{', '.join(f'{d:g}' for d in deltas) or '-'}; {source})")
        central = privacy.get("client_level") or {}
        if central.get("enabled") and central.get("epsilon") is not None:
            console.print(f"client-level DP (server ledger): ε = {central['epsilon']:.3f} "
                          f"at δ = {central['delta']:g}, σ = {central['noise_multiplier']:g}, "
                          f"clip {central['clipping_norm']:g}")
        if not privacy.get("secure_mode"):
            console.print("[bold red]INSECURE: --insecure-noise: DP noise and batch sampling "
                          "came from seeded PRNGs; whoever knows the seed can remove the "
                          "noise, so these ε are unbounded. Each site's ledger marks these "
                          "rounds insecure.[/]")
    elif privacy:
        console.print("[yellow]trained WITHOUT differential privacy (--no-dp)[/]")
    released = summary.get("released_model")
    if released:
        console.print(f"released model (round {released['round']}, decrypted by "
                      f"{released['decrypted_by']}) on the central test split: "
                      f"[bold]{released['central_accuracy']:.4f}[/]", highlight=False)
    he = summary.get("he") or {}
    if he.get("enabled"):
        console.print(f"encrypted aggregation: {str(he.get('scheme')).upper()} "
                      f"N={he.get('poly_modulus_degree')}, "
                      f"[bold]{he.get('bytes_per_parameter')} bytes per parameter[/] on the wire "
                      f"({he.get('ciphertext_vs_float32')}x float32), "
                      f"{he.get('bytes_up_per_round')} bytes up per round; the server never "
                      "held a secret key")
    console.print(f"summary: {run_dir / 'summary.json'}")
    if (run_dir / "accuracy.png").exists():
        console.print(f"plot:    {run_dir / 'accuracy.png'}")


def _finish(args: argparse.Namespace, summary: dict[str, Any], run_dir: Path) -> int:
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print_summary(summary, run_dir)
    return 0 if summary.get("status") == "completed" else 1


# --------------------------------------------------------------------------------------
# commands
# --------------------------------------------------------------------------------------
def _warn_insecure(settings: RunSettings) -> None:
    if settings.dp and not settings.secure_mode:
        err_console.print("[bold red]warning: secure mode is off (--insecure-noise): DP "
                          "noise and batch sampling come from seeded PRNGs, not a CSPRNG; "
                          "the ε of this run is unbounded and every ledger says so.[/]")
    elif settings.he and not settings.secure_mode:
        err_console.print("[yellow]warning: secure mode is off (--insecure-noise): HE's "
                          "stochastic rounding is seeded.[/]")


def cmd_simulate(args: argparse.Namespace) -> int:
    from simulations.runner import check_run, simulate

    if args.list:
        return _list_scenarios()
    if args.compare:
        return _compare(args)
    if args.scenario:
        return _simulate_scenario(args)
    settings = _settings_from(args, "simulation")
    sites = 10 if args.sites is None else args.sites
    check_run(settings, sites)
    summary = _with_progress(
        args, settings, f"simulating {sites} sites",
        lambda on_event: simulate(settings, sites=sites, cpus_per_site=args.cpus_per_site,
                                  ray_address=args.ray_address, on_event=on_event,
                                  verbose=args.verbose))
    return _finish(args, summary, Path(settings.run_dir))


def _with_progress(args: argparse.Namespace, settings: RunSettings, label: str,
                   run: Callable[[Callable[[dict[str, Any]], None]], dict[str, Any]]
                   ) -> dict[str, Any]:
    """Run a simulation behind a progress bar fed by its event log."""
    _warn_insecure(settings)
    with RoundProgress(settings.num_server_rounds, label, to_stderr=args.json) as bar:
        bar.status("starting the Simulation Engine (Ray)")
        return run(bar.on_event)


def _list_scenarios() -> int:
    from simulations.scenario import builtin_path, builtin_scenarios, load_scenario

    t = RichTable(title="built-in scenarios (fedvault simulate NAME; copy the file as a "
                  "template)")
    for col in ("name", "sites", "rounds", "roles", "description"):
        t.add_column(col)
    for name, desc in builtin_scenarios().items():
        sc = load_scenario(name)
        roles = ", ".join(f"{n} {r}" for r, n in sc.roles().items())
        t.add_row(name, str(sc.num_sites), str(sc.settings(run_dir="x").num_server_rounds),
                  roles, desc)
    console.print(t)
    for name in builtin_scenarios():
        console.print(f"  {name}: {builtin_path(name)}", soft_wrap=True, highlight=False)
    return 0


def _simulate_scenario(args: argparse.Namespace) -> int:
    from simulations.runner import simulate_scenario
    from simulations.scenario import load_scenario

    scenario = load_scenario(args.scenario)
    if args.sites is not None:
        raise FedvaultError("--sites does not apply to a scenario: its [[sites]] groups "
                            f"define {scenario.num_sites} sites.")
    changes = _explicit(args)
    if changes:  # options of [data] or [defaults] are refused with a pointer to the table
        scenario = scenario.with_run({config_key(k): v for k, v in changes.items()})
    out = (args.out or _default_out(f"scenario-{scenario.name}")).resolve()
    settings = scenario.settings(run_dir=str(out))
    summary = _with_progress(
        args, settings, f"scenario {scenario.name}: {scenario.num_sites} sites",
        lambda on_event: simulate_scenario(scenario, out=out, cpus_per_site=args.cpus_per_site,
                                           ray_address=args.ray_address, on_event=on_event,
                                           verbose=args.verbose))
    code = _finish(args, summary, out)
    if not args.json:
        print_scenario(summary, out)
    return code


def print_scenario(summary: dict[str, Any], run_dir: Path) -> None:
    from rich import box

    sim = summary["simulation"]
    t = RichTable(title=f"scenario {sim['scenario']}: simulated network (late = missed the "
                  "round timeout)", box=box.SIMPLE_HEAD)
    for col in ("round", "sim s", "slowest site (its train-phase s)", "MiB ↓", "MiB ↑",
                "sampled",
                "trained", "dropped", "offline", "late"):
        t.add_column(col, justify="right")
    for h in summary.get("history", []):
        if "simulated_seconds" not in h:
            continue
        slow = ("-" if h.get("slowest_site") is None else
                f"{h['slowest_site']} ({h['slowest_site_seconds']:.1f})")
        t.add_row(str(h["round"]), f"{h['simulated_seconds']:.1f}", slow,
                  f"{h['bytes_down'] / 2**20:.2f}", f"{h['bytes_up'] / 2**20:.2f}",
                  str(h.get("sites_sampled", "")), str(h.get("sites_participated", "")),
                  str(h["dropped"]), str(h["offline"]), str(h["timed_out"]))
    console.print(t)
    total = float(sim.get("simulated_seconds") or 0.0)
    console.print(f"simulated time: [bold]{total:.1f} s[/] ({total / 60:.1f} min) for "
                  f"{summary.get('rounds_completed')} rounds; real wall time "
                  f"{sim.get('wall_seconds') or 0:.1f} s")
    roles = sim.get("roles", {})
    if set(roles) != {"honest"}:
        console.print("roles: " + ", ".join(f"{n} {r}" for r, n in roles.items())
                      + (f"; backdoor success {sim['backdoor_success']:.3f}"
                         if sim.get("backdoor_success") is not None else ""))
    if sim.get("max_epsilon_spent") is not None:
        console.print(f"max ε spent at a site: {sim['max_epsilon_spent']:.4f}")
    console.print(f"rounds:  {run_dir / 'rounds.csv'}")
    for fig in sim.get("figures", []):
        console.print(f"figure:  {run_dir / fig}")


def _compare(args: argparse.Namespace) -> int:
    from simulations.report import compare_runs

    a, b = args.compare
    rows, png = compare_runs(a, b, out=args.out)
    if args.json:
        print(json.dumps([{"metric": m, "a": x, "b": y} for m, x, y in rows], indent=2))
        return 0
    t = RichTable(title="fedvault · compare")
    t.add_column("")
    t.add_column(f"A: {a}", justify="right")
    t.add_column(f"B: {b}", justify="right")
    for row in rows:
        t.add_row(*row)
    console.print(t)
    console.print(f"plot: {png}")
    return 0


def cmd_rehearse(args: argparse.Namespace) -> int:
    from fedvault.rehearse import rehearse
    from simulations.runner import check_run

    settings = _settings_from(args, "rehearsal")
    check_run(settings, args.sites)
    _warn_insecure(settings)
    with RoundProgress(settings.num_server_rounds, f"rehearsing {args.sites} sites",
                       to_stderr=args.json) as bar:
        summary = rehearse(settings, sites=args.sites, on_event=bar.on_event,
                           on_status=bar.status, timeout=args.timeout)
    code = _finish(args, summary, Path(settings.run_dir))
    if not args.json:
        console.print(f"logs:    {summary['deployment']['logs']}")
    return code


def cmd_show(args: argparse.Namespace) -> int:
    from fedvault.rundir import RunDirectory

    run_dir = RunDirectory(args.run_dir)
    summary = run_dir.read_summary()
    code = _finish(args, summary, args.run_dir)
    if not args.json and "simulation" in summary:
        print_scenario(summary, args.run_dir)
    return code


def _verify(path: Path) -> int:
    """Verify any hash-chained log (events, ledger, releases): 0 if intact, else 1
    with the first bad entry named."""
    from protocols.hashchain import verify_chain

    report = verify_chain(path)
    if report.ok:
        console.print(f"[green]{escape(report.describe())}[/]", soft_wrap=True)
        return 0
    err_console.print(f"[red]{escape(report.describe())}[/]", soft_wrap=True)
    return 1


def cmd_verify(args: argparse.Namespace) -> int:
    path: Path = args.path
    return _verify(path / "events.jsonl" if path.is_dir() else path)


def cmd_budget_verify(args: argparse.Namespace) -> int:
    """The hash chain, and, where the site secret is beside the ledger, its anchor: a
    chain cannot show that its tail was cut or that the whole file was replaced."""
    from privacy.ledger import anchor_problem

    if args.ledger.exists():
        status = _verify(args.ledger)
        if status:
            return status  # the first edited, deleted or reordered entry, named
    problem = anchor_problem(args.ledger)
    if problem:
        err_console.print(f"[red]{escape(problem)}[/]", soft_wrap=True)
        return 1
    if not args.ledger.exists():
        return _verify(args.ledger)
    return 0


def cmd_budget_report(args: argparse.Namespace) -> int:
    from fedvault import reports

    data = reports.ledger_report(args.ledger, accountant=args.accountant,
                                 adjacency=args.adjacency)
    if args.format == "table":
        print_budget_table(data)
        text = None
    elif args.format == "json":
        text = reports.to_json(data)
    elif args.format == "csv":
        text = reports.to_csv(data)
    else:
        text = reports.to_html(data)
    if text is not None:
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(text, encoding="utf-8")
            console.print(f"wrote {args.out}")
        else:
            sys.stdout.write(text)
    elif args.out:
        raise FedvaultError("--out needs --format json, csv or html.")
    return 0


def cmd_budget_new_ledger(args: argparse.Namespace) -> int:
    from privacy.ledger import PrivacyLedger

    led = PrivacyLedger.start_new(args.ledger, reason=args.reason)
    console.print(f"started a new privacy ledger at {led.path}; the decision is its first "
                  "entry", soft_wrap=True, highlight=False)
    return 0


def print_budget_table(data: dict[str, Any]) -> None:
    from rich import box

    replace = data.get("adjacency") == "replace-one"
    t = RichTable(title="privacy budget per budget scope", box=box.SIMPLE_HEAD,
                  padding=(0, 1))
    cols = ["scope", "ε spent", *(["ε replace-one"] if replace else []), "ε limit",
            "remaining", "δ", "runs", "rounds", "refused", "last use (UTC)"]
    for col in cols:
        t.add_column(col, no_wrap=True,
                     justify="left" if col in ("scope", "last use (UTC)") else "right")
    for d in data["scopes"]:
        lim = d["epsilon_limit"]
        spent = (f"[bold red]unbounded[/] ({d['epsilon_spent']:.4f})" if d["insecure_rounds"]
                 else f"{d['epsilon_spent']:.4f}")
        rep = d.get("epsilon_replace_one")
        t.add_row(d["scope"], spent,
                  *([("-" if rep is None else f"{rep:.4f}")] if replace else []),
                  "-" if lim is None else f"{lim:g}",
                  "-" if d["epsilon_remaining"] is None else f"{d['epsilon_remaining']:.4f}",
                  "-" if d["delta"] is None else f"{d['delta']:g}",
                  str(len(d["runs"])), str(d["rounds"]), str(d["refusals"]),
                  d["last_use"][:16].replace("T", " "))
    console.print(f"ledger: {data['ledger']}", soft_wrap=True, highlight=False)
    console.print(f"accountant: {data['accountant']} (every ε recomputed from the stored "
                  "mechanisms); neighbouring relation: add/remove-one"
                  + (", and replace-one by group privacy" if replace else ""), highlight=False)
    console.print(t)
    for d in data["scopes"]:
        console.print(f"  {d['scope']}: {len(d['datasets'])} dataset(s), first "
                      f"{d['source'] or '-'}"
                      + (" (declared disjoint by the data owner)" if d["declared_disjoint"]
                         else ""), soft_wrap=True, highlight=False)
        if d["insecure_rounds"]:
            console.print(f"  [bold red]{d['scope']}: {d['insecure_rounds']} round(s) ran with "
                          "seeded (insecure) noise: whoever knows the seed can remove it, so "
                          "this scope's ε is unbounded[/]", soft_wrap=True)
    v = data["verified"]
    console.print(f"[green]hash chain verified[/]: {v['entries']} entries, "
                  f"last hash {v['last_hash'][:16]}…")


def cmd_provision(args: argparse.Namespace) -> int:
    import os

    from fedvault.provision import provision
    from privacy.he import bfv_params_for, ckks_params

    passphrase = None
    if args.passphrase_env:
        passphrase = os.environ.get(args.passphrase_env)
        if not passphrase:
            raise FedvaultError(f"environment variable {args.passphrase_env} is empty or unset.")
    params = ckks_params() if args.scheme == "ckks" else bfv_params_for(args.sites)
    m = provision(args.out, sites=args.sites, params=params, passphrase=passphrase)
    he = m["he"]
    console.print(f"federation of {args.sites} sites in {args.out}")
    console.print(f"  HE: {he['scheme'].upper()} N={he['poly_modulus_degree']} "
                  f"coeff moduli {he['coeff_mod_bit_sizes']} (128-bit security)"
                  + (f", plain modulus {he['plain_modulus']}" if "plain_modulus" in he else ""))
    console.print(f"  fingerprint: {he['fingerprint']}")
    console.print(f"  server: {args.out / m['server']['he_context']} (public: cannot decrypt)")
    console.print(f"  sites:  {args.out / 'sites'}/site-K/ (secret, mode 0600, "
                  f"{he['secret_at_rest']})")
    return 0


def cmd_model_decrypt(args: argparse.Namespace) -> int:
    import os

    from fedvault.release import decrypt_model

    passphrase = os.environ.get(args.passphrase_env) if args.passphrase_env else None
    federation = args.federation or (args.run_dir / "federation")
    e = decrypt_model(args.run_dir, federation=federation, site=args.site,
                      server_round=args.round, out=args.out, passphrase=passphrase)
    console.print(f"decrypted round {e['round']} (mean of {e['sites_in_aggregate']} sites) "
                  f"with {e['site']}'s key -> {e['output']}", soft_wrap=True)
    console.print(f"recorded in {args.run_dir / 'releases.jsonl'} (sha256 "
                  f"{e['output_sha256'][:16]}…)", soft_wrap=True)
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    from fedvault.tasks import TASKS

    t = RichTable(title="built-in tasks")
    for col in ("task", "features", "classes", "label column", "description"):
        t.add_column(col)
    for task in TASKS.values():
        t.add_row(task.name, str(task.default_num_features), str(task.default_num_classes),
                  task.default_label_column, task.description)
    console.print(t)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedvault",
        description="Privacy-preserving federated learning on Flower.",
    )
    p.add_argument("--version", action="version", version=f"fedvault {__version__}")
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
    _add_run_options(s)
    s.set_defaults(func=cmd_simulate)

    r = sub.add_parser("rehearse", help="run on a real loopback deployment: flower-superlink "
                       "+ N flower-supernode processes",
                       description="Start a real SuperLink and N SuperNodes on 127.0.0.1, "
                       "each site with its own data file, run, and stop them all.")
    r.add_argument("--sites", type=int, default=3, help="number of SuperNodes (default: 3)")
    r.add_argument("--timeout", type=float, default=3600.0,
                   help="give up after this many seconds (default: 3600)")
    _add_run_options(r)
    r.set_defaults(func=cmd_rehearse)

    sh = sub.add_parser("show", help="print the table of a finished run",
                        description="Print the per-round table of a finished run directory.")
    sh.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    sh.add_argument("--json", action="store_true", help="print summary.json")
    sh.set_defaults(func=cmd_show)

    v = sub.add_parser("verify", help="verify a hash-chained log (a run's events.jsonl)",
                       description="Check every entry's hash and link; exit 1 naming the "
                       "first bad entry.")
    v.add_argument("path", type=Path, metavar="PATH", help="a log file or a run directory")
    v.set_defaults(func=cmd_verify)

    b = sub.add_parser("budget", help="privacy ledgers: verify their integrity, report "
                       "the budget spent", description="Compliance tools for a site's "
                       "privacy ledger.")
    bsub = b.add_subparsers(dest="budget_command", metavar="ACTION", required=True)
    bv = bsub.add_parser("verify", help="verify a ledger's hash chain",
                         description="Check every entry's hash, sequence number and link; "
                         "exit 1 naming the first edited, deleted or reordered entry.")
    bv.add_argument("ledger", type=Path, metavar="LEDGER")
    bv.set_defaults(func=cmd_budget_verify)
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
    br.add_argument("--accountant", choices=["prv", "rdp"], default=None,
                    help="recompute with this accountant (default: the ledger's own)")
    br.add_argument("--adjacency", choices=["add-remove-one", "replace-one"],
                    default="add-remove-one",
                    help="also give epsilon under replace-one adjacency (group privacy of "
                    "two add/remove steps); spends are accounted add/remove-one")
    br.set_defaults(func=cmd_budget_report)
    bn = bsub.add_parser("new-ledger", help="start a new ledger on the record",
                         description="Where a site's ledger is missing or cut short and "
                         "cannot be restored from a backup, start a new one: the old file "
                         "is kept aside and the new ledger's first entry records your "
                         "reason and the anchor it replaces. The site refuses to train "
                         "until you restore the ledger or do this.")
    bn.add_argument("ledger", type=Path, metavar="LEDGER")
    bn.add_argument("--reason", required=True, help="why (recorded in the ledger)")
    bn.set_defaults(func=cmd_budget_new_ledger)

    pv = sub.add_parser("provision", help="create a federation: HE contexts and a manifest",
                        description="Create a federation directory: the server's public HE "
                        "context (no secret key), each site's secret context (mode 0600), "
                        "and a manifest with the parameters and their fingerprint.")
    pv.add_argument("--sites", type=int, required=True, help="number of sites")
    pv.add_argument("--out", type=Path, required=True, help="federation directory to create")
    pv.add_argument("--scheme", choices=["bfv", "ckks"], default="bfv",
                    help="bfv (default: quantised, exact sums, ~11-13 bytes/parameter) or ckks")
    pv.add_argument("--passphrase-env", metavar="VAR", default=None,
                    help="encrypt each site's secret context at rest with the passphrase in "
                    "environment variable VAR")
    pv.set_defaults(func=cmd_provision)

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
    md.set_defaults(func=cmd_model_decrypt)

    t = sub.add_parser("tasks", help="list the built-in tasks",
                       description="List the built-in tasks.")
    t.set_defaults(func=cmd_tasks)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except FedvaultError as exc:
        err_console.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted; every process was stopped.[/]")
        return 130


if __name__ == "__main__":
    sys.exit(main())
