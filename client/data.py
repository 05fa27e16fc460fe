"""Site data: load a data owner's table from disk, fingerprint it, split it.

A data owner points the ClientApp at a local file through the SuperNode's node
config (``data-path``); the file never leaves the site. Supported formats:

* ``.csv``: a header row; one integer label column (``label-column``, default
  the task's); every other column numeric; no missing values.
* ``.parquet``: the same columns (needs ``pyarrow``: ``pip install fedvault[parquet]``).
* ``.npz``: arrays ``x`` (rows x features) and ``y`` (integer labels).

Every failure is a :class:`~protocols.errors.DataError` naming the file and the
problem in one line.
"""

from __future__ import annotations

import hashlib

import numpy as np

from fedvault_tasks.tables import Table, load_table, save_table

#: Fraction of a site's data kept for federated evaluation.
VALIDATION_FRACTION = 0.2


def table_fingerprint(table: Table) -> str:
    """SHA-256 of the data as loaded, invariant to the order of its rows and of its
    feature columns (a re-export that only reorders them is the same dataset). It
    stays on the site: what leaves is a keyed hash of it
    (:meth:`privacy.site_secret.SiteSecret.dataset_id`)."""
    x = np.ascontiguousarray(table.x, dtype=np.float32)
    y = np.ascontiguousarray(table.y, dtype=np.int64)
    # columns in a canonical order: by the hash of each column's sorted values
    col_keys = [hashlib.sha256(np.sort(x[:, j]).tobytes()).digest() for j in range(x.shape[1])]
    x = x[:, sorted(range(x.shape[1]), key=lambda j: col_keys[j])]
    # rows in a canonical order: lexicographic on (label, features)
    keys: list[np.ndarray] = [x[:, j] for j in reversed(range(x.shape[1]))]
    order = np.lexsort([*keys, y])
    h = hashlib.sha256()
    h.update(b"fedvault-table-v2")
    h.update(np.asarray(x.shape, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(x[order]).tobytes())
    h.update(np.ascontiguousarray(y[order]).tobytes())
    return h.hexdigest()


def record_keys(table: Table, key: bytes) -> np.ndarray:
    """A keyed 64-bit hash of every record (features and label), uniform in [0, 1):
    BLAKE2b in keyed mode (RFC 7693), a MAC, so nobody without the site's key can
    predict a record's value."""
    x = np.ascontiguousarray(table.x, dtype=np.float32)
    y = np.ascontiguousarray(table.y, dtype=np.int64)
    out = np.empty(len(table), dtype=np.float64)
    k = key[:64]
    for i in range(len(table)):
        d = hashlib.blake2b(x[i].tobytes() + y[i].tobytes(), key=k, digest_size=8,
                            person=b"fedvault-split").digest()
        out[i] = int.from_bytes(d, "little") / 2.0**64
    return out


def split_site(table: Table, *, key: bytes) -> tuple[Table, Table]:
    """A site's (train, validation) split; validation feeds federated evaluation.

    Each record's side is decided by a keyed hash of that record alone
    (:func:`record_keys` < ``VALIDATION_FRACTION``): adding, removing or changing one
    record moves no other record across the split, and nobody without the site's key
    can tell which side a record is on. A table with no record on one side (only
    possible with a handful of rows) trains, and validates, on all of it.
    """
    to_val = record_keys(table, key) < VALIDATION_FRACTION
    if to_val.all() or not to_val.any():
        return table, table
    return table.subset(np.flatnonzero(~to_val)), table.subset(np.flatnonzero(to_val))


__all__ = ["load_table", "record_keys", "save_table", "split_site", "table_fingerprint"]
