"""Compliance reports of a privacy ledger: table, JSON, CSV and one self-contained HTML file.

Every number is recomputed from the ledger's stored events by an accountant,
after the ledger's hash chain has been verified; a broken ledger gets no report.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedvault import __version__
from privacy.accountants import ACCOUNTANTS
from privacy.analysis import replace_one_epsilon
from privacy.events import ADD_REMOVE_ONE, SubsampledGaussianEvent
from privacy.ledger import LEDGER_KINDS, PrivacyLedger, accountant_of, entry_scope
from protocols.errors import DataError, IntegrityError
from protocols.hashchain import scan_chain, utc_now
from protocols.run_events import ReleaseEvent, RunEvent
from protocols.rundir import check_input_file

FORMATS = ("table", "json", "csv", "html")
REPLACE_ONE = "replace-one"
ADJACENCY_CHOICES = (ADD_REMOVE_ONE, REPLACE_ONE)


#: What other hash-chained logs hold, to say what a wrong file is.
_OTHER_LOGS = {
    "run events": frozenset(RunEvent),
    "model releases": frozenset(ReleaseEvent),
}


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


_RULES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "str": ("a string", lambda v: isinstance(v, str)),
    "int": ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "number": ("a finite number", _number),
    "id": ("a string or an integer",
           lambda v: isinstance(v, str | int) and not isinstance(v, bool)),
    "accountant": (f"one of {', '.join(sorted(ACCOUNTANTS))}",
                   lambda v: isinstance(v, str) and v in ACCOUNTANTS),
}
#: Per kind, the fields a report reads, and what each must be.
_REQUIRED: dict[str, tuple[tuple[str, str], ...]] = {
    "reservation": (("run_id", "id"), ("round", "int"), ("delta", "number"),
                    ("epsilon_after", "number"), ("epsilon_limit", "number"),
                    ("accountant", "accountant")),
    "refusal": (("run_id", "id"), ("round", "int"), ("reason", "str"), ("delta", "number"),
                ("epsilon_limit", "number")),
}
_EVENT_KEYS = ("noise_multiplier", "sample_rate", "steps")


def _events_problem(events: Any) -> str | None:
    if not isinstance(events, list):
        return f"'events' is not a list (found {type(events).__name__})"
    for i, ev in enumerate(events):
        if not isinstance(ev, dict):
            return f"event {i} is not an object (found {type(ev).__name__})"
        missing = [k for k in _EVENT_KEYS if k not in ev]
        if missing:
            return f"event {i} has no {', '.join(repr(k) for k in missing)}"
        try:
            SubsampledGaussianEvent.from_dict(ev)
        except (ValueError, TypeError) as exc:
            return f"event {i}: {exc}"
    return None


def _entry_problem(e: dict[str, Any]) -> str | None:
    kind = e.get("kind")
    if not isinstance(e.get("time"), str):
        return "'time' is missing or not a string"
    if "scope" in e and not isinstance(e["scope"], str):
        return "'scope' is not a string"
    for key, rule in _REQUIRED.get(str(kind), ()):
        what, ok = _RULES[rule]
        if key not in e:
            return f"{key!r} is missing"
        if not ok(e[key]):
            return f"{key!r} must be {what}, not {e[key]!r}"
    if kind == "reservation" or (kind == "repaired" and "events" in e):
        if "events" not in e:
            return "'events' is missing"
        return _events_problem(e["events"])
    return None


def check_ledger_entries(path: Path, entries: list[dict[str, Any]]) -> None:
    """Refuse, with an ``IntegrityError``, what is not a privacy ledger a report can read:
    an empty file, another hash-chained log (a run's events.jsonl), or an entry whose
    fields a report reads are missing or malformed (named by its ``seq``). The chain
    is verified first: these are the entries as written, not a tampered file."""
    if not entries:
        raise IntegrityError(f"{path} is empty: not a privacy ledger.")
    kinds = [e.get("kind") for e in entries]
    if not LEDGER_KINDS.intersection(k for k in kinds if isinstance(k, str)):
        for name, known in _OTHER_LOGS.items():
            if known.intersection(k for k in kinds if isinstance(k, str)):
                raise IntegrityError(f"{path} is not a privacy ledger (its entries are "
                                     f"{name}).")
        found = ", ".join(sorted({repr(k) for k in kinds})[:5])
        raise IntegrityError(f"{path} is not a privacy ledger (no entry is a ledger entry; "
                             f"kinds found: {found}).")
    for e in entries:
        problem = _entry_problem(e)
        if problem:
            raise IntegrityError(f"{path}: malformed ledger entry seq {e.get('seq')} "
                                 f"({e.get('kind')}): {problem}.")


def ledger_report(path: str | Path, *, accountant: str | None = None,
                  adjacency: str = ADD_REMOVE_ONE) -> dict[str, Any]:
    """The report's data: verification, and per budget scope what was spent.

    Every spend is accounted under add/remove-one adjacency (the site releases its
    example count); ``adjacency="replace-one"`` adds, per scope, epsilon under
    replace-one as well (:func:`privacy.analysis.replace_one_epsilon`)."""
    if adjacency not in ADJACENCY_CHOICES:
        raise ValueError(f"adjacency must be one of {ADJACENCY_CHOICES}. Found {adjacency!r}.")
    p = check_input_file(path, what="ledger file")
    try:
        chain, entries = scan_chain(p)  # one pass: verified entries and the report
    except OSError as exc:
        raise DataError(f"cannot read ledger {p}: {exc.strerror or exc}.") from None
    if not chain.ok:
        raise IntegrityError(f"no report for a broken ledger: {chain.describe()} "
                             f"(run `fedvault budget verify {p}`)")
    check_ledger_entries(p, entries)
    acct = accountant or accountant_of(entries)
    led = PrivacyLedger(p, accountant=acct, site_secret=False)
    mechanisms = [
        {"seq": e["seq"], "time": e["time"], "run_id": e["run_id"], "round": e["round"],
         "scope": entry_scope(e), "events": e["events"], "delta": e["delta"],
         "epsilon_after": e["epsilon_after"], "accountant": e["accountant"],
         "insecure": bool(e.get("insecure", False))}
        for e in entries if e.get("kind") == "reservation"
    ]
    refusals = [
        {"seq": e["seq"], "time": e["time"], "run_id": e["run_id"], "round": e["round"],
         "scope": entry_scope(e), "reason": e["reason"]}
        for e in entries if e.get("kind") == "refusal"
    ]
    scopes = [a.to_dict() for a in led.accounts(entries)]
    if adjacency == REPLACE_ONE:
        for d in scopes:
            hist = led.history(d["scope"], entries)
            if d["delta"] is None or not hist:
                d["epsilon_replace_one"] = 0.0 if d["delta"] is not None else None
                continue
            def eps_at(dd: float, h: list[SubsampledGaussianEvent] = hist) -> float:
                return led.accountant.epsilon(h, delta=dd)

            eps, _ = replace_one_epsilon(delta=d["delta"], epsilon_of=eps_at)
            d["epsilon_replace_one"] = round(eps, 6)
    return {
        "format": "fedvault.budget-report/1",
        "ledger": str(p.resolve()),
        "generated": utc_now(),
        "fedvault": __version__,
        "accountant": acct,
        "adjacency": adjacency,
        "verified": {"ok": True, "entries": chain.entries, "last_hash": chain.last_hash},
        "scopes": scopes,
        "mechanisms": mechanisms,
        "refusals": refusals,
    }


def to_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2) + "\n"


CSV_COLUMNS = ("scope", "source", "epsilon_spent", "epsilon_limit", "epsilon_remaining",
               "epsilon_bound", "insecure_rounds", "delta", "accountant", "adjacency", "rounds",
               "refusals", "runs", "datasets", "declared_disjoint", "first_use", "last_use",
               "entries")


def to_csv(report: dict[str, Any]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    cols = CSV_COLUMNS + (("epsilon_replace_one",) if report["adjacency"] == REPLACE_ONE
                          else ())
    w.writerow(cols)
    for d in report["scopes"]:
        w.writerow([";".join(d[c]) if c in ("runs", "datasets") else d[c] for c in cols])
    return buf.getvalue()


def epsilon_plot_png(report: dict[str, Any]) -> bytes:
    """Epsilon after each reserved round, per budget scope, against its limit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.5, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, d in enumerate(report["scopes"]):
        c = "#cf222e" if d["insecure_rounds"] else colors[i % len(colors)]
        ys = [0.0] + [s["epsilon"] for s in d["series"]]
        ax.step(range(len(ys)), ys, where="post", marker="o", color=c,
                label=f"scope {d['scope']}" + (" (INSECURE noise)" if d["insecure_rounds"]
                                               else ""))
        if d["epsilon_limit"] is not None:
            ax.axhline(d["epsilon_limit"], color=c, linestyle="--", linewidth=1,
                       label=f"limit {d['epsilon_limit']:g}")
    ax.set_xlabel("rounds trained (reservations, in ledger order)")
    ax.set_ylabel(f"cumulative epsilon ({report['accountant']})")
    ax.set_ylim(bottom=0)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    ax.set_title("privacy budget spent per budget scope")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _fmt(v: Any, column: str = "") -> str:
    if v is None:
        return "–"
    if column in ("epsilon_limit", "delta"):
        return f"{v:g}"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    if isinstance(v, list):
        return ", ".join(str(x) for x in v)
    return str(v)


def _mechanism(events: list[dict[str, Any]]) -> str:
    return ", ".join(
        "σ={:.4g}, q={:.4g}, steps={}".format(ev["noise_multiplier"], ev["sample_rate"],
                                            ev["steps"]) for ev in events)


def to_html(report: dict[str, Any]) -> str:
    """One self-contained HTML file (inline CSS, the plot as an embedded PNG)."""
    png = base64.b64encode(epsilon_plot_png(report)).decode("ascii")
    e = html.escape
    def spent_cell(d: dict[str, Any]) -> str:
        if d["insecure_rounds"]:
            return (f"<td class=\"insecure\">unbounded: {d['insecure_rounds']} round(s) with "
                    f"seeded (insecure) noise; {_fmt(d['epsilon_spent'])} if it was secret</td>")
        return f"<td>{e(_fmt(d['epsilon_spent']))}</td>"

    replace = report["adjacency"] == REPLACE_ONE
    rows = "".join(
        f"<tr><td><code>{e(d['scope'])}</code>"
        + (" (declared disjoint)" if d["declared_disjoint"] else "") + "</td>"
        + f"<td>{e(_fmt(d['source']))}</td>" + spent_cell(d)
        + ("<td>" + e(_fmt(d.get("epsilon_replace_one"))) + "</td>" if replace else "")
        + "".join(f"<td>{e(_fmt(d[c], c))}</td>" for c in (
            "epsilon_limit", "epsilon_remaining", "delta", "accountant", "rounds",
            "refusals", "runs", "last_use")) + "</tr>"
        for d in report["scopes"])
    mech = "".join(
        f"<tr><td>{m['seq']}</td><td>{e(m['time'])}</td><td>{e(str(m['run_id']))}</td>"
        f"<td>{m['round']}</td><td>{e(m['scope'])}</td>"
        f"<td>{e(_mechanism(m['events']))}"
        + (' <b class="insecure">INSECURE noise</b>' if m["insecure"] else "") + "</td>"
        f"<td>{m['delta']:g}</td><td>{m['epsilon_after']:.4f}</td></tr>"
        for m in report["mechanisms"])
    refs = "".join(
        f"<tr><td>{r['seq']}</td><td>{e(r['time'])}</td><td>{e(str(r['run_id']))}</td>"
        f"<td>{r['round']}</td><td>{e(r['reason'])}</td></tr>" for r in report["refusals"])
    v = report["verified"]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>fedvault privacy budget report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #1b1f24; max-width: 1100px; }}
h1 {{ font-size: 1.5em; }} h2 {{ font-size: 1.15em; margin-top: 1.6em; }}
table {{ border-collapse: collapse; width: 100%; font-size: 0.85em; }}
th, td {{ border: 1px solid #d0d7de; padding: 4px 8px; text-align: left; }}
th {{ background: #f6f8fa; }}
td {{ font-variant-numeric: tabular-nums; word-break: break-all; }}
.ok {{ color: #1a7f37; font-weight: bold; }}
.insecure {{ color: #cf222e; font-weight: bold; }}
.meta {{ color: #57606a; font-size: 0.85em; }}
</style></head><body>
<h1>Privacy budget report</h1>
<p class="meta">Ledger <code>{e(report['ledger'])}</code> · generated {e(report['generated'])}
 · fedvault {e(report['fedvault'])} · accountant <b>{e(report['accountant'])}</b></p>
<p class="ok" id="verified">✔ Hash chain verified: {v['entries']} entries, last hash
<code>{e(v['last_hash'][:16])}…</code></p>
<h2>Per budget scope</h2>
<p class="meta">Every dataset a site trains on draws from its scope's one budget (by default
the scope <code>site</code>: everyone behind the site's data), so re-exporting a table cannot
reset it. Neighbouring relation: <b>add/remove-one</b> (the site releases its example
count){' ; ε under <b>replace-one</b> by group privacy (Dwork &amp; Roth 2014, Thm 2.2)'
if replace else ''}.</p>
<table id="datasets"><thead><tr><th>budget scope</th><th>source</th><th>ε spent</th>
{'<th>ε replace-one</th>' if replace else ''}<th>ε limit</th><th>ε remaining</th><th>δ</th>
<th>accountant</th><th>rounds</th>
<th>refusals</th><th>runs</th><th>last use</th></tr></thead><tbody>{rows}</tbody></table>
<h2>ε over rounds</h2>
<img id="plot" alt="cumulative epsilon per dataset against its limit"
 src="data:image/png;base64,{png}" style="max-width:100%">
<h2>Mechanism of every round (Poisson-subsampled Gaussian, DP-SGD)</h2>
<table id="mechanisms"><thead><tr><th>entry</th><th>time (UTC)</th><th>run</th><th>round</th>
<th>scope</th><th>mechanism</th><th>δ</th><th>ε after</th></tr></thead>
<tbody>{mech}</tbody></table>
<h2>Refused rounds</h2>
<table id="refusals"><thead><tr><th>entry</th><th>time (UTC)</th><th>run</th><th>round</th>
<th>reason</th></tr></thead><tbody>{refs or '<tr><td colspan="5">none</td></tr>'}</tbody>
</table>
<p class="meta">ε is recomputed from the stored events: PRV accountant (Gopi, Lee &amp;
Wutschitz 2021) or RDP (Mironov 2017), as implemented in Opacus; any independent
accountant (e.g. Google's dp_accounting) reproduces it from the mechanism table.</p>
</body></html>
"""
