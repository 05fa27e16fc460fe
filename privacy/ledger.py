"""The privacy ledger: a site's tamper-evident record of every privacy spend.

One ledger per site (a file on the data owner's machine, mode 0600), in the
hash-chained JSON-lines format of :mod:`protocols.hashchain`. Entries are keyed
by *dataset fingerprint* (a hash of the data as loaded), so the same data under
another path shares one budget and changed data is a new dataset.

Entry kinds (besides the chain's ``seq``, ``time``, ``prev_hash``, ``hash``):

``dataset_registered``
    ``fingerprint``, ``source``, ``rows``, ``note``: the first use of a dataset.
``reservation``
    ``run_id``, ``round``, ``fingerprint``, ``events`` (the mechanism uses),
    ``accountant``, ``delta``, ``epsilon_before``, ``epsilon_after``,
    ``epsilon_limit``: written and fsync-ed *before* the first DP-SGD step.
    A reservation is a spend: if the process dies mid-round it still counts.
``completed``
    ``run_id``, ``round``, ``fingerprint``, ``reservation_seq``, ``steps_taken``.
``refusal``
    ``run_id``, ``round``, ``fingerprint``, ``reason``, ``epsilon_spent``,
    ``epsilon_requested``, ``epsilon_limit``, ``delta``: a round the site refused.
``repaired``
    a torn last line (a crash *while writing* an entry) was moved aside. Safe:
    training starts only after the reservation's write and fsync returned, so a
    torn reservation never preceded any training step.

Epsilon is always recomputed from the stored events by an accountant, never
summed from the stored numbers, so any independent accountant can check it.
Check and reserve happen under an exclusive file lock, so two processes at the
same site cannot both spend the last of a budget.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedvault.errors import IntegrityError, PrivacyRefused
from privacy.accountants import Accountant, BudgetCheck, get_accountant
from privacy.events import SubsampledGaussianEvent
from protocols.hashchain import HashChainLog, read_chain, repair_torn_tail, verify_chain

LEDGER_MODE = 0o600


@dataclass
class DatasetAccount:
    """What one dataset has spent, recomputed from the ledger."""

    fingerprint: str
    epsilon_spent: float = 0.0
    epsilon_limit: float | None = None
    delta: float | None = None
    accountant: str = ""
    entries: int = 0
    reservations: int = 0
    refusals: int = 0
    runs: set[str] = field(default_factory=set)
    first_use: str = ""
    last_use: str = ""
    source: str = ""
    series: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        remaining = (None if self.epsilon_limit is None
                     else max(0.0, self.epsilon_limit - self.epsilon_spent))
        return {
            "fingerprint": self.fingerprint,
            "epsilon_spent": round(self.epsilon_spent, 6),
            "epsilon_limit": self.epsilon_limit,
            "epsilon_remaining": None if remaining is None else round(remaining, 6),
            "delta": self.delta,
            "accountant": self.accountant,
            "entries": self.entries,
            "rounds": self.reservations,
            "refusals": self.refusals,
            "runs": sorted(self.runs),
            "first_use": self.first_use,
            "last_use": self.last_use,
            "source": self.source,
            "series": self.series,
        }


class PrivacyLedger:
    """A site's privacy ledger at ``path`` (created with mode 0600)."""

    def __init__(self, path: str | Path, *, accountant: str = "prv") -> None:
        self.path = Path(path).expanduser()
        self.accountant: Accountant = get_accountant(accountant)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.lock():
            if self.path.exists() and self.path.stat().st_size > 0:
                report = verify_chain(self.path)
                if not report.ok:
                    if "torn last line" not in report.reason:
                        raise IntegrityError(f"privacy ledger is broken: {report.describe()}")
                    fragment = repair_torn_tail(self.path)
                    HashChainLog(self.path, mode=LEDGER_MODE).append(
                        "repaired", reason="torn last line moved aside",
                        fragment_bytes=len(fragment or b""))
            else:
                HashChainLog(self.path, mode=LEDGER_MODE)
            os.chmod(self.path, LEDGER_MODE)

    # -- locking and raw access --------------------------------------------------------
    @contextmanager
    def lock(self) -> Iterator[None]:
        lock_path = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, LEDGER_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def entries(self) -> list[dict[str, Any]]:
        return read_chain(self.path)

    def _append(self, kind: str, **fields: Any) -> dict[str, Any]:
        # Re-open under the caller's lock: verifies the chain and picks up entries
        # other processes appended since.
        return HashChainLog(self.path, mode=LEDGER_MODE).append(kind, **fields)

    # -- questions (no state change) ---------------------------------------------------
    def history(self, fingerprint: str,
                entries: Sequence[dict[str, Any]] | None = None) -> list[SubsampledGaussianEvent]:
        out: list[SubsampledGaussianEvent] = []
        for e in entries if entries is not None else self.entries():
            if e.get("kind") == "reservation" and e.get("fingerprint") == fingerprint:
                out.extend(SubsampledGaussianEvent.from_dict(ev) for ev in e["events"])
        return out

    def spent(self, fingerprint: str, *, delta: float) -> float:
        return self.accountant.epsilon(self.history(fingerprint), delta=delta)

    def check(self, fingerprint: str, planned: Sequence[SubsampledGaussianEvent], *,
              delta: float, limit: float) -> BudgetCheck:
        return self.accountant.check(self.history(fingerprint), planned, delta=delta,
                                     limit=limit)

    # -- state changes -------------------------------------------------------------------
    def register(self, fingerprint: str, *, source: str, rows: int) -> dict[str, Any] | None:
        """Record the first use of a dataset; names the datasets it differs from."""
        with self.lock():
            entries = self.entries()
            if any(e.get("fingerprint") == fingerprint for e in entries):
                return None
            others = sorted({e["fingerprint"] for e in entries
                             if e.get("kind") == "dataset_registered"})
            note = ("first dataset of this ledger" if not others else
                    f"new dataset: its data differ from the {len(others)} dataset(s) already "
                    "in this ledger; its budget starts from zero")
            return self._append("dataset_registered", fingerprint=fingerprint, source=source,
                                rows=rows, note=note, previous=others)

    def reserve(self, fingerprint: str, planned: Sequence[SubsampledGaussianEvent], *,
                run_id: str, server_round: int, delta: float, limit: float
                ) -> dict[str, Any]:
        """Check the budget and, if it holds, durably reserve the spend (fsync-ed).

        Raises :class:`PrivacyRefused` (after writing a ``refusal`` entry) if the
        planned events would take the dataset past ``limit``.
        """
        with self.lock():
            entries = self.entries()
            chk = self.accountant.check(self.history(fingerprint, entries), planned,
                                        delta=delta, limit=limit)
            if chk.exceeds:
                reason = (f"privacy budget: dataset {fingerprint[:12]} has spent "
                          f"epsilon {chk.epsilon_before:.4f}; this round would bring it to "
                          f"{chk.epsilon_after:.4f} > limit {limit:g} (delta {delta:g})")
                self._append("refusal", run_id=run_id, round=server_round,
                             fingerprint=fingerprint, reason=reason,
                             epsilon_spent=chk.epsilon_before,
                             epsilon_requested=chk.epsilon_after, epsilon_limit=limit,
                             delta=delta)
                raise PrivacyRefused(reason)
            return self._append(
                "reservation", run_id=run_id, round=server_round, fingerprint=fingerprint,
                events=[e.to_dict() for e in planned], accountant=self.accountant.name,
                delta=delta, epsilon_before=chk.epsilon_before,
                epsilon_after=chk.epsilon_after, epsilon_limit=limit)

    def refuse(self, fingerprint: str, *, run_id: str, server_round: int, reason: str,
               delta: float, limit: float) -> dict[str, Any]:
        """Record a refusal that is not about the budget (e.g. weaker noise than allowed)."""
        with self.lock():
            spent = self.spent(fingerprint, delta=delta)
            return self._append("refusal", run_id=run_id, round=server_round,
                                fingerprint=fingerprint, reason=reason, epsilon_spent=spent,
                                epsilon_requested=None, epsilon_limit=limit, delta=delta)

    def complete(self, reservation: dict[str, Any], *, steps_taken: int) -> dict[str, Any]:
        with self.lock():
            return self._append("completed", run_id=reservation["run_id"],
                                round=reservation["round"],
                                fingerprint=reservation["fingerprint"],
                                reservation_seq=reservation["seq"], steps_taken=steps_taken)

    # -- reporting -------------------------------------------------------------------------
    def accounts(self) -> list[DatasetAccount]:
        """Per dataset: epsilon spent (recomputed), limit, delta, runs, rounds, series."""
        entries = self.entries()
        accts: dict[str, DatasetAccount] = {}
        for e in entries:
            fp = e.get("fingerprint")
            if not fp:
                continue
            a = accts.setdefault(fp, DatasetAccount(fingerprint=fp, first_use=e["time"]))
            a.entries += 1
            a.last_use = e["time"]
            if e["kind"] == "dataset_registered":
                a.source = e.get("source", "")
            elif e["kind"] == "reservation":
                a.reservations += 1
                a.runs.add(str(e["run_id"]))
                a.delta = e["delta"]
                a.epsilon_limit = e["epsilon_limit"]
                a.series.append({"seq": e["seq"], "time": e["time"], "run_id": e["run_id"],
                                 "round": e["round"], "epsilon": e["epsilon_after"]})
            elif e["kind"] == "refusal":
                a.refusals += 1
                a.runs.add(str(e["run_id"]))
                a.epsilon_limit = e["epsilon_limit"]
                a.delta = a.delta or e["delta"]
        for a in accts.values():
            if a.delta is not None:
                a.epsilon_spent = self.accountant.epsilon(self.history(a.fingerprint, entries),
                                                          delta=a.delta)
            a.accountant = self.accountant.name  # the one that computed epsilon_spent
        return list(accts.values())


def last_reservation(path: str | Path) -> dict[str, Any] | None:
    """The ledger's latest reservation entry (verified chain), or ``None``."""
    for e in reversed(read_chain(path)):
        if e.get("kind") == "reservation":
            return e
    return None


def recorded_accountant(path: str | Path, default: str = "prv") -> str:
    """The accountant named by the ledger's latest reservation (else ``default``)."""
    e = last_reservation(path)
    return default if e is None else str(e["accountant"])
