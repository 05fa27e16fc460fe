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
) -> float:
    """Smallest noise multiplier (to ``tolerance`` relative) whose epsilon, as
    computed by ``epsilon_of(noise_multiplier)`` at ``delta``, is <= target.

    Bisection on a monotone function, as Opacus's ``get_noise_multiplier``; the
    returned value always satisfies the target (it is the upper end of the bracket).
    """
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ValueError(f"target_epsilon must be > 0. Found {target_epsilon}.")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1). Found {delta}.")
    lo, hi = 0.0, 1.0
    while epsilon_of(hi) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > MAX_NOISE_MULTIPLIER:
            raise ValueError(
                f"target epsilon {target_epsilon} is out of reach (noise multiplier would "
                f"exceed {MAX_NOISE_MULTIPLIER:g})."
            )
    while hi - lo > tolerance * hi:
        mid = (lo + hi) / 2
        if epsilon_of(mid) > target_epsilon:
            lo = mid
        else:
            hi = mid
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
