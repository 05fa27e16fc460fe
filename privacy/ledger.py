"""The privacy ledger: a site's tamper-evident record of every privacy spend.

One ledger per site (a file on the data owner's machine, mode 0600), in the
hash-chained JSON-lines format of :mod:`protocols.hashchain`, with the site's
secret beside it (:mod:`privacy.site_secret`: the key of its keyed hashes and the
ledger's anchor).

**What a budget covers.** Spends are composed per *budget scope*, not per file:
by default every dataset a site trains on draws from the one scope ``"site"``
(the people behind the site's data), so re-exporting a table (rows shuffled,
columns moved, a value changed, a row added) cannot reset anyone's protection.
A data owner who knows a dataset is about other people may declare it so
(node config ``budget-scope = "NAME"``); the ledger records that decision
(``scope_declared``) and the dataset then draws from scope ``NAME``.

Entry kinds (besides the chain's ``seq``, ``time``, ``prev_hash``, ``hash``):

``dataset_registered``
    ``scope``, ``dataset`` (the keyed identifier that may leave the site),
    ``fingerprint`` (the raw-data hash: kept in this local file only), ``source``,
    ``rows``, ``note``: the first use of a dataset in a scope.
``scope_declared``
    ``scope``, ``dataset``, ``declared_by``: the data owner's statement that this
    dataset's records are disjoint from every other scope's.
``reservation``
    ``run_id``, ``round``, ``scope``, ``dataset``, ``events`` (the mechanism uses,
    each with its neighbouring relation), ``accountant``, ``delta``,
    ``epsilon_before``, ``epsilon_after``, ``epsilon_limit``, ``insecure``:
    written and fsync-ed *before* the first DP-SGD step. A reservation is a spend:
    if the process dies mid-round it still counts. ``insecure: true`` marks a
    round whose noise and sampling came from a seeded PRNG (``--insecure-noise``):
    whoever knows the seed can remove the noise, so reports show the scope's
    epsilon as unbounded.
``completed``
    ``run_id``, ``round``, ``scope``, ``reservation_seq``, ``steps_taken``.
``refusal``
    ``run_id``, ``round``, ``scope``, ``dataset``, ``reason``, ``epsilon_spent``,
    ``epsilon_requested``, ``epsilon_limit``, ``delta``: a round the site refused,
    whatever the reason (budget, weaker privacy than allowed, DP off).
``repaired``
    a torn last line (a crash *while writing* an entry) was moved aside. A line
    that may be a complete reservation is never dropped: its events are
    recovered and counted here (``events``, ``scope``; ``"*"`` when the scope was
    cut off, which counts against every scope), and if they cannot be recovered
    the ledger refuses to open.
``ledger_started``
    the data owner started a new ledger on purpose (``fedvault budget new-ledger``):
    ``reason``, ``previous_anchor``.

Epsilon is always recomputed from the stored events by an accountant, never
summed from the stored numbers, so any independent accountant can check it.
Check and reserve happen under an exclusive lock on the ledger file itself (its
inode), so two processes at the same site cannot both spend the last of a
budget, even when they reach the ledger through a symlink or a hard link.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from privacy.accountants import Accountant, BudgetCheck, get_accountant
from privacy.events import ADD_REMOVE_ONE, SubsampledGaussianEvent
from privacy.site_secret import SiteSecret, anchor_problem, secret_path_for
from protocols.errors import IntegrityError, PrivacyRefused
from protocols.hashchain import (
    HashChainLog,
    read_chain,
    repair_torn_tail,
    utc_now,
    verify_chain,
)

LEDGER_MODE = 0o600
#: The default budget scope: everything the site trains on.
SITE_SCOPE = "site"
#: The scope of a recovered spend whose scope was cut off: it counts against every scope.
ANY_SCOPE = "*"
#: Entry kinds whose ``events`` are spends.
SPEND_KINDS = frozenset({"reservation", "repaired"})
#: every kind of entry a privacy ledger holds
LEDGER_KINDS = SPEND_KINDS | {"dataset_registered", "scope_declared", "completed", "refusal",
                              "ledger_started"}

_SCOPE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_scope(scope: str) -> str:
    """A budget scope name: letters, digits, ``.``, ``_``, ``-`` (1-64 characters)."""
    if not _SCOPE_RE.match(scope):
        raise ValueError(f"budget scope must be 1-64 letters, digits, '.', '_' or '-'. "
                         f"Found {scope!r}.")
    return scope


def entry_scope(entry: dict[str, Any]) -> str:
    """The scope an entry belongs to; entries written before scopes existed were
    keyed by a data fingerprint and count, conservatively, against the site scope."""
    return str(entry.get("scope", SITE_SCOPE))


@dataclass
class ScopeAccount:
    """What one budget scope has spent, recomputed from the ledger."""

    scope: str
    epsilon_spent: float = 0.0
    epsilon_limit: float | None = None
    delta: float | None = None
    accountant: str = ""
    entries: int = 0
    reservations: int = 0
    refusals: int = 0
    insecure: int = 0
    runs: set[str] = field(default_factory=set)
    datasets: set[str] = field(default_factory=set)
    declared: bool = False
    first_use: str = ""
    last_use: str = ""
    source: str = ""
    adjacency: str = ADD_REMOVE_ONE
    series: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        remaining = (None if self.epsilon_limit is None
                     else max(0.0, self.epsilon_limit - self.epsilon_spent))
        return {
            "scope": self.scope,
            "epsilon_spent": round(self.epsilon_spent, 6),
            "epsilon_limit": self.epsilon_limit,
            "epsilon_remaining": None if remaining is None else round(remaining, 6),
            # a seeded-noise round can be undone by whoever knows the seed
            "epsilon_bound": "unbounded (insecure noise)" if self.insecure else "dp",
            "insecure_rounds": self.insecure,
            "delta": self.delta,
            "accountant": self.accountant,
            "adjacency": self.adjacency,
            "entries": self.entries,
            "rounds": self.reservations,
            "refusals": self.refusals,
            "runs": sorted(self.runs),
            "datasets": sorted(self.datasets),
            "declared_disjoint": self.declared,
            "first_use": self.first_use,
            "last_use": self.last_use,
            "source": self.source,
            "series": self.series,
        }


#: Older name, kept for callers of the per-dataset API.
DatasetAccount = ScopeAccount


def _recover_spend(fragment: bytes) -> dict[str, Any] | None:
    """From a torn last line: ``None`` if it cannot be a spend; else what can be read
    of it (``events`` absent if they were cut off)."""
    spend_like = fragment.startswith(b'{"accountant"') or b'"events":' in fragment
    if not spend_like:
        return None
    out: dict[str, Any] = {}
    m = re.search(rb'"events":(\[[^\]]*\])', fragment)
    if m:
        try:
            events = json.loads(m.group(1))
            out["events"] = [SubsampledGaussianEvent.from_dict(e).to_dict() for e in events]
        except (ValueError, KeyError, TypeError):
            pass
    for key in ("scope", "run_id"):
        km = re.search(rb'"' + key.encode() + rb'":"([^"]*)"', fragment)
        if km:
            out[key] = km.group(1).decode("utf-8", "replace")
    rm = re.search(rb'"round":(\d+)', fragment)
    if rm:
        out["round"] = int(rm.group(1))
    if re.search(rb'"insecure":true', fragment):
        out["insecure"] = True
    return out


class PrivacyLedger:
    """A site's privacy ledger at ``path`` (created with mode 0600).

    ``site_secret`` (the default at sites) keeps the site's secret beside the ledger
    (created at first use) and checks the ledger against its anchor; the server's
    client-level DP ledger and read-only reports pass ``False``.
    """

    def __init__(self, path: str | Path, *, accountant: str = "prv",
                 site_secret: bool = True) -> None:
        self.path = Path(path).expanduser().absolute()
        self.accountant: Accountant = get_accountant(accountant)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.secret: SiteSecret | None = None
        secret_file = secret_path_for(self.path)
        existed = self.path.exists() and self.path.stat().st_size > 0
        if site_secret:
            found = SiteSecret.load(secret_file)
            if found is not None and not existed:
                self._raise_if_unanchored(found)  # a ledger moved away that had entries
            self.secret = found or SiteSecret.load_or_create(secret_file, created=utc_now())
        with self.lock():
            if existed:
                report = verify_chain(self.path)
                if report.defect == "tampered":
                    raise IntegrityError(f"privacy ledger is broken: {report.describe()}",
                                         path=str(self.path), defect="tampered")
                if self.secret is not None:
                    self._raise_if_unanchored(self.secret)
                if not report.ok:
                    self._repair()
            else:
                HashChainLog(self.path, mode=LEDGER_MODE)
            os.chmod(self.path, LEDGER_MODE)

    def _raise_if_unanchored(self, secret: SiteSecret) -> None:
        problem = anchor_problem(self.path, secret)
        if problem:
            raise IntegrityError(problem, path=str(self.path), defect="unanchored")

    def _repair(self) -> None:
        data = self.path.read_bytes()
        fragment = data[data.rfind(b"\n") + 1:]
        spend = _recover_spend(fragment)
        if spend is not None and "events" not in spend:
            raise IntegrityError(
                f"privacy ledger {self.path}: its last line is a cut reservation whose "
                "mechanism cannot be read, so what it spent is unknown; refusing to train "
                "rather than under-count. Restore the ledger from a backup (or the last "
                "line by hand, then run `fedvault budget verify`).")
        repair_torn_tail(self.path)
        if spend is None:
            self._append("repaired", reason="torn last line moved aside (not a spend)",
                         fragment_bytes=len(fragment))
        else:
            self._append("repaired", reason="torn last line was a reservation: its events "
                         "are counted here", fragment_bytes=len(fragment),
                         scope=spend.get("scope", ANY_SCOPE), events=spend["events"],
                         run_id=spend.get("run_id"), round=spend.get("round"),
                         insecure=bool(spend.get("insecure", False)))

    @classmethod
    def start_new(cls, path: str | Path, *, reason: str, accountant: str = "prv"
                  ) -> PrivacyLedger:
        """The data owner's explicit decision to start a new ledger where one is missing
        or cannot be restored: the old file (if any) is kept aside, and the new
        ledger's first entry records the decision and the anchor it replaces."""
        if not reason.strip():
            raise ValueError("starting a new ledger needs a reason.")
        p = Path(path).expanduser().absolute()
        secret = SiteSecret.load(secret_path_for(p))
        previous = dict(secret.anchor) if secret else {}
        if p.exists():
            p.rename(p.with_name(f"{p.name}.replaced-{utc_now().replace(':', '')}"))
        if secret is not None:
            secret.anchor = {}
            secret.save()
        led = cls(p, accountant=accountant)
        with led.lock():
            led._append("ledger_started", reason=reason, previous_anchor=previous)
        return led

    # -- locking and raw access --------------------------------------------------------
    @contextmanager
    def lock(self) -> Iterator[None]:
        """An exclusive lock on the ledger file itself: one inode, whichever name
        (symlink, hard link, relative path) a process reaches it by."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, LEDGER_MODE)
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
        entry = HashChainLog(self.path, mode=LEDGER_MODE).append(kind, **fields)
        if self.secret is not None:
            self.secret.set_anchor(entries=entry["seq"] + 1, last_hash=entry["hash"])
        return entry

    def dataset_id(self, fingerprint: str) -> str:
        """The keyed identifier of a dataset (what may leave the site)."""
        if self.secret is None:
            return fingerprint
        return self.secret.dataset_id(fingerprint)

    # -- questions (no state change) ---------------------------------------------------
    def history(self, scope: str = SITE_SCOPE,
                entries: Sequence[dict[str, Any]] | None = None) -> list[SubsampledGaussianEvent]:
        """Every spend of ``scope`` (and the recovered spends of unknown scope)."""
        out: list[SubsampledGaussianEvent] = []
        for e in entries if entries is not None else self.entries():
            if e.get("kind") in SPEND_KINDS and "events" in e and \
                    entry_scope(e) in (scope, ANY_SCOPE):
                out.extend(SubsampledGaussianEvent.from_dict(ev) for ev in e["events"])
        return out

    def spent(self, scope: str = SITE_SCOPE, *, delta: float) -> float:
        return self.accountant.epsilon(self.history(scope), delta=delta)

    def run_spent(self, scope: str, *, run_id: str, delta: float) -> float:
        """The ε of one run's reservations in ``scope`` alone: what a site tells the
        server (its cumulative ε would tell the server what it spent elsewhere). When
        the scope holds nothing but this run, that is the last reservation's
        ``epsilon_after`` (the same composition), and no accountant runs again."""
        spends = [e for e in self.entries() if e.get("kind") in SPEND_KINDS
                  and entry_scope(e) in (scope, ANY_SCOPE)]
        mine = [e for e in spends if str(e.get("run_id")) == run_id
                and e.get("kind") == "reservation"]
        if not mine:
            return 0.0
        if len(mine) == len(spends) and mine[-1].get("delta") == delta:
            return float(mine[-1]["epsilon_after"])
        events = [SubsampledGaussianEvent.from_dict(ev) for e in mine for ev in e["events"]]
        return self.accountant.epsilon(events, delta=delta)

    def recorded_epsilon(self, scope: str, *, delta: float,
                         entries: Sequence[dict[str, Any]] | None = None) -> float | None:
        """The scope's epsilon as its last reservation recorded it (``epsilon_after``: the
        composition of every spend up to and including it), when that reservation is the
        scope's last spend and was computed by this ledger's accountant at ``delta``;
        otherwise ``None`` (compute it). Each round's check then composes once, not
        twice: the hash chain and the site's anchor vouch for the recorded number."""
        spends = [e for e in (entries if entries is not None else self.entries())
                  if e.get("kind") in SPEND_KINDS and entry_scope(e) in (scope, ANY_SCOPE)]
        if not spends:
            return 0.0
        last = spends[-1]
        if (last.get("kind") == "reservation" and entry_scope(last) == scope
                and last.get("accountant") == self.accountant.name
                and last.get("delta") == delta and isinstance(last.get("epsilon_after"),
                                                              (int, float))):
            return float(last["epsilon_after"])
        return None

    def check(self, scope: str, planned: Sequence[SubsampledGaussianEvent], *,
              delta: float, limit: float) -> BudgetCheck:
        return self.accountant.check(self.history(scope), planned, delta=delta, limit=limit)

    def refused(self, *, run_id: str, server_round: int) -> bool:
        """Did this site refuse round ``server_round`` of run ``run_id``?"""
        return any(e.get("kind") == "refusal" and str(e.get("run_id")) == run_id
                   and e.get("round") == server_round for e in self.entries())

    # -- state changes -------------------------------------------------------------------
    @staticmethod
    def _check_one_scope(entries: Sequence[dict[str, Any]], dataset: str, scope: str) -> None:
        """A dataset draws on one budget scope for good: moving it to another (a new
        ``budget-scope``, or back to ``site``) would start its records from zero."""
        for e in entries:
            if e.get("dataset") == dataset and e.get("kind") in (
                    "dataset_registered", "scope_declared", *SPEND_KINDS) \
                    and entry_scope(e) not in (scope, ANY_SCOPE):
                raise PrivacyRefused(
                    f"this dataset already draws on budget scope {entry_scope(e)!r}; "
                    f"moving it to scope {scope!r} would start its records' budget from "
                    "zero. Set node-config budget-scope back, or declare a new scope only "
                    "for data about other people.")

    def register(self, dataset: str, *, source: str, rows: int, scope: str = SITE_SCOPE,
                 fingerprint: str = "") -> dict[str, Any] | None:
        """Record the first use of a dataset in a scope; says which budget it draws on."""
        check_scope(scope)
        with self.lock():
            entries = self.entries()
            self._check_one_scope(entries, dataset, scope)
            if any(e.get("kind") == "dataset_registered" and e.get("dataset") == dataset
                   and entry_scope(e) == scope for e in entries):
                return None
            others = sorted({str(e.get("dataset")) for e in entries
                             if e.get("kind") == "dataset_registered"
                             and entry_scope(e) == scope} - {dataset})
            note = (f"first dataset of budget scope {scope!r}" if not others else
                    f"another dataset in budget scope {scope!r}: it draws on the same budget "
                    f"as the {len(others)} dataset(s) already there")
            return self._append("dataset_registered", scope=scope, dataset=dataset,
                                fingerprint=fingerprint, source=source, rows=rows, note=note,
                                previous=others)

    def declare_scope(self, scope: str, *, dataset: str, declared_by: str
                      ) -> dict[str, Any] | None:
        """Record the data owner's declaration that ``dataset`` belongs to ``scope``,
        whose records are disjoint from every other scope's (once per pair)."""
        check_scope(scope)
        if scope == SITE_SCOPE:
            return None
        with self.lock():
            entries = self.entries()
            self._check_one_scope(entries, dataset, scope)
            if any(e.get("kind") == "scope_declared" and e.get("scope") == scope
                   and e.get("dataset") == dataset for e in entries):
                return None
            return self._append(
                "scope_declared", scope=scope, dataset=dataset, declared_by=declared_by,
                note=f"the data owner declares that this dataset's records are disjoint "
                     f"from every other budget scope's; it draws on scope {scope!r}")

    def reserve(self, scope: str, planned: Sequence[SubsampledGaussianEvent], *,
                run_id: str, server_round: int, delta: float, limit: float,
                dataset: str = "", insecure: bool = False) -> dict[str, Any]:
        """Check the budget and, if it holds, durably reserve the spend (fsync-ed).

        Raises :class:`PrivacyRefused` (after writing a ``refusal`` entry) if the
        planned events would take the scope past ``limit``.
        """
        with self.lock():
            entries = self.entries()
            chk = self.accountant.check(self.history(scope, entries), planned,
                                        delta=delta, limit=limit,
                                        epsilon_before=self.recorded_epsilon(
                                            scope, delta=delta, entries=entries))
            if chk.exceeds:
                reason = (f"privacy budget: scope {scope!r} has spent epsilon "
                          f"{chk.epsilon_before:.4f}; this round would bring it to "
                          f"{chk.epsilon_after:.4f} > limit {limit:g} (delta {delta:g})")
                self._append("refusal", run_id=run_id, round=server_round, scope=scope,
                             dataset=dataset, reason=reason,
                             epsilon_spent=chk.epsilon_before,
                             epsilon_requested=chk.epsilon_after, epsilon_limit=limit,
                             delta=delta)
                raise PrivacyRefused(reason, scope=scope, dataset=dataset or None,
                                     epsilon_spent=chk.epsilon_before,
                                     epsilon_requested=chk.epsilon_after, limit=limit,
                                     delta=delta)
            return self._append(
                "reservation", run_id=run_id, round=server_round, scope=scope,
                dataset=dataset, events=[e.to_dict() for e in planned],
                accountant=self.accountant.name, delta=delta,
                epsilon_before=chk.epsilon_before, epsilon_after=chk.epsilon_after,
                epsilon_limit=limit, insecure=insecure)

    def refuse(self, scope: str, *, run_id: str, server_round: int, reason: str,
               delta: float, limit: float, dataset: str = "") -> dict[str, Any]:
        """Record a refusal that is not about the budget (e.g. weaker noise than allowed)."""
        with self.lock():
            spent = self.accountant.epsilon(self.history(scope), delta=delta)
            return self._append("refusal", run_id=run_id, round=server_round, scope=scope,
                                dataset=dataset, reason=reason, epsilon_spent=spent,
                                epsilon_requested=None, epsilon_limit=limit, delta=delta)

    def complete(self, reservation: dict[str, Any], *, steps_taken: int) -> dict[str, Any]:
        with self.lock():
            return self._append("completed", run_id=reservation["run_id"],
                                round=reservation["round"], scope=entry_scope(reservation),
                                reservation_seq=reservation["seq"], steps_taken=steps_taken)

    # -- reporting -------------------------------------------------------------------------
    def accounts(self, entries: Sequence[dict[str, Any]] | None = None) -> list[ScopeAccount]:
        """Per budget scope: epsilon spent (recomputed), limit, delta, runs, rounds, series
        (of ``entries`` already read and verified, else of the file)."""
        entries = self.entries() if entries is None else entries
        accts: dict[str, ScopeAccount] = {}
        recovered_any = False
        for e in entries:
            kind = e.get("kind")
            if kind not in ("dataset_registered", "scope_declared", "reservation", "refusal",
                            "completed", "repaired") or (kind == "repaired"
                                                         and "events" not in e):
                continue
            scope = entry_scope(e)
            if scope == ANY_SCOPE:
                recovered_any = True
                continue
            a = accts.setdefault(scope, ScopeAccount(scope=scope, first_use=e["time"]))
            a.entries += 1
            a.last_use = e["time"]
            if e.get("dataset"):
                a.datasets.add(str(e["dataset"]))
            if kind == "dataset_registered":
                a.source = a.source or str(e.get("source", ""))
            elif kind == "scope_declared":
                a.declared = True
            elif kind in SPEND_KINDS:
                a.reservations += 1
                a.runs.add(str(e.get("run_id")))
                a.insecure += bool(e.get("insecure", False))
                if kind == "reservation":
                    a.delta = e["delta"]
                    a.epsilon_limit = e["epsilon_limit"]
                    a.series.append({"seq": e["seq"], "time": e["time"],
                                     "run_id": e["run_id"], "round": e["round"],
                                     "epsilon": e["epsilon_after"]})
            elif kind == "refusal":
                a.refusals += 1
                a.runs.add(str(e["run_id"]))
                a.epsilon_limit = e["epsilon_limit"]
                a.delta = a.delta or e["delta"]
        if recovered_any and not accts:
            accts[SITE_SCOPE] = ScopeAccount(scope=SITE_SCOPE)
        for a in accts.values():
            if a.delta is None and recovered_any:
                a.delta = 1e-5  # recovered spends carry no delta: the sites' default
            if a.delta is not None:
                a.epsilon_spent = self.accountant.epsilon(self.history(a.scope, entries),
                                                          delta=a.delta)
            a.accountant = self.accountant.name  # the one that computed epsilon_spent
        return list(accts.values())


def last_reservation(path: str | Path) -> dict[str, Any] | None:
    """The ledger's latest reservation entry (verified chain), or ``None``."""
    for e in reversed(read_chain(path)):
        if e.get("kind") == "reservation":
            return e
    return None


def accountant_of(entries: Sequence[dict[str, Any]], default: str = "prv") -> str:
    """The accountant named by the latest reservation among ``entries`` (else ``default``)."""
    for e in reversed(entries):
        if e.get("kind") == "reservation":
            return str(e["accountant"])
    return default
