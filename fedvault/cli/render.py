"""What the command line prints: the progress bar fed by a run's event log, the run
and scenario tables, the budget table."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table as RichTable

from protocols.config import RunSettings
from protocols.run_events import RunEvent

console = Console()
err_console = Console(stderr=True)
#: above this many sites, privacy is summarised rather than listed site by site
MAX_SITE_ROWS = 30


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
        if kind == RunEvent.RUN_STARTED:
            self.status(f"{e.get('sites')} sites connected, round 1 running")
        elif kind == RunEvent.ROUND_COMPLETED:
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
        elif kind in (RunEvent.UPDATE_REJECTED, RunEvent.SITE_ERROR):
            self.console.print(f"[yellow]round {e.get('round')}: node {e.get('node_id')} "
                          f"{'rejected' if kind == 'update_rejected' else 'failed'}: "
                          f"{e.get('reason')}[/]")
        elif kind == RunEvent.SITE_REFUSED:
            self.console.print(f"[yellow]round {e.get('round')}: {e.get('site') or 'a site'} "
                               f"refused: {e.get('reason')}[/]", soft_wrap=True)
        elif kind == RunEvent.RELEASE_REFUSED:
            self.console.print(f"[yellow]round {e.get('round')}: no aggregate released: "
                               f"{e.get('reason')}[/]", soft_wrap=True)
        elif kind == RunEvent.ROUND_SKIPPED:
            self.console.print(f"[yellow]round {e.get('round')}: skipped: {e.get('reason')}[/]")
        elif kind == RunEvent.AGGREGATE_REFUSED:
            self.console.print(
                f"[yellow]round {e.get('round')}: no aggregate: {e.get('reason')}[/]"
            )


def print_summary(summary: dict[str, Any], run_dir: Path) -> None:
    t = RichTable(title=f"fedvault · {summary.get('mode')} · task {summary.get('task')} · "
                        f"{summary.get('sites')} sites")
    history = summary.get("history", [])
    silent = any(h.get("silent") for h in history)  # sites that never replied
    for col in ("round", "accuracy", "loss", "sites", "refused", "rejected",
                *(["no reply"] if silent else []), "seconds"):
        t.add_column(col, justify="right")
    for h in history:
        t.add_row(
            str(h["round"]),
            "-" if h.get("accuracy") is None else f"{h['accuracy']:.4f}",
            "-" if h.get("loss") is None else f"{h['loss']:.4f}",
            str(h.get("sites_participated", "")),
            str(h.get("refused", 0)),
            str(h.get("rejected", 0) + h.get("errors", 0)),
            *([str(h.get("silent", 0))] if silent else []),
            f"{h.get('seconds', 0):.1f}",
        )
    console.print(t)
    if summary.get("status") not in (None, "completed"):
        console.print(f"[bold red]run {summary.get('status')}: {summary.get('error')}[/]")
    for rb in summary.get("rollbacks", []):
        console.print(f"[yellow]round {rb['round']}: sites refused global model version "
                      f"{rb['refused_version']}; the server rolled back to version "
                      f"{rb['to_version']}[/]")
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


def finish(args: argparse.Namespace, summary: dict[str, Any], run_dir: Path) -> int:
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print_summary(summary, run_dir)
    return 0 if summary.get("status") == "completed" else 1


def warn_insecure(settings: RunSettings) -> None:
    if settings.dp and not settings.secure_mode:
        err_console.print("[bold red]warning: secure mode is off (--insecure-noise): DP "
                          "noise and batch sampling come from seeded PRNGs, not a CSPRNG; "
                          "the ε of this run is unbounded and every ledger says so.[/]")
    elif settings.he and not settings.secure_mode:
        err_console.print("[yellow]warning: secure mode is off (--insecure-noise): HE's "
                          "stochastic rounding is seeded.[/]")


def print_scenario(summary: dict[str, Any], run_dir: Path) -> None:
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
    if sim.get("hostile_replies"):
        h = RichTable(title="hostile replies: what each attack met", box=box.SIMPLE_HEAD)
        for col in ("site", "attack", "rounds", "outcome"):
            h.add_column(col, overflow="fold")
        for row in sim["hostile_replies"]:
            h.add_row(row["site"], row["behaviour"], ",".join(map(str, row["rounds"])),
                      row["outcome"])
        console.print(h)

    console.print(f"rounds:  {run_dir / 'rounds.csv'}")
    for fig in sim.get("figures", []):
        console.print(f"figure:  {run_dir / fig}")


def print_budget_table(data: dict[str, Any]) -> None:
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
