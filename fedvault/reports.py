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
from pathlib import Path
from typing import Any

from fedvault import __version__
from fedvault.errors import IntegrityError
from privacy.ledger import PrivacyLedger, recorded_accountant
from protocols.hashchain import utc_now, verify_chain

FORMATS = ("table", "json", "csv", "html")


def ledger_report(path: str | Path, *, accountant: str | None = None) -> dict[str, Any]:
    """The report's data: verification, and per dataset what was spent."""
    p = Path(path)
    chain = verify_chain(p)
    if not chain.ok:
        raise IntegrityError(f"no report for a broken ledger: {chain.describe()} "
                             f"(run `fedvault budget verify {p}`)")
    acct = accountant or recorded_accountant(p)
    led = PrivacyLedger(p, accountant=acct)
    entries = led.entries()
    mechanisms = [
        {"seq": e["seq"], "time": e["time"], "run_id": e["run_id"], "round": e["round"],
         "fingerprint": e["fingerprint"], "events": e["events"], "delta": e["delta"],
         "epsilon_after": e["epsilon_after"], "accountant": e["accountant"]}
        for e in entries if e.get("kind") == "reservation"
    ]
    refusals = [
        {"seq": e["seq"], "time": e["time"], "run_id": e["run_id"], "round": e["round"],
         "fingerprint": e["fingerprint"], "reason": e["reason"]}
        for e in entries if e.get("kind") == "refusal"
    ]
    return {
        "format": "fedvault.budget-report/1",
        "ledger": str(p.resolve()),
        "generated": utc_now(),
        "fedvault": __version__,
        "accountant": acct,
        "verified": {"ok": True, "entries": chain.entries, "last_hash": chain.last_hash},
        "datasets": [a.to_dict() for a in led.accounts()],
        "mechanisms": mechanisms,
        "refusals": refusals,
    }


def to_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2) + "\n"


CSV_COLUMNS = ("fingerprint", "source", "epsilon_spent", "epsilon_limit", "epsilon_remaining",
               "delta", "accountant", "rounds", "refusals", "runs", "first_use", "last_use",
               "entries")


def to_csv(report: dict[str, Any]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(CSV_COLUMNS)
    for d in report["datasets"]:
        w.writerow([";".join(d[c]) if c == "runs" else d[c] for c in CSV_COLUMNS])
    return buf.getvalue()


def epsilon_plot_png(report: dict[str, Any]) -> bytes:
    """Epsilon after each reserved round, per dataset, against its limit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.5, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, d in enumerate(report["datasets"]):
        c = colors[i % len(colors)]
        ys = [0.0] + [s["epsilon"] for s in d["series"]]
        ax.step(range(len(ys)), ys, where="post", marker="o", color=c,
                label=f"dataset {d['fingerprint'][:12]}")
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
    ax.set_title("privacy budget spent per dataset")
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
    rows = "".join(
        f"<tr><td title=\"{e(d['fingerprint'])}\"><code>{e(d['fingerprint'][:16])}…</code></td>"
        + "".join(f"<td>{e(_fmt(d[c], c))}</td>" for c in (
            "source", "epsilon_spent", "epsilon_limit", "epsilon_remaining",
            "delta", "accountant", "rounds", "refusals", "runs", "last_use")) + "</tr>"
        for d in report["datasets"])
    mech = "".join(
        f"<tr><td>{m['seq']}</td><td>{e(m['time'])}</td><td>{e(str(m['run_id']))}</td>"
        f"<td>{m['round']}</td><td>{e(m['fingerprint'][:12])}</td>"
        f"<td>{e(_mechanism(m['events']))}</td>"
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
.meta {{ color: #57606a; font-size: 0.85em; }}
</style></head><body>
<h1>Privacy budget report</h1>
<p class="meta">Ledger <code>{e(report['ledger'])}</code> · generated {e(report['generated'])}
 · fedvault {e(report['fedvault'])} · accountant <b>{e(report['accountant'])}</b></p>
<p class="ok" id="verified">✔ Hash chain verified: {v['entries']} entries, last hash
<code>{e(v['last_hash'][:16])}…</code></p>
<h2>Per dataset</h2>
<table id="datasets"><thead><tr><th>dataset fingerprint</th><th>source</th><th>ε spent</th>
<th>ε limit</th><th>ε remaining</th><th>δ</th><th>accountant</th><th>rounds</th>
<th>refusals</th><th>runs</th><th>last use</th></tr></thead><tbody>{rows}</tbody></table>
<h2>ε over rounds</h2>
<img id="plot" alt="cumulative epsilon per dataset against its limit"
 src="data:image/png;base64,{png}" style="max-width:100%">
<h2>Mechanism of every round (Poisson-subsampled Gaussian, DP-SGD)</h2>
<table id="mechanisms"><thead><tr><th>entry</th><th>time (UTC)</th><th>run</th><th>round</th>
<th>dataset</th><th>mechanism</th><th>δ</th><th>ε after</th></tr></thead>
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
