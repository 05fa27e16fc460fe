"""The run directory: one folder per run, in a layout a model registry can index.

::

    RUN_DIR/
      run.json          what was run: run id, mode, task, settings, versions, start time
      events.jsonl      hash-chained event log (protocols.hashchain), one record per
                        protocols.run_events.RunEvent
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
import stat
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, TypeVar, cast

from protocols.errors import ConfigError

T = TypeVar("T")

RUN_JSON = "run.json"
EVENTS = "events.jsonl"
SUMMARY = "summary.json"
ACCURACY_PNG = "accuracy.png"
MODELS = "models"


def fedvault_version() -> str:
    """The installed fedvault's version (its distribution metadata), as ``run.json``
    records it; ``"unknown"`` where the code runs without the distribution installed
    (an app bundle's copy on a machine that never installed fedvault)."""
    try:
        return version("fedvault")
    except PackageNotFoundError:
        return "unknown"


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


def _stat(p: Path) -> os.stat_result | None:
    """``os.stat`` of ``p``, or ``None`` where nothing is there (or a file is in the way)."""
    try:
        return p.stat()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise ConfigError(f"cannot look at {p}: {exc.strerror or exc}") from None


def _nearest_existing(p: Path) -> tuple[Path, os.stat_result]:
    """The deepest of ``p`` and its parents that exists (``/`` at worst)."""
    for q in (p, *p.parents):
        st = _stat(q)
        if st is not None:
            return q, st
    raise ConfigError(f"cannot look at {p}: none of its parents exists.")  # pragma: no cover


def _check_creatable(p: Path, what: str, kind: str) -> None:
    """Where ``p`` does not exist yet: its nearest existing parent must be a directory
    we may create entries in (probed by creating and removing a temporary directory,
    which also catches read-only and pseudo filesystems that permission bits do not)."""
    base, st = _nearest_existing(p)
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{what} {p}: {base} is a file, not a directory, so the {kind} "
                          "cannot be created under it.")
    try:
        probe = tempfile.mkdtemp(prefix=".fedvault-probe-", dir=base)
    except OSError as exc:
        raise ConfigError(f"{what} {p}: cannot create the {kind}: {base} is not writable "
                          f"({exc.strerror or exc}).") from None
    os.rmdir(probe)


def check_output_dir(path: str | Path, *, what: str = "--out") -> Path:
    """Fail fast, before any expensive work, on an output directory that cannot be
    created or written: an existing file, a path under a file, an unwritable place.
    ``what`` names it in the error (the option, or e.g. "run directory")."""
    p = Path(path).absolute()
    st = _stat(p)
    if st is None:
        _check_creatable(p, what, "directory")
    elif not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{what} {p}: is a file, not a directory.")
    else:
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".fedvault-probe-", dir=p))
        except OSError as exc:
            raise ConfigError(f"{what} {p}: cannot write in this directory "
                              f"({exc.strerror or exc}).") from None
    return p


def check_output_file(path: str | Path, *, what: str = "--out") -> Path:
    """Fail fast on an output file that cannot be written: an existing directory, a
    path under a file, an unwritable place (its parents are created on writing)."""
    p = Path(path).absolute()
    st = _stat(p)
    if st is None:
        _check_creatable(p, what, "file")
    elif stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{what} {p}: is a directory, not a file.")
    elif not os.access(p, os.W_OK):
        raise ConfigError(f"{what} {p}: the file is not writable.")
    return p


def check_input_file(path: str | Path, *, what: str = "file") -> Path:
    """An existing regular file to read (a directory is named as such); a missing one
    is left to the reader, whose message says what was expected there."""
    p = Path(path)
    st = _stat(p)
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{p} is a directory, not a {what}.")
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


def load_json_cached(path: str, parse: Callable[[dict[str, Any]], T], *, what: str) -> T:
    """``parse`` of the JSON file at ``path``, cached per process for as long as the
    file is unchanged (size and mtime): the simulated apps read the run's compiled
    scenario on every message. ``ConfigError`` naming ``what`` if it cannot be read."""
    try:
        st = Path(path).stat()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path!r}: {exc}") from exc
    return cast(T, _load_json_cached(path, st.st_mtime_ns, st.st_size, parse, what))


@lru_cache(maxsize=16)
def _load_json_cached(path: str, mtime_ns: int, size: int,
                      parse: Callable[[dict[str, Any]], Any], what: str) -> Any:
    try:
        return parse(json.loads(Path(path).read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"cannot read {what} {path!r}: {exc}") from exc
