"""Pure privacy mathematics (no state): calibration and sampling arithmetic.

Epsilon itself is computed by the accountants (:mod:`privacy.accountants`),
which delegate to Opacus's implementations of the PRV accountant (Gopi, Lee &
Wutschitz 2021, "Numerical Composition of Differential Privacy",
arXiv:2106.02848) and the RDP accountant (Mironov 2017, arXiv:1702.07476;
Mironov, Talwar & Zhang 2019, arXiv:1908.10530).
"""

from __future__ import annotations

import math
from collections.abc import Callable

MAX_NOISE_MULTIPLIER = 1e4


def calibrate_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    epsilon_of: Callable[[float], float],
    tolerance: float = 0.01,
    guess: float | None = None,
) -> float:
    """Smallest noise multiplier (to ``tolerance`` relative) whose epsilon, as
    computed by ``epsilon_of(noise_multiplier)`` at ``delta``, is <= target.

    The answer is bracketed (from ``guess`` when given, e.g. the RDP-calibrated
    noise, else from 1 by doubling), then narrowed by false position on
    (log sigma, log epsilon), where epsilon is close to linear, with the Illinois
    modification, and a final squeeze of the bracket around the estimate: a handful
    of evaluations instead of bisection's ten or more (Opacus's
    ``get_noise_multiplier`` bisects). The returned value always satisfies the
    target (it is the upper end of the final bracket).
    """
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ValueError(f"target_epsilon must be > 0. Found {target_epsilon}.")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1). Found {delta}.")
    if not 0 < tolerance < 1:
        raise ValueError(f"tolerance must be in (0, 1). Found {tolerance}.")

    def f(sigma: float) -> float:  # > 0: too little noise
        eps = epsilon_of(sigma)
        return math.log(eps / target_epsilon) if eps > 0 else -math.inf

    # bracket: f(lo) > 0 >= f(hi)
    hi = guess if guess and guess > 0 else 1.0
    f_hi = f(hi)
    if f_hi > 0:
        lo, f_lo = hi, f_hi
        while f_hi > 0:
            lo, f_lo = hi, f_hi
            hi *= 2
            if hi > MAX_NOISE_MULTIPLIER:
                raise ValueError(
                    f"target epsilon {target_epsilon} is out of reach (noise multiplier "
                    f"would exceed {MAX_NOISE_MULTIPLIER:g}).")
            f_hi = f(hi)
    else:
        # epsilon falls roughly as 1/sigma: aim just below the estimated answer
        lo = hi * min(0.99, math.exp(f_hi) * 0.995) if math.isfinite(f_hi) else hi / 2
        f_lo = f(lo)
        while f_lo <= 0:
            hi, f_hi = lo, f_lo
            lo /= 1.25
            if lo < 1e-6:
                return hi
            f_lo = f(lo)
    side = 0
    while hi - lo > tolerance * hi:
        x_lo, x_hi = math.log(lo), math.log(hi)
        if math.isfinite(f_hi) and f_lo != f_hi:
            x = x_hi - f_hi * (x_hi - x_lo) / (f_hi - f_lo)
        else:
            x = (x_lo + x_hi) / 2
        mid = math.exp(min(max(x, x_lo), x_hi))
        # squeeze: test just around the estimate so that one more step can end it
        width = tolerance * hi / 2
        mid = min(max(mid + (width / 2 if side <= 0 else -width / 2), lo + width / 4),
                  hi - width / 4)
        f_mid = f(mid)
        if f_mid > 0:
            lo, f_lo = mid, f_mid
            if side == 1:
                f_hi /= 2  # Illinois: the stale end's value is halved
            side = 1
        else:
            hi, f_hi = mid, f_mid
            if side == -1:
                f_lo /= 2
            side = -1
    return hi


def poisson_sample_rate(*, batch_size: int, num_examples: int) -> float:
    """Expected batch size / dataset size, capped at 1 (Opacus's ``DPDataLoader``)."""
    if num_examples < 1:
        raise ValueError(f"num_examples must be >= 1. Found {num_examples}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1. Found {batch_size}.")
    return min(1.0, batch_size / num_examples)


def steps_per_epoch(sample_rate: float) -> int:
    """Batches per epoch of Opacus's Poisson loader, computed exactly as Opacus's
    ``UniformWithReplacementSampler`` does (``int(1 / sample_rate)``): the reserved
    step count must equal the steps the loader really runs, float quirks included."""
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1]. Found {sample_rate}.")
    return int(1 / sample_rate)


def gaussian_delta(*, mu: float, epsilon: float) -> float:
    """Exact delta(epsilon) of the Gaussian mechanism whose sensitivity / noise std is
    ``mu`` (Balle & Wang 2018, "Improving the Gaussian Mechanism for Differential
    Privacy", ICML, Theorem 8): Phi(mu/2 - eps/mu) - e^eps Phi(-mu/2 - eps/mu).

    ``T`` compositions of a Gaussian with noise multiplier ``sigma`` are exactly one
    Gaussian with ``mu = sqrt(T) / sigma`` (Dong, Roth & Su 2019, "Gaussian
    Differential Privacy", Corollary 3.3), so this is also exact for any number of
    full-batch (q = 1) DP-SGD steps."""
    from scipy.special import log_ndtr, ndtr

    if not mu > 0:
        raise ValueError(f"mu must be > 0. Found {mu}.")
    a = float(ndtr(mu / 2 - epsilon / mu))
    b = math.exp(epsilon + float(log_ndtr(-mu / 2 - epsilon / mu)))
    return max(0.0, a - b)


def gaussian_epsilon(*, mu: float, delta: float) -> float:
    """Smallest epsilon with ``gaussian_delta(mu, epsilon) <= delta`` (bisection to a
    relative 1e-9; returns the upper end, so it never understates epsilon)."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1). Found {delta}.")
    if gaussian_delta(mu=mu, epsilon=0.0) <= delta:
        return 0.0
    lo, hi = 0.0, 1.0
    while gaussian_delta(mu=mu, epsilon=hi) > delta:
        lo, hi = hi, hi * 2
    while hi - lo > 1e-9 * max(hi, 1e-12):
        mid = (lo + hi) / 2
        if gaussian_delta(mu=mu, epsilon=mid) > delta:
            lo = mid
        else:
            hi = mid
    return hi


def replace_one_epsilon(*, delta: float, epsilon_of: Callable[[float], float],
                        tolerance: float = 1e-3) -> tuple[float, float]:
    """(epsilon, delta1) under replace-one adjacency from an add/remove-one guarantee.

    Replacing a record is removing it and adding another, so an (eps1, delta1)-DP
    mechanism under add/remove-one is (2 eps1, (1 + e^eps1) delta1)-DP under
    replace-one (group privacy for two steps: Dwork & Roth 2014, "The Algorithmic
    Foundations of Differential Privacy", Theorem 2.2 and its (eps, delta) form,
    Vadhan 2017, Lemma 2.2). This finds the delta1 with (1 + e^eps1(delta1)) delta1
    <= ``delta`` (bisection in log delta1) and returns 2 eps1: a valid, not tight, bound.
    ``epsilon_of(d)`` is the add/remove-one epsilon at delta ``d``."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1). Found {delta}.")

    def fits(d1: float) -> bool:
        return (1 + math.exp(min(epsilon_of(d1), 700.0))) * d1 <= delta

    hi = math.log(delta / 2)  # (1 + e^eps) >= 2: delta1 can be no larger than delta / 2
    if fits(math.exp(hi)):
        return 2 * epsilon_of(math.exp(hi)), math.exp(hi)
    lo = hi - 1.0
    while not fits(math.exp(lo)):
        hi, lo = lo, lo - 2 * (hi - lo)
        if lo < -700:
            raise ValueError(f"no replace-one guarantee at delta {delta}.")
    # lo fits, hi does not; narrow until epsilon changes by less than ``tolerance``.
    while True:
        e_lo, e_hi = epsilon_of(math.exp(lo)), epsilon_of(math.exp(hi))
        if e_lo - e_hi <= tolerance * max(e_lo, 1e-9) or hi - lo < 1e-6:
            return 2 * e_lo, math.exp(lo)
        mid = (lo + hi) / 2
        if fits(math.exp(mid)):
            lo = mid
        else:
            hi = mid
