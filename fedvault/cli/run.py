"""``fedvault simulate``, ``rehearse``, ``show`` and ``verify``."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.table import Table as RichTable

from fedvault.cli.options import check_cpus_per_site, default_out, explicit, settings_from
from fedvault.cli.render import (
    RoundProgress,
    console,
    err_console,
    finish,
    print_scenario,
    warn_insecure,
)
from fedvault.rehearse import rehearse
from protocols.config import RunSettings, config_key
from protocols.errors import ConfigError
from protocols.rundir import check_output_dir
from protocols.summary import RunSummary
from simulations.compare import compare_runs
from simulations.runner import check_run, simulate, simulate_scenario
from simulations.scenario import builtin_path, builtin_scenarios, load_scenario


def cmd_simulate(args: argparse.Namespace) -> int:
    if args.list:
        return _list_scenarios()
    if args.compare:
        return _compare(args)
    check_cpus_per_site(args.cpus_per_site, ray_address=args.ray_address)
    if args.scenario:
        return _simulate_scenario(args)
    settings = settings_from(args, "simulation")
    sites = 10 if args.sites is None else args.sites
    check_run(settings, sites)
    summary = _with_progress(
        args, settings, f"simulating {sites} sites",
        lambda on_event: simulate(settings, sites=sites, cpus_per_site=args.cpus_per_site,
                                  ray_address=args.ray_address, on_event=on_event,
                                  verbose=args.verbose))
    return finish(args, summary, Path(settings.run_dir))


def _with_progress(args: argparse.Namespace, settings: RunSettings, label: str,
                   run: Callable[[Callable[[dict[str, Any]], None]], RunSummary]
                   ) -> dict[str, Any]:
    """Run a simulation behind a progress bar fed by its event log."""
    warn_insecure(settings)
    with RoundProgress(settings.num_server_rounds, label, to_stderr=args.json) as bar:
        bar.status("starting the Simulation Engine (Ray)")
        return dict(run(bar.on_event))


def _list_scenarios() -> int:
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
    scenario = load_scenario(args.scenario)
    if args.sites is not None:
        raise ConfigError("--sites does not apply to a scenario: its [[sites]] groups "
                            f"define {scenario.num_sites} sites.")
    changes = explicit(args)
    if changes:  # options of [data] or [defaults] are refused with a pointer to the table
        scenario = scenario.with_run({config_key(k): v for k, v in changes.items()})
    out = check_output_dir(args.out or default_out(f"scenario-{scenario.name}")).resolve()
    settings = scenario.settings(run_dir=str(out))
    summary = _with_progress(
        args, settings, f"scenario {scenario.name}: {scenario.num_sites} sites",
        lambda on_event: simulate_scenario(scenario, out=out, cpus_per_site=args.cpus_per_site,
                                           ray_address=args.ray_address, on_event=on_event,
                                           verbose=args.verbose))
    code = finish(args, summary, out)
    if not args.json:
        print_scenario(summary, out)
    return code


def _compare(args: argparse.Namespace) -> int:
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
    settings = settings_from(args, "rehearsal")
    check_run(settings, args.sites)
    warn_insecure(settings)
    if args.insecure:
        err_console.print("[bold red]warning: --insecure: the SuperLink runs without TLS and "
                          "accepts any SuperNode (no node authentication). Never deploy "
                          "like this.[/]")
    with RoundProgress(settings.num_server_rounds, f"rehearsing {args.sites} sites",
                       to_stderr=args.json) as bar:
        summary = rehearse(settings, sites=args.sites, on_event=bar.on_event,
                           on_status=bar.status, timeout=args.timeout,
                           secure=not args.insecure)
    code = finish(args, dict(summary), Path(settings.run_dir))
    if not args.json:
        console.print(f"logs:    {summary['deployment']['logs']}")
    for gone in summary["deployment"].get("exits", []):
        err_console.print(f"[yellow]{gone['process']} exited with status {gone['status']} "
                          f"{gone['seconds']:.0f} s into the run; the run went on without "
                          "it[/]")
    return code


