"""Built-in tasks: a task bundles a model factory, a preprocessing step and embedded data.

A task never touches the network: its embedded data ships inside an installed
package (scikit-learn's bundled datasets), so a fresh machine with no internet
can run the demo. A data owner's own data reaches a task as a table (CSV,
Parquet or NPZ; see :mod:`fedvault_tasks.tables`) whose features and labels the task
then preprocesses exactly as it does its embedded data. Also here, since sites,
server and tools share them: a model's parameters as one flat vector
(:func:`flatten`, :func:`unflatten`) and :func:`evaluate`.

Every model is Opacus-compatible (no BatchNorm: GroupNorm or none): Opacus's
``GradSampleModule`` computes its per-example gradients (:mod:`client.dp_sgd`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedvault_tasks.tables import Table
from protocols.errors import TaskError

#: Fraction of the embedded data held out as the central test split.
TEST_FRACTION = 0.2


class DigitsCNN(nn.Module):
    """A small CNN for 8x8 digits (about 4k parameters at width 8; GroupNorm, so
Opacus-compatible). Kept small on purpose: DP-SGD's noise grows with the number
of parameters, and at width 8 the embedded digits reach 0.85 at epsilon 8."""

    def __init__(self, num_classes: int = 10, width: int = 8) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, kernel_size=3, padding=1),
            nn.GroupNorm(4, width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, kernel_size=3, padding=1),
            nn.GroupNorm(4, 2 * width),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Linear(2 * width * 4 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(-1, 1, 8, 8)
        return self.head(torch.flatten(self.features(x), 1))


class TabularMLP(nn.Module):
    """A two-hidden-layer MLP for tabular data (Opacus-compatible: Linear + ReLU only)."""

    def __init__(self, num_features: int, num_classes: int, hidden: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(num_features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _load_digits() -> Table:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return Table(x=bunch.data.astype(np.float32), y=bunch.target.astype(np.int64))


def _load_breast_cancer() -> Table:
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer()
    return Table(x=bunch.data.astype(np.float32), y=bunch.target.astype(np.int64))


def _scale_digits(x: np.ndarray) -> np.ndarray:
    # Pixel intensities of sklearn's digits are 0..16: a fixed scale, no statistics.
    return np.clip(x, 0.0, 16.0).astype(np.float32) / 16.0


@dataclass(frozen=True, slots=True, kw_only=True)
class FeatureBounds:
    """Per-feature ``[low, high]`` that a data owner *declares* (node config
    ``feature-bounds``) or a task documents: preprocessing clips to them and maps them
    to [-1, 1]. Never computed from the table being trained on: statistics of the raw
    table would let one record move every other record's features, outside the
    DP-SGD mechanism's sensitivity (one record moves only its own clipped gradient)."""

    low: np.ndarray  # float32, shape (num_features,)
    high: np.ndarray

    def __post_init__(self) -> None:
        lo, hi = np.asarray(self.low, dtype=np.float64), np.asarray(self.high, dtype=np.float64)
        if lo.ndim != 1 or lo.shape != hi.shape or len(lo) == 0:
            raise ValueError(f"feature bounds need one low and one high per feature. Found "
                             f"shapes {lo.shape} and {hi.shape}.")
        if not (np.isfinite(lo).all() and np.isfinite(hi).all()) or (hi <= lo).any():
            bad = int(np.flatnonzero(~(hi > lo))[0]) if (hi <= lo).any() else -1
            raise ValueError(f"feature bounds must be finite with low < high. Found feature "
                             f"{bad}: [{lo[bad] if bad >= 0 else '?'}, "
                             f"{hi[bad] if bad >= 0 else '?'}].")

    @classmethod
    def uniform(cls, low: float, high: float, num_features: int) -> FeatureBounds:
        return cls(low=np.full(num_features, low, dtype=np.float32),
                   high=np.full(num_features, high, dtype=np.float32))

    def __len__(self) -> int:
        return len(self.low)

    def scale(self, x: np.ndarray) -> np.ndarray:
        """Clip each feature to its bounds and map [low, high] to [-1, 1]: a function of
        each value alone."""
        if x.shape[1] != len(self):
            raise TaskError(f"feature bounds are declared for {len(self)} features. "
                            f"Found {x.shape[1]}.")
        lo = self.low.astype(np.float64)
        hi = self.high.astype(np.float64)
        z = (np.clip(x.astype(np.float64), lo, hi) - lo) / (hi - lo)
        return (2.0 * z - 1.0).astype(np.float32)


#: The ranges that the breast cancer dataset's documentation publishes for each of its
#: 30 features (scikit-learn's ``load_breast_cancer().DESCR``, from the UCI WDBC
#: description), widened to the values it actually contains: declared bounds, not
#: statistics a site computes from its own rows.
_BREAST_CANCER_LOW = (6.981, 9.71, 43.79, 143.5, 0.05, 0.019, 0.0, 0.0, 0.106, 0.0499,
                      0.111, 0.36, 0.757, 6.802, 0.0017, 0.0022, 0.0, 0.0, 0.0078, 0.0008,
                      7.93, 12.02, 50.41, 185.2, 0.071, 0.027, 0.0, 0.0, 0.156, 0.055)
_BREAST_CANCER_HIGH = (28.11, 39.28, 188.5, 2501.0, 0.164, 0.346, 0.427, 0.202, 0.304,
                       0.098, 2.873, 4.885, 21.98, 542.2, 0.032, 0.136, 0.396, 0.053, 0.079,
                       0.03, 36.04, 49.54, 251.2, 4254.0, 0.223, 1.058, 1.252, 0.291,
                       0.664, 0.208)


@dataclass(frozen=True, slots=True, kw_only=True)
class Task:
    """A model factory, a preprocessing step and the embedded default data."""

    name: str
    description: str
    default_label_column: str
    default_num_features: int
    default_num_classes: int
    model_factory: Callable[[int, int], nn.Module]
    embedded_loader: Callable[[], Table]
    embedded_name: str
    #: fixed scaling of the task's inputs (digits: pixel intensities); ``None``: scale
    #: with declared :class:`FeatureBounds`
    fixed_scale: Callable[[np.ndarray], np.ndarray] | None = None
    #: the bounds the embedded data's documentation declares
    embedded_bounds: FeatureBounds | None = None

    def preprocess(self, x: np.ndarray, bounds: FeatureBounds | None = None) -> np.ndarray:
        """The model's input: a function of each record alone (never of table statistics)."""
        if self.fixed_scale is not None:
            return self.fixed_scale(x)
        b = bounds or self.embedded_bounds
        if b is None or len(b) != x.shape[1]:
            raise TaskError(
                f"task {self.name!r} scales features to bounds the data owner declares; "
                f"none are declared for these {x.shape[1]} features. Set node-config "
                "feature-bounds (\"LOW:HIGH\" for every feature, or a JSON file with "
                "\"low\" and \"high\" lists).")
        return b.scale(x)

    def build_model(self, *, num_features: int = 0, num_classes: int = 0) -> nn.Module:
        """A freshly initialised model (seed torch before calling for determinism)."""
        nf = num_features or self.default_num_features
        nc = num_classes or self.default_num_classes
        if nf < 1 or nc < 2:
            raise TaskError(
                f"Task {self.name!r} needs num-features >= 1 and num-classes >= 2. "
                f"Found num-features={nf}, num-classes={nc}."
            )
        return self.model_factory(nf, nc)

    def embedded(self) -> Table:
        """The whole embedded dataset, as loaded (not preprocessed)."""
        return self.embedded_loader()

    def check_table(self, table: Table, *, num_features: int = 0, num_classes: int = 0) -> None:
        """Raise ``TaskError`` if ``table`` does not fit this task's model."""
        nf = num_features or self.default_num_features
        nc = num_classes or self.default_num_classes
        if table.num_features != nf:
            raise TaskError(
                f"Task {self.name!r} expects {nf} feature columns. "
                f"Found {table.num_features}; set num-features to match the data."
            )
        if len(table) and (table.y.min() < 0 or table.y.max() >= nc):
            raise TaskError(
                f"Task {self.name!r} expects integer labels in [0, {nc - 1}]. "
                f"Found labels from {table.y.min()} to {table.y.max()}; set num-classes to match."
            )


def _digits_model(num_features: int, num_classes: int) -> nn.Module:
    if num_features != 64:
        raise TaskError(
            f"Task 'digits' takes 8x8 images (64 features). Found num-features={num_features}."
        )
    return DigitsCNN(num_classes)


TASKS: dict[str, Task] = {
    "digits": Task(
        name="digits",
        description="8x8 handwritten digits (scikit-learn's bundled data), 10 classes, small CNN",
        default_label_column="label",
        default_num_features=64,
        default_num_classes=10,
        model_factory=_digits_model,
        fixed_scale=_scale_digits,
        embedded_loader=_load_digits,
        embedded_name="sklearn.datasets.load_digits",
    ),
    "tabular": Task(
        name="tabular",
        description=(
            "any CSV/Parquet table with an integer label column, MLP; "
            "embedded demo: breast cancer (30 features, 2 classes)"
        ),
        default_label_column="label",
        default_num_features=30,
        default_num_classes=2,
        model_factory=lambda nf, nc: TabularMLP(nf, nc),
        embedded_bounds=FeatureBounds(low=np.array(_BREAST_CANCER_LOW, dtype=np.float32),
                                      high=np.array(_BREAST_CANCER_HIGH, dtype=np.float32)),
        embedded_loader=_load_breast_cancer,
        embedded_name="sklearn.datasets.load_breast_cancer",
    ),
}


def get_task(name: str) -> Task:
    """The built-in task called ``name``; ``TaskError`` naming the known ones otherwise."""
    try:
        return TASKS[name]
    except KeyError:
        known = ", ".join(sorted(TASKS))
        raise TaskError(f"Unknown task {name!r}. Known tasks: {known}.") from None


def split_train_test(table: Table, *, test_fraction: float, seed: int) -> tuple[Table, Table]:
    """Stratified, seeded split into (train, test)."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1). Found {test_fraction}.")
    rng = np.random.default_rng(seed)
    train_idx: list[np.ndarray] = []
    test_idx: list[np.ndarray] = []
    for label in np.unique(table.y):
        idx = np.flatnonzero(table.y == label)
        rng.shuffle(idx)
        n_test = round(len(idx) * test_fraction)
        if len(idx) > 1:
            n_test = min(max(n_test, 1), len(idx) - 1)
        else:
            n_test = 0
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    tr = np.sort(np.concatenate(train_idx))
    te = np.sort(np.concatenate(test_idx))
    return table.subset(tr), table.subset(te)


def embedded_split(task: Task, *, seed: int) -> tuple[Table, Table]:
    """The task's embedded data as (federated pool, central test split).

    The test split is held out before partitioning, so the server's central
    evaluation never sees a record any site trains on.
    """
    return split_train_test(task.embedded(), test_fraction=TEST_FRACTION, seed=seed)


# -- parameters as one vector, and evaluation (shared by sites, server and tools) --
def flatten(state: Mapping[str, torch.Tensor]) -> np.ndarray:
    return np.concatenate([t.detach().cpu().numpy().astype(np.float64).ravel()
                           for t in state.values()])


def unflatten(flat: np.ndarray, template: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, i = {}, 0
    for k, t in template.items():
        n = t.numel()
        out[k] = torch.from_numpy(flat[i:i + n].reshape(tuple(t.shape))).to(t.dtype)
        i += n
    if i != len(flat):
        raise TaskError(f"the decrypted model has {len(flat)} values; the task's has {i}.")
    return out


def to_loader(table: Table, *, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    ds = TensorDataset(torch.from_numpy(np.ascontiguousarray(table.x)),
                       torch.from_numpy(np.ascontiguousarray(table.y)))
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=gen)


@torch.no_grad()
def evaluate(model: nn.Module, table: Table, *, batch_size: int = 256) -> tuple[float, float]:
    """(mean cross-entropy loss, accuracy) of ``model`` on ``table``."""
    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    total, correct = 0.0, 0
    for xb, yb in to_loader(table, batch_size=batch_size, shuffle=False, seed=0):
        out = model(xb)
        total += float(loss_fn(out, yb).item())
        correct += int((out.argmax(dim=1) == yb).sum().item())
    n = max(len(table), 1)
    return total / n, correct / n
