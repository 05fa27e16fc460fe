"""The run directory: one folder per run, in a layout a model registry can index.

::

    RUN_DIR/
      run.json          what was run: run id, mode, task, settings, versions, start time
      events.jsonl      hash-chained event log (protocols.hashchain): run_started,
                        round_completed, update_rejected, site_error, run_finished, ...
      models/
        round-0000.pt   global model state dict of each round (0 = initial)
        round-0000.json its metrics and SHA-256
      summary.json      the result: history of rounds, final accuracy, per-site facts
      accuracy.png      accuracy and loss over rounds

Every JSON file is written atomically (temporary file, fsync, rename), so a
reader never sees half a summary.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedvault.errors import ConfigError

RUN_JSON = "run.json"
EVENTS = "events.jsonl"
SUMMARY = "summary.json"
ACCURACY_PNG = "accuracy.png"
MODELS = "models"


def write_json_atomic(path: str | Path, obj: Any, *, mode: int = 0o644) -> Path:
    """Write ``obj`` as pretty JSON via a temporary file + fsync + rename."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, indent=2, sort_keys=False, allow_nan=False)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


def default_run_dir(run_id: int | str, base: str | Path = "runs") -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return Path(base) / f"{stamp}-{run_id}"


@dataclass(frozen=True, slots=True)
class RunDirectory:
    """Paths of one run directory."""

    root: Path

    @property
    def run_json(self) -> Path:
        return self.root / RUN_JSON

    @property
    def events(self) -> Path:
        return self.root / EVENTS

    @property
    def summary(self) -> Path:
        return self.root / SUMMARY

    @property
    def accuracy_png(self) -> Path:
        return self.root / ACCURACY_PNG

    @property
    def models(self) -> Path:
        return self.root / MODELS

    def model_path(self, server_round: int) -> Path:
        return self.models / f"round-{server_round:04d}.pt"

    def create(self) -> RunDirectory:
        try:
            self.models.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create run directory {str(self.root)!r}: {exc}") from exc
        return self

    def read_summary(self) -> dict[str, Any]:
        if not self.summary.exists():
            raise ConfigError(f"{self.root} has no {SUMMARY}: the run did not finish.")
        with self.summary.open(encoding="utf-8") as fh:
            data: dict[str, Any] = json.load(fh)
        return data
