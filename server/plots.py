"""Figures written into run directories (matplotlib, headless Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def plot_accuracy(summary: dict[str, Any], out: str | Path) -> Path:
    """Accuracy and loss of the global model over rounds."""
    hist = summary.get("history", [])
    rounds = [h["round"] for h in hist]
    acc = [h.get("accuracy") for h in hist]
    loss = [h.get("loss") for h in hist]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6))
    ax1.plot(rounds, acc, marker="o", color="tab:blue")
    ax1.set_xlabel("round")
    ax1.set_ylabel("accuracy")
    ax1.set_ylim(0, 1.02)
    ax1.grid(alpha=0.3)
    ax1.set_title("global model accuracy")
    ax2.plot(rounds, loss, marker="o", color="tab:red")
    ax2.set_xlabel("round")
    ax2.set_ylabel("loss")
    ax2.grid(alpha=0.3)
    ax2.set_title("global model loss")
    source = summary.get("metric_source", "")
    fig.suptitle(
        f"fedvault · task {summary.get('task')} · {summary.get('sites')} sites"
        + (f" · {source} evaluation" if source else "")
    )
    fig.tight_layout()
    p = Path(out)
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p
