"""Accountants: turn a history of privacy events into epsilon at a given delta.

Two are offered, and every ledger entry records which one was used:

* ``prv`` (default): the privacy random variable accountant (Gopi, Lee &
  Wutschitz 2021, "Numerical Composition of Differential Privacy",
  arXiv:2106.02848), Opacus's ``PRVAccountant``. Tight: it agrees with Google's
  PLD accountant to well under 1% and returns the *upper* end of its error
  interval, so it never under-states epsilon.
* ``rdp``: Rényi DP of the subsampled Gaussian (Mironov 2017, arXiv:1702.07476;
  Mironov, Talwar & Zhang 2019, arXiv:1908.10530), Opacus's ``RDPAccountant``.
  Looser (typically 5-15% higher epsilon) but classic and fast.

As in dp_accounting's ``PrivacyAccountant``, an accountant can answer "would
this exceed the budget?" without changing any state.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from opacus.accountants import PRVAccountant as _OpacusPRV
from opacus.accountants import RDPAccountant as _OpacusRDP

from privacy.analysis import calibrate_noise_multiplier
from privacy.events import SubsampledGaussianEvent, compress


@dataclass(frozen=True, slots=True, kw_only=True)
class BudgetCheck:
    """Answer of :meth:`Accountant.check`: epsilon before and after, and the verdict."""

    epsilon_before: float
    epsilon_after: float
    limit: float
    delta: float

    @property
    def exceeds(self) -> bool:
        return self.epsilon_after > self.limit


class Accountant(ABC):
    """Computes epsilon of a history of events; stateless and pure."""

    name: str

    @abstractmethod
    def _epsilon(self, events: Sequence[SubsampledGaussianEvent], delta: float) -> float: ...

    def epsilon(self, events: Sequence[SubsampledGaussianEvent], *, delta: float) -> float:
        """Epsilon of the composition of ``events`` at ``delta`` (0 for no steps)."""
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1). Found {delta}.")
        hist = compress(events)
        if not hist:
            return 0.0
        with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore",
                                                    over="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)
            # Opacus's PRV bounds its domain with RDP, which warns when the optimal
            # order is at the edge of its range; the PRV result is unaffected.
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            return float(self._epsilon(hist, delta))

    def check(self, history: Sequence[SubsampledGaussianEvent],
              planned: Sequence[SubsampledGaussianEvent], *, delta: float,
              limit: float) -> BudgetCheck:
        """Would ``planned`` on top of ``history`` exceed ``limit``? Changes nothing."""
        before = self.epsilon(history, delta=delta)
        after = self.epsilon([*history, *planned], delta=delta)
        return BudgetCheck(epsilon_before=before, epsilon_after=after, limit=limit, delta=delta)

    def noise_for(self, *, target_epsilon: float, delta: float, sample_rate: float,
                  steps: int) -> float:
        """Smallest noise multiplier whose ``steps`` steps at ``sample_rate`` stay
        within ``target_epsilon`` at ``delta`` under this accountant."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1. Found {steps}.")

        def eps(sigma: float) -> float:
            return self.epsilon([SubsampledGaussianEvent(
                noise_multiplier=sigma, sample_rate=sample_rate, steps=steps)], delta=delta)

        return calibrate_noise_multiplier(target_epsilon=target_epsilon, delta=delta,
                                          epsilon_of=eps)


class PRVAccountant(Accountant):
    """Tight numerical composition (Opacus ``PRVAccountant``), upper bound of epsilon.

    Opacus's ``eps_error`` is an absolute tolerance; fedvault makes it relative:
    a coarse pass estimates epsilon, then the reported value is computed with
    ``eps_error = rel_error * max(epsilon, 1)`` (0.1% by default), so small and
    large epsilons are equally exact and large ones stay fast.
    """

    name = "prv"

    def __init__(self, rel_error: float = 1e-3) -> None:
        if not 0 < rel_error < 0.1:
            raise ValueError(f"rel_error must be in (0, 0.1). Found {rel_error}.")
        self.rel_error = rel_error

    def _epsilon(self, events: Sequence[SubsampledGaussianEvent], delta: float) -> float:
        acc = _OpacusPRV()
        acc.history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in events]
        coarse = float(acc.get_epsilon(delta=delta, eps_error=0.05))
        return float(acc.get_epsilon(delta=delta,
                                     eps_error=self.rel_error * max(coarse, 1.0)))


class RDPAccountant(Accountant):
    """Rényi-DP accountant (Opacus ``RDPAccountant``) over Opacus's default orders."""

    name = "rdp"

    def _epsilon(self, events: Sequence[SubsampledGaussianEvent], delta: float) -> float:
        acc = _OpacusRDP()
        acc.history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in events]
        return float(acc.get_epsilon(delta=delta))


ACCOUNTANTS: dict[str, type[Accountant]] = {"prv": PRVAccountant, "rdp": RDPAccountant}


def get_accountant(name: str) -> Accountant:
    try:
        return ACCOUNTANTS[name]()
    except KeyError:
        raise ValueError(
            f"Unknown accountant {name!r}. Known: {', '.join(sorted(ACCOUNTANTS))}."
        ) from None
