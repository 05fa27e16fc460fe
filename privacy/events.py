"""Privacy events: immutable values describing one use of a mechanism.

As in Google's dp_accounting (``dp_event.py``: ``PoissonSampledDpEvent`` of a
``GaussianDpEvent``, ``SelfComposedDpEvent``), an event only *describes* what
was done; an accountant (:mod:`privacy.accountants`) turns a history of events
into epsilon. Events are what the privacy ledger stores, so any independent
accountant can recompute every epsilon fedvault prints.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

#: The neighbouring relation every event is accounted under: two datasets are
#: neighbours when one is the other with one record added or removed. (The site's
#: example count is released, so this, not replace-one, is the relation that fits;
#: ``privacy.analysis.replace_one_epsilon`` converts for a report.)
ADD_REMOVE_ONE = "add-remove-one"
ADJACENCIES = (ADD_REMOVE_ONE,)


@dataclass(frozen=True, slots=True, kw_only=True)
class SubsampledGaussianEvent:
    """``steps`` self-compositions of the Poisson-subsampled Gaussian mechanism:
    each step includes every record independently with probability
    ``sample_rate``, clips per-record gradients and adds N(0, (noise_multiplier *
    clip)^2) noise (DP-SGD, Abadi et al. 2016, arXiv:1607.00133).

    ``sample_rate == 1`` is the full-batch Gaussian mechanism (no amplification).
    In dp_accounting terms: ``SelfComposedDpEvent(PoissonSampledDpEvent(
    sample_rate, GaussianDpEvent(noise_multiplier)), steps)``.
    """

    KIND: ClassVar[str] = "poisson_subsampled_gaussian"

    noise_multiplier: float
    sample_rate: float
    steps: int
    adjacency: str = ADD_REMOVE_ONE

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise ValueError(f"noise_multiplier must be > 0. Found {self.noise_multiplier}.")
        if not 0.0 < self.sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1]. Found {self.sample_rate}.")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"steps must be an integer >= 0. Found {self.steps!r}.")
        if self.adjacency not in ADJACENCIES:
            raise ValueError(f"adjacency must be one of {ADJACENCIES}. Found {self.adjacency!r}.")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.KIND, "noise_multiplier": self.noise_multiplier,
                "sample_rate": self.sample_rate, "steps": self.steps,
                "adjacency": self.adjacency}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SubsampledGaussianEvent:
        if d.get("kind") != cls.KIND:
            raise ValueError(f"not a {cls.KIND} event. Found kind {d.get('kind')!r}.")
        return cls(noise_multiplier=float(d["noise_multiplier"]),
                   sample_rate=float(d["sample_rate"]), steps=int(d["steps"]),
                   # entries written before the field existed were add/remove-one too
                   adjacency=str(d.get("adjacency", ADD_REMOVE_ONE)))


def compress(events: Iterable[SubsampledGaussianEvent]) -> list[SubsampledGaussianEvent]:
    """Merge events with equal (noise_multiplier, sample_rate): composition is
    commutative, so the history's epsilon is unchanged and accountants run faster."""
    steps: dict[tuple[float, float], int] = {}
    for e in events:
        key = (e.noise_multiplier, e.sample_rate)
        steps[key] = steps.get(key, 0) + e.steps
    return [SubsampledGaussianEvent(noise_multiplier=s, sample_rate=q, steps=n)
            for (s, q), n in sorted(steps.items()) if n > 0]
