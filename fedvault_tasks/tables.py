"""Tables of features and labels, and reading and writing them (CSV, Parquet, NPZ): a
base module without torch, since the server (central test split of a run's table),
the sites and the tools all load tables."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from protocols.errors import DataError


@dataclass(frozen=True, slots=True, kw_only=True)
class Table:
    """Features and integer labels of one dataset, as loaded (before preprocessing)."""

    x: np.ndarray  # float32, shape (n, num_features)
    y: np.ndarray  # int64, shape (n,)

    def __post_init__(self) -> None:
        if self.x.ndim != 2:
            raise ValueError(f"Table.x must be 2-D (rows, features). Found shape {self.x.shape}.")
        if self.y.ndim != 1 or len(self.y) != len(self.x):
            raise ValueError(
                f"Table.y must be 1-D with one label per row. Found shape {self.y.shape} "
                f"for {len(self.x)} rows."
            )

    def __len__(self) -> int:
        return len(self.y)

    @property
    def num_features(self) -> int:
        return int(self.x.shape[1])

    def subset(self, indices: np.ndarray) -> Table:
        return Table(x=self.x[indices], y=self.y[indices])


def load_table(path: str | Path, *, label_column: str) -> Table:
    """Load a CSV, Parquet or NPZ file into a :class:`Table`."""
    p = Path(path).expanduser()
    if not str(path):
        raise DataError("data-path is empty: set it in the SuperNode node config.")
    if not p.exists():
        raise DataError(f"data-path {str(p)!r} does not exist.")
    if not p.is_file():
        raise DataError(f"data-path {str(p)!r} is not a file.")
    suffix = p.suffix.lower()
    if suffix == ".csv":
        table = _load_csv(p, label_column)
    elif suffix == ".parquet":
        table = _load_parquet(p, label_column)
    elif suffix == ".npz":
        table = _load_npz(p)
    else:
        raise DataError(
            f"data-path {str(p)!r} has unsupported format {suffix or '(none)'!r}: "
            "use .csv, .parquet or .npz."
        )
    if len(table) == 0:
        raise DataError(f"data-path {str(p)!r} holds no rows.")
    if not np.isfinite(table.x).all():
        raise DataError(f"data-path {str(p)!r} holds NaN or infinite feature values.")
    return table


def _labels(values: list[str] | np.ndarray, p: Path, label_column: str) -> np.ndarray:
    out = np.empty(len(values), dtype=np.int64)
    for i, v in enumerate(values):
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise DataError(
                f"{p}: label column {label_column!r} must hold integers; row {i + 1} has {v!r}."
            ) from None
        if not math.isfinite(f) or f != int(f):
            raise DataError(
                f"{p}: label column {label_column!r} must hold integers; row {i + 1} has {v!r}."
            )
        out[i] = int(f)
    return out


def _load_csv(p: Path, label_column: str) -> Table:
    try:
        with p.open(newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh)
            try:
                header = [h.strip() for h in next(reader)]
            except StopIteration:
                raise DataError(f"{p}: the CSV file is empty (no header row).") from None
            if label_column not in header:
                raise DataError(
                    f"{p}: no label column {label_column!r}; columns are "
                    f"{', '.join(header[:12])}{', ...' if len(header) > 12 else ''} "
                    "(set label-column)."
                )
            li = header.index(label_column)
            rows = [r for r in reader if r]
    except UnicodeDecodeError as exc:
        raise DataError(f"{p}: not a UTF-8 CSV file ({exc.reason}).") from exc
    feature_idx = [i for i in range(len(header)) if i != li]
    if not feature_idx:
        raise DataError(f"{p}: no feature columns besides the label column {label_column!r}.")
    x = np.empty((len(rows), len(feature_idx)), dtype=np.float32)
    for r, row in enumerate(rows):
        if len(row) != len(header):
            raise DataError(
                f"{p}: row {r + 1} has {len(row)} fields; the header has {len(header)}."
            )
        for c, i in enumerate(feature_idx):
            try:
                x[r, c] = float(row[i])
            except ValueError:
                raise DataError(
                    f"{p}: column {header[i]!r}, row {r + 1}: {row[i]!r} is not a number."
                ) from None
    y = _labels([row[li] for row in rows], p, label_column)
    return Table(x=x, y=y)


def _load_parquet(p: Path, label_column: str) -> Table:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise DataError(
            f"{p}: reading Parquet needs pyarrow: pip install 'fedvault[parquet]'."
        ) from exc
    try:
        tbl = pq.read_table(p)
    except Exception as exc:  # pyarrow raises many types for a bad file
        raise DataError(f"{p}: not a readable Parquet file ({exc}).") from exc
    names = list(tbl.column_names)
    if label_column not in names:
        raise DataError(
            f"{p}: no label column {label_column!r}; columns are {', '.join(names[:12])} "
            "(set label-column)."
        )
    feats = [n for n in names if n != label_column]
    try:
        x = np.column_stack([tbl.column(n).to_numpy().astype(np.float32) for n in feats])
    except (ValueError, TypeError) as exc:
        raise DataError(f"{p}: every feature column must be numeric ({exc}).") from exc
    y = _labels(tbl.column(label_column).to_numpy(), p, label_column)
    return Table(x=x, y=y)


def _load_npz(p: Path) -> Table:
    try:
        with np.load(p, allow_pickle=False) as npz:
            if "x" not in npz or "y" not in npz:
                raise DataError(f"{p}: an .npz file needs arrays 'x' and 'y'; found {npz.files}.")
            x = np.asarray(npz["x"], dtype=np.float32)
            y_raw = np.asarray(npz["y"])
    except (OSError, ValueError) as exc:
        raise DataError(f"{p}: not a readable .npz file ({exc}).") from exc
    if x.ndim != 2 or y_raw.ndim != 1 or len(x) != len(y_raw):
        raise DataError(
            f"{p}: 'x' must be (rows, features) and 'y' one label per row; "
            f"found shapes {x.shape} and {y_raw.shape}."
        )
    return Table(x=x, y=_labels(y_raw, p, "y"))


def save_table(table: Table, path: str | Path, *, label_column: str = "label") -> Path:
    """Write ``table`` as CSV or NPZ (by suffix); used to lay out rehearsal sites' data."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.suffix == ".npz":
        np.savez(p, x=table.x, y=table.y)
        return p
    if p.suffix != ".csv":
        raise DataError(f"save_table writes .csv or .npz. Found {p.suffix!r}.")
    with p.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow([f"f{i}" for i in range(table.num_features)] + [label_column])
        for xi, yi in zip(table.x, table.y, strict=True):
            w.writerow([repr(float(v)) for v in xi] + [int(yi)])
    return p
