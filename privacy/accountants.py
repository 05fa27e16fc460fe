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

Speed without approximation: identical events are composed once
(:func:`privacy.events.compress`); full-batch events (q = 1) are one Gaussian
mechanism whatever their number of steps, whose epsilon has a closed form
(:func:`privacy.analysis.gaussian_epsilon`); results are cached per process,
since every round asks again about the same history.
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from opacus.accountants import PRVAccountant as _OpacusPRV
from opacus.accountants import RDPAccountant as _OpacusRDP
from opacus.accountants.analysis.prv import Domain
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from scipy.fft import next_fast_len

from privacy.analysis import calibrate_noise_multiplier, gaussian_epsilon
from privacy.events import SubsampledGaussianEvent, compress
from protocols.names import AccountantName


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
        hist = tuple(compress(events))
        if not hist:
            return 0.0
        return _cached_epsilon(self, hist, delta)

    def _key(self) -> tuple[object, ...]:
        """What, besides the history and delta, the result depends on (for the cache)."""
        return (type(self).__name__,)

    def __hash__(self) -> int:
        return hash(self._key())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Accountant) and self._key() == other._key()

    def check(self, history: Sequence[SubsampledGaussianEvent],
              planned: Sequence[SubsampledGaussianEvent], *, delta: float,
              limit: float, epsilon_before: float | None = None) -> BudgetCheck:
        """Would ``planned`` on top of ``history`` exceed ``limit``? Changes nothing.
        ``epsilon_before``: the history's epsilon as already computed (the ledger's last
        reservation recorded it); it is reported, and never decides the verdict."""
        before = (self.epsilon(history, delta=delta) if epsilon_before is None
                  else epsilon_before)
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
                                          epsilon_of=eps, guess=self._guess(
                                              target_epsilon=target_epsilon, delta=delta,
                                              sample_rate=sample_rate, steps=steps))

    def _guess(self, *, target_epsilon: float, delta: float, sample_rate: float,
               steps: int) -> float | None:
        """A starting point for calibration (``None``: start from 1)."""
        return None


class PRVAccountant(Accountant):
    """Tight numerical composition (Opacus ``PRVAccountant``), upper bound of epsilon.

    Opacus's ``eps_error`` is an absolute tolerance; fedvault makes it relative:
    ``eps_error = rel_error * max(epsilon_RDP, 1)`` (0.1% by default), where
    epsilon_RDP, the RDP bound over integer orders, is at least the PRV value, so
    small and large epsilons are about equally exact and large ones stay fast.

    **Bounded cost.** The PRV grid needs ``~ sqrt(steps)`` points for a fixed
    relative error (the privacy loss spreads as the steps grow, Gopi et al. 2021,
    Sec. 5), so a history's epsilon would cost more every round. Past ``max_grid``
    points (2**18: the first rounds of a typical site) the grid is coarsened to
    ``max_grid`` points instead, so every reservation check costs the same,
    and the answer is made provably no lower than the full-resolution one: Opacus's
    ``compute_epsilon`` relies on the sandwich ``delta_Y(e + err) - d_err <=
    delta_disc(e) <= delta_Y(e - err) + d_err`` between the true and the
    discretised privacy curves (Gopi et al. 2021, Sec. 5), from which the
    full-resolution upper bound ``U_f(delta) <= eps_true(delta - 2 d_err) + 2 err_f``;
    the coarse grid's upper bound at ``delta - 2 d_err`` is at least
    ``eps_true(delta - 2 d_err)``, so adding ``2 err_f`` gives at least ``U_f``.
    (``hypothesis`` checks it: ``tests/test_accountants.py``.) The price is a
    slightly looser epsilon on long subsampled histories (``bench/accounting.py``).
    """

    name = "prv"

    def __init__(self, rel_error: float = 1e-3, max_grid: int = 1 << 18) -> None:
        if not 0 < rel_error < 0.1:
            raise ValueError(f"rel_error must be in (0, 0.1). Found {rel_error}.")
        if max_grid < 1024:
            raise ValueError(f"max_grid must be >= 1024. Found {max_grid}.")
        self.rel_error = rel_error
        self.max_grid = max_grid

    def _key(self) -> tuple[object, ...]:
        return (type(self).__name__, self.rel_error, self.max_grid)

    def _guess(self, *, target_epsilon: float, delta: float, sample_rate: float,
               steps: int) -> float | None:
        # RDP's noise for the target, over integer orders (milliseconds), is close
        # above the answer: PRV's epsilon is tighter.
        def eps(sigma: float) -> float:
            return _rdp_epsilon([(sigma, sample_rate, steps)], delta)

        try:
            return calibrate_noise_multiplier(target_epsilon=target_epsilon, delta=delta,
                                              epsilon_of=eps, tolerance=0.02)
        except ValueError:
            return None


    def _epsilon(self, events: Sequence[SubsampledGaussianEvent], delta: float) -> float:
        full = [e for e in events if e.sample_rate >= 1.0]
        sub = [e for e in events if e.sample_rate < 1.0]
        if full:
            # All full-batch steps together are one Gaussian with mu^2 = sum T / sigma^2
            # (Dong, Roth & Su 2019): exact, and the same cost for 1 or 1e6 steps.
            mu = math.sqrt(sum(e.steps / e.noise_multiplier ** 2 for e in full))
            if not sub:
                return gaussian_epsilon(mu=mu, delta=delta)
            sub.append(SubsampledGaussianEvent(noise_multiplier=1.0 / mu, sample_rate=1.0,
                                               steps=1))
        parts = [(e.noise_multiplier, e.sample_rate, e.steps) for e in sub]
        # The error scale: RDP's epsilon (integer orders, cached per (q, sigma)), an upper
        # bound of the PRV value, so one PRV pass suffices where a coarse PRV pass
        # used to estimate it (for large epsilon the coarse pass cost as much).
        err = self.rel_error * max(_rdp_epsilon(parts, delta), 1.0)
        if _safe_domain(parts, err, delta / 1000).size <= self.max_grid:
            return _prv_upper(parts, delta, err)
        # Coarser grid at delta' = delta - 2 d_err (d_err = delta / 1000, Opacus's
        # default), plus twice the full-resolution error: >= the full-resolution answer.
        lower_delta = delta * (1 - 2e-3)
        coarse = err
        while (size := _safe_domain(parts, coarse, lower_delta / 1000).size) > self.max_grid:
            coarse *= size / self.max_grid * 1.01
        try:
            return _prv_upper(parts, lower_delta, coarse) + 2 * err
        except RuntimeError:  # Opacus: "Cannot compute epsilon" on too coarse a grid
            return _prv_upper(parts, delta, err)  # the full resolution: slower, exact


def _prv_upper(parts: Sequence[tuple[float, float, int]], delta: float, eps_error: float
               ) -> float:
    """Opacus's PRV upper bound of epsilon for ``parts`` (sigma, q, steps)."""
    acc = _PRVWithFastDomain()
    acc.history = list(parts)
    return float(acc.get_epsilon(delta=delta, eps_error=eps_error))


class RDPAccountant(Accountant):
    """Rényi-DP accountant (Opacus ``RDPAccountant``) over Opacus's default orders."""

    name = "rdp"

    def _epsilon(self, events: Sequence[SubsampledGaussianEvent], delta: float) -> float:
        acc = _OpacusRDP()
        acc.history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in events]
        return float(acc.get_epsilon(delta=delta))


#: Integer Rényi orders for the PRV domain bound: the subsampled Gaussian's RDP at an
#: integer order is a finite sum (Mironov, Talwar & Zhang 2019, Sec. 3.3), fast;
#: Opacus's fractional orders need slowly converging series.
_DOMAIN_ORDERS = tuple(range(2, 129))


@lru_cache(maxsize=4096)
def _rdp_per_step(sample_rate: float, noise_multiplier: float) -> np.ndarray:
    return np.asarray(compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1,
                                  orders=list(_DOMAIN_ORDERS)))


def _rdp_epsilon(parts: Sequence[tuple[float, float, int]], delta: float) -> float:
    rdp = sum(steps * _rdp_per_step(q, sigma) for sigma, q, steps in parts)
    with warnings.catch_warnings():
        # the best order at the edge of the range only makes the bound looser
        warnings.filterwarnings("ignore", message="Optimal order is the")
        eps, _ = get_privacy_spent(orders=list(_DOMAIN_ORDERS), rdp=rdp, delta=delta)
    return float(eps)


def _safe_domain(parts: Sequence[tuple[float, float, int]], eps_error: float,
                 delta_error: float) -> Domain:
    """The PRV grid of ``parts`` (sigma, q, steps) for these errors: Opacus's safe
    domain rule (Gopi et al. 2021, Remark 5.6, as ``compute_safe_domain_size`` applies
    it) with its bound from RDP over integer orders, and Opacus's mesh."""
    total = sum(n for _, _, n in parts)
    l_max = _rdp_epsilon(parts, delta_error / 4)
    for sigma, q, _ in parts:
        l_max = max(l_max, _rdp_epsilon([(sigma, q, 1)], delta_error / (8 * total)))
    size = max(l_max, eps_error) + 3
    mesh = eps_error / np.sqrt(total * np.log(12 / delta_error) / 2)
    d = Domain.create_aligned(-size, size, mesh)
    # Extend to a 5-smooth (and even) number of points: the composition is an FFT of
    # this length, many times faster at such sizes; a larger domain is still safe.
    # (extended equally on both sides: the composition assumes the domain's layout)
    n = next_fast_len(d.size, real=True)
    while n % 2 or (n - d.size) % 4:
        n = next_fast_len(n + 1, real=True)
    k = (n - d.size) // 2
    return Domain(t_min=d.t_min - k * d.dt, t_max=d.t_max + k * d.dt, size=n)


class _PRVWithFastDomain(_OpacusPRV):
    """Opacus's PRV accountant with the same safe-domain rule bounded by RDP over
    integer orders, cached per (q, sigma) (:func:`_safe_domain`). Opacus's own bound
    evaluates RDP at fractional orders on every call: 75% of a PRV epsilon's time.
    Fewer orders give a looser (larger) bound, so the domain stays safe; the PRV
    result's error bounds are unchanged."""

    def _get_domain(self, prvs: list[object], num_self_compositions: list[int],
                    eps_error: float, delta_error: float) -> Domain:
        parts = [(p.noise_multiplier, p.sample_rate, n)  # type: ignore[attr-defined]
                 for p, n in zip(prvs, num_self_compositions, strict=True)]
        return _safe_domain(parts, eps_error, delta_error)


@lru_cache(maxsize=1024)
def _cached_epsilon(accountant: Accountant, hist: tuple[SubsampledGaussianEvent, ...],
                    delta: float) -> float:
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore",
                                                over="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        # Opacus's PRV bounds its domain with RDP, which warns when the optimal
        # order is at the edge of its range; the PRV result is unaffected.
        warnings.filterwarnings("ignore", message="Optimal order is the")
        return float(accountant._epsilon(hist, delta))


ACCOUNTANTS: dict[str, type[Accountant]] = {AccountantName.PRV: PRVAccountant,
                                             AccountantName.RDP: RDPAccountant}


def get_accountant(name: str) -> Accountant:
    try:
        return ACCOUNTANTS[name]()
    except KeyError:
        raise ValueError(
            f"Unknown accountant {name!r}. Known: {', '.join(sorted(ACCOUNTANTS))}."
        ) from None
