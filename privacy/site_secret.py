"""A site's secret: the key of its keyed hashes, and the anchor of its privacy ledger.

One small JSON file beside the ledger (``<ledger>.secret``, mode 0600), generated
from the OS CSPRNG at first use and never sent anywhere::

    {"version": 1, "key": "<64 hex>", "created": "...",
     "anchor": {"entries": 17, "hash": "<64 hex>"}}

* ``key`` keys every identifier that may leave the site or decides a record's
  fate: dataset identifiers (``HMAC-SHA256(key, "dataset" | fingerprint)``), so
  that nobody without the key can test a guess of the data against them, and
  the per-record train/validation split, so that a record's side depends on that
  record alone and cannot be predicted outside the site.
* ``anchor`` is the ledger's length and last hash after the latest append. A
  hash chain cannot show that its tail was cut, or that the whole file was moved
  away; the anchor can: a ledger shorter than its anchor, or missing while the
  anchor says it had entries, is refused until the data owner restores it or
  starts a new one on the record (``fedvault budget new-ledger``).

The file is rewritten atomically (write to a temporary file, fsync, rename), so a
crash leaves the old or the new anchor, never a torn key. The anchor may lag the
ledger by the last entry (a crash between the two writes); it is a lower bound,
which is all the check needs.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from privacy.pki import write_secret
from protocols.errors import IntegrityError
from protocols.hashchain import follow_chain

SECRET_VERSION = 1


def secret_path_for(ledger_path: str | Path) -> Path:
    """Where the secret of the ledger at ``ledger_path`` lives: beside the ledger's
    real file, so a symlink to the ledger reaches the same secret."""
    real = Path(os.path.realpath(Path(ledger_path).expanduser()))
    return real.with_name(real.name + ".secret")


@dataclass
class SiteSecret:
    """The key and ledger anchor of one site (see the module docstring)."""

    path: Path
    key: bytes
    created: str
    anchor: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> SiteSecret | None:
        """The secret at ``path``, or ``None`` if there is none."""
        p = Path(path)
        if not p.exists():
            return None
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
            key = bytes.fromhex(d["key"])
            if len(key) != 32:
                raise ValueError(f"key of {len(key)} bytes")
            anchor = dict(d.get("anchor") or {})
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise IntegrityError(f"{p}: the site secret is unreadable ({exc}); restore it "
                                 "from a backup.") from exc
        return cls(path=p, key=key, created=str(d.get("created", "")), anchor=anchor)

    @classmethod
    def load_or_create(cls, path: str | Path, *, created: str, key: bytes | None = None
                       ) -> SiteSecret:
        """The secret at ``path``, created if missing: with a key from the OS CSPRNG,
        or ``key`` (simulations that must repeat exactly)."""
        found = cls.load(path)
        if found is not None:
            return found
        s = cls(path=Path(path), key=key or secrets.token_bytes(32), created=created)
        s.save()
        return s

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        body = json.dumps({"version": SECRET_VERSION, "key": self.key.hex(),
                           "created": self.created, "anchor": self.anchor},
                          sort_keys=True).encode("utf-8")
        tmp = write_secret(self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp"), body)
        os.replace(tmp, self.path)  # atomic: the old secret or the new, never a torn one

    def keyed(self, purpose: str, data: bytes | str) -> str:
        """HMAC-SHA256 of ``data`` under the site key, domain-separated by ``purpose``."""
        raw = data.encode("utf-8") if isinstance(data, str) else data
        return hmac.new(self.key, purpose.encode("utf-8") + b"\x00" + raw,
                        hashlib.sha256).hexdigest()

    def dataset_id(self, fingerprint: str) -> str:
        """The identifier of a dataset that may leave the site (32 hex digits)."""
        return self.keyed("dataset", fingerprint)[:32]

    def set_anchor(self, *, entries: int, last_hash: str) -> None:
        if entries < int(self.anchor.get("entries", 0)):
            return  # never move the anchor backwards
        self.anchor = {"entries": entries, "hash": last_hash}
        self.save()


def missing_message(path: Path, secret: SiteSecret, found: int) -> str:
    want = int(secret.anchor.get("entries", 0))
    what = "is missing" if found == 0 else f"has {found} complete entries"
    return (f"privacy ledger {path} {what}, but this site's secret ({secret.path}) "
            f"records {want}: the ledger was moved, replaced or cut short, and training on "
            "it would start the budget from zero. Restore the ledger from a backup, or "
            f"start a new one on the record with `fedvault budget new-ledger {path} "
            "--reason TEXT`.")


def anchor_problem(path: str | Path, secret: SiteSecret | None = None) -> str | None:
    """What is wrong with the ledger at ``path`` against its site secret's anchor
    (``None``: nothing, or no secret to check against)."""
    p = Path(path).expanduser().absolute()
    secret = secret or SiteSecret.load(secret_path_for(p))
    if secret is None:
        return None
    want = int(secret.anchor.get("entries", 0))
    if want == 0:
        return None
    complete = follow_chain(p, 0)[0] if p.exists() else []
    if len(complete) < want:
        return missing_message(p, secret, len(complete))
    if complete[want - 1].get("hash") != secret.anchor.get("hash"):
        return (f"privacy ledger {p}: entry {want - 1} is not the one this site's secret "
                "anchored: the ledger was replaced or rewritten. Restore it from a backup, "
                f"or start a new one with `fedvault budget new-ledger {p} --reason TEXT`.")
    return None
