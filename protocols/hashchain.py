"""A hash-chained, append-only JSON-lines log.

One format serves every tamper-evident record in fedvault: the run's event log,
the sites' privacy ledgers and the release log. Each line is one JSON object::

    {"seq": 0, "time": "2026-11-27T05:30:00.123456Z", "kind": "...", ...,
     "prev_hash": "<64 hex>", "hash": "<64 hex>"}

``hash = SHA-256(canonical JSON of the entry without "hash")`` where canonical
JSON has sorted keys and no insignificant whitespace, and ``prev_hash`` is the
previous entry's ``hash`` (64 zeros for the first). Editing, deleting,
inserting or reordering any entry breaks the chain at that entry, which
:func:`verify_chain` names. (Truncating the *tail* cannot be detected by a
chain alone; a consumer that must detect it anchors the last hash elsewhere,
e.g. the run summary records it.)

Each append is written as one ``write`` of a whole line to a file opened with
``O_APPEND`` and then ``fsync``-ed, so a crash leaves at worst a torn last line,
which :func:`verify_chain` reports and :class:`HashChainLog` refuses to extend
until it is repaired (a ledger must never silently lose an entry).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from protocols.errors import Defect, IntegrityError

GENESIS_HASH = "0" * 64
RESERVED_KEYS = frozenset({"seq", "time", "prev_hash", "hash"})


def canonical_json(obj: Mapping[str, Any]) -> str:
    """Sorted keys, compact separators, UTF-8: the bytes that are hashed."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)


def entry_hash(entry: Mapping[str, Any]) -> str:
    body = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(canonical_json(body).encode("utf-8")).hexdigest()


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True, slots=True, kw_only=True)
class ChainReport:
    """Outcome of :func:`verify_chain`."""

    path: str
    entries: int  # number of entries that verified
    ok: bool
    first_bad_line: int | None = None  # 1-based line number of the first bad entry
    reason: str = ""
    last_hash: str = GENESIS_HASH
    #: ``None`` when intact; ``"torn"`` when the only defect is a last line cut by a
    #: crash while writing it (repairable); ``"tampered"`` for anything else
    defect: Defect | None = None

    def describe(self) -> str:
        if self.ok:
            return f"{self.path}: OK, {self.entries} entries, last hash {self.last_hash[:16]}…"
        return f"{self.path}: BROKEN at line {self.first_bad_line}: {self.reason}"


def _iter_lines(path: Path) -> Iterator[tuple[int, bytes, bool]]:
    """(1-based line number, raw line without newline, ends-with-newline)."""
    with path.open("rb") as fh:
        for i, raw in enumerate(fh, start=1):
            yield i, raw.rstrip(b"\n"), raw.endswith(b"\n")


def verify_chain(path: str | Path) -> ChainReport:
    """Check every entry's hash, its link to the previous one and its sequence number."""
    return _scan(Path(path))[0]


def scan_chain(path: str | Path) -> tuple[ChainReport, list[dict[str, Any]]]:
    """The verification report and the entries that verified, in one pass over the file."""
    return _scan(Path(path))


def _scan(p: Path) -> tuple[ChainReport, list[dict[str, Any]]]:
    """One pass over the file: the verification report and the entries that verified."""
    if not p.exists():
        raise IntegrityError(f"{p}: no such log file.", path=str(p))
    prev = GENESIS_HASH
    count = 0
    entries: list[dict[str, Any]] = []
    for lineno, raw, complete in _iter_lines(p):
        def bad(reason: str, lineno: int = lineno, count: int = count, prev: str = prev,
                defect: Defect = "tampered") -> tuple[ChainReport, list[dict[str, Any]]]:
            return ChainReport(path=str(p), entries=count, ok=False, first_bad_line=lineno,
                               reason=reason, last_hash=prev, defect=defect), entries

        if not complete:
            return bad("torn last line (the process was interrupted while writing it)",
                       defect="torn")
        try:
            entry = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return bad("not valid JSON")
        if not isinstance(entry, dict):
            return bad("not a JSON object")
        if entry.get("seq") != count:
            return bad(f"sequence number {entry.get('seq')!r}, expected {count} "
                       "(an entry was deleted, inserted or reordered)")
        if entry.get("prev_hash") != prev:
            return bad("prev_hash does not match the previous entry's hash "
                       "(an entry was deleted, inserted or reordered)")
        if entry.get("hash") != entry_hash(entry):
            return bad("hash does not match the entry's content (the entry was edited)")
        prev = entry["hash"]
        count += 1
        entries.append(entry)
    return ChainReport(path=str(p), entries=count, ok=True, last_hash=prev), entries


def read_chain(path: str | Path, *, verify: bool = True) -> list[dict[str, Any]]:
    """All entries; with ``verify`` (the default) an ``IntegrityError`` if the chain is broken."""
    p = Path(path)
    if verify:
        report, entries = _scan(p)
        if not report.ok:
            raise IntegrityError(report.describe(), path=str(p), defect=report.defect)
        return entries
    return follow_chain(p, 0)[0]


def follow_chain(path: str | Path, offset: int) -> tuple[list[dict[str, Any]], int]:
    """Entries of the complete lines after byte ``offset`` (not verified), and the offset
    just past them: a reader following a growing log reads each line once."""
    out: list[dict[str, Any]] = []
    with Path(path).open("rb") as fh:
        fh.seek(offset)
        for raw in fh:
            if not raw.endswith(b"\n"):
                break  # a line still being written: read it next time
            offset += len(raw)
            try:
                out.append(json.loads(raw))
            except json.JSONDecodeError:
                continue
    return out, offset


def repair_torn_tail(path: str | Path) -> bytes | None:
    """If the only defect of ``path`` is a torn last line, move that fragment to a
    sidecar file (``<name>.torn-<UTC time>``), truncate it away and return it.

    Returns ``None`` when there is nothing to repair; raises ``IntegrityError`` when
    the chain is broken anywhere else (that is tampering, not a crash, and is never
    repaired automatically).
    """
    p = Path(path)
    report = verify_chain(p)
    if report.ok:
        return None
    if report.defect != "torn":
        raise IntegrityError(f"cannot repair: {report.describe()}", path=str(p),
                             defect=report.defect)
    data = p.read_bytes()
    cut = data.rfind(b"\n") + 1  # keep every complete line
    fragment = data[cut:]
    stamp = utc_now().replace(":", "").replace(".", "")
    side = p.with_name(f"{p.name}.torn-{stamp}")
    side.write_bytes(fragment)
    with p.open("r+b") as fh:
        fh.truncate(cut)
        fh.flush()
        os.fsync(fh.fileno())
    return fragment


class HashChainLog:
    """Appends entries to a hash-chained JSON-lines file, durably (fsync per entry).

    Thread-safe within one process. Opening an existing file verifies it first:
    a broken chain raises ``IntegrityError`` rather than being extended.
    """

    def __init__(self, path: str | Path, *, mode: int = 0o644) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and self.path.stat().st_size > 0:
            report = verify_chain(self.path)
            if not report.ok:
                raise IntegrityError(f"refusing to extend a broken log: {report.describe()}")
            self._seq = report.entries
            self._prev = report.last_hash
        else:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, mode)
            os.close(fd)
            self._seq = 0
            self._prev = GENESIS_HASH

    def append(self, kind: str, **fields: Any) -> dict[str, Any]:
        """Append one entry of ``kind`` with ``fields``; returns the entry as written."""
        clash = RESERVED_KEYS.intersection(fields)
        if clash:
            raise ValueError(f"Fields {sorted(clash)} are set by the log itself.")
        with self._lock:
            entry: dict[str, Any] = {"seq": self._seq, "time": utc_now(), "kind": kind, **fields,
                                     "prev_hash": self._prev}
            entry["hash"] = entry_hash(entry)
            line = (canonical_json(entry) + "\n").encode("utf-8")
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
            try:
                written = os.write(fd, line)
                if written != len(line):
                    raise OSError(f"short write to {self.path}: {written} of {len(line)} bytes")
                os.fsync(fd)
            finally:
                os.close(fd)
            self._seq += 1
            self._prev = entry["hash"]
            return entry
