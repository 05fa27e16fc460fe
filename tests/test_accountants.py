"""Accountants against an independent implementation: Google's dp_accounting.

A contract class every accountant inherits (as dp_accounting's
``privacy_accountant_test.py``), plus oracle comparisons.
"""

from __future__ import annotations

import dp_accounting as dpa
import numpy as np
import pytest
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants.rdp import RDPAccountant as OpacusRDP

from privacy.accountants import Accountant, PRVAccountant, RDPAccountant, get_accountant
from privacy.events import SubsampledGaussianEvent, compress

CASES = [  # (noise multiplier, sample rate, steps)
    (1.0, 0.01, 1000),
    (1.1, 0.28, 40),
    (2.0, 0.05, 500),
    (1.5, 1.0, 16),
    (0.9, 0.5, 20),
]


def _event(s: float, q: float, t: int) -> SubsampledGaussianEvent:
    return SubsampledGaussianEvent(noise_multiplier=s, sample_rate=q, steps=t)


def _dpa_event(events: list[SubsampledGaussianEvent]) -> dpa.DpEvent:
    return dpa.ComposedDpEvent([
        dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(
            e.sample_rate, dpa.GaussianDpEvent(e.noise_multiplier)), e.steps)
        for e in events])


def pld_epsilon(events: list[SubsampledGaussianEvent], delta: float) -> float:
    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    return float(acc.compose(_dpa_event(events)).get_epsilon(delta))


class AccountantContract:
    """Properties every accountant must have."""

    accountant: Accountant

    def test_no_steps_is_zero(self) -> None:
        assert self.accountant.epsilon([], delta=1e-5) == 0.0
        assert self.accountant.epsilon([_event(1.0, 0.1, 0)], delta=1e-5) == 0.0

    def test_monotone_in_steps_and_noise(self) -> None:
        a = self.accountant
        e1 = a.epsilon([_event(1.0, 0.1, 50)], delta=1e-5)
        e2 = a.epsilon([_event(1.0, 0.1, 100)], delta=1e-5)
        e3 = a.epsilon([_event(2.0, 0.1, 100)], delta=1e-5)
        assert e1 < e2 and e3 < e2

    def test_composition_is_order_free(self) -> None:
        a, b = _event(1.0, 0.1, 30), _event(1.5, 0.2, 20)
        x = self.accountant.epsilon([a, b, a], delta=1e-5)
        y = self.accountant.epsilon([a, a, b], delta=1e-5)
        z = self.accountant.epsilon([_event(1.0, 0.1, 60), b], delta=1e-5)
        assert x == pytest.approx(y, rel=1e-9) and x == pytest.approx(z, rel=1e-9)

    def test_check_changes_nothing_and_answers(self) -> None:
        hist = [_event(1.0, 0.1, 50)]
        chk = self.accountant.check(hist, [_event(1.0, 0.1, 50)], delta=1e-5, limit=1e9)
        assert not chk.exceeds and chk.epsilon_before < chk.epsilon_after
        assert len(hist) == 1
        chk2 = self.accountant.check(hist, [_event(1.0, 0.1, 50)], delta=1e-5,
                                     limit=chk.epsilon_before)
        assert chk2.exceeds

    def test_calibration_meets_the_target(self) -> None:
        sigma = self.accountant.noise_for(target_epsilon=3.0, delta=1e-5, sample_rate=0.2,
                                          steps=50)
        eps = self.accountant.epsilon([_event(sigma, 0.2, 50)], delta=1e-5)
        assert 3.0 * 0.97 < eps <= 3.0

    def test_bad_delta(self) -> None:
        with pytest.raises(ValueError, match="delta must be in"):
            self.accountant.epsilon([_event(1.0, 0.1, 1)], delta=0.0)


class TestPRV(AccountantContract):
    accountant = PRVAccountant()

    @pytest.mark.parametrize(("sigma", "q", "steps"), CASES)
    @pytest.mark.parametrize("delta", [1e-5, 1e-6])
    def test_matches_google_pld_within_one_percent(self, sigma: float, q: float, steps: int,
                                                   delta: float) -> None:
        events = [_event(sigma, q, steps)]
        ours = self.accountant.epsilon(events, delta=delta)
        ref = pld_epsilon(events, delta)
        assert abs(ours - ref) / ref < 0.01, (ours, ref)
        assert ours >= ref * 0.99  # never lower than the tight reference by more than 1%

    def test_mixed_history_matches_google_pld(self) -> None:
        events = [_event(1.2, 0.25, 24), _event(0.9, 1.0, 4), _event(2.0, 0.05, 100)]
        ours = self.accountant.epsilon(events, delta=1e-5)
        ref = pld_epsilon(events, 1e-5)
        assert abs(ours - ref) / ref < 0.01 and ours >= ref * 0.99


class TestRDP(AccountantContract):
    accountant = RDPAccountant()

    @pytest.mark.parametrize(("sigma", "q", "steps"), CASES)
    def test_matches_google_rdp_within_one_percent(self, sigma: float, q: float,
                                                   steps: int) -> None:
        events = [_event(sigma, q, steps)]
        ours = self.accountant.epsilon(events, delta=1e-5)
        # Google's RDP accountant over the same orders Opacus uses.
        ref_acc = rdp_privacy_accountant.RdpAccountant(orders=list(OpacusRDP.DEFAULT_ALPHAS))
        ref = float(ref_acc.compose(_dpa_event(events)).get_epsilon(1e-5))
        assert abs(ours - ref) / ref < 0.01, (ours, ref)

    def test_rdp_is_never_below_the_tight_bound(self) -> None:
        for s, q, t in CASES:
            events = [_event(s, q, t)]
            assert self.accountant.epsilon(events, delta=1e-5) >= pld_epsilon(events, 1e-5) * 0.99


@settings(max_examples=12, deadline=None)
@given(sigma=st.floats(0.6, 4.0), q=st.floats(0.01, 1.0), steps=st.integers(1, 300))
def test_prv_tracks_pld_everywhere(sigma: float, q: float, steps: int) -> None:
    events = [_event(sigma, q, steps)]
    ours = PRVAccountant().epsilon(events, delta=1e-5)
    ref = pld_epsilon(events, 1e-5)
    assert ours >= ref * 0.99
    # past the bounded grid (2**18 points) the answer adds twice the fine error, at
    # least 0.002 absolute (``PRVAccountant``): the floor for epsilons below 1
    assert ours <= ref * 1.01 + 5e-3


def test_registry() -> None:
    assert get_accountant("prv").name == "prv" and get_accountant("rdp").name == "rdp"
    with pytest.raises(ValueError, match="Unknown accountant 'gdp'"):
        get_accountant("gdp")


def test_events_validate_and_roundtrip() -> None:
    e = _event(1.0, 0.5, 3)
    assert SubsampledGaussianEvent.from_dict(e.to_dict()) == e
    for bad in [dict(noise_multiplier=0.0, sample_rate=0.1, steps=1),
                dict(noise_multiplier=1.0, sample_rate=0.0, steps=1),
                dict(noise_multiplier=1.0, sample_rate=1.5, steps=1),
                dict(noise_multiplier=1.0, sample_rate=0.1, steps=-1),
                dict(noise_multiplier=float("nan"), sample_rate=0.1, steps=1)]:
        with pytest.raises(ValueError, match="Found"):
            SubsampledGaussianEvent(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not a poisson_subsampled_gaussian"):
        SubsampledGaussianEvent.from_dict({"kind": "laplace"})
    assert compress([_event(1.0, 0.5, 3), _event(1.0, 0.5, 4), _event(2.0, 0.5, 1)]) == [
        _event(1.0, 0.5, 7), _event(2.0, 0.5, 1)]


def test_secure_noise_is_standard_normal() -> None:
    import torch

    from privacy.noise import secure_gaussian_like, secure_standard_normal

    z = secure_standard_normal(200_000)
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
    # tails of a Gaussian: P(|z| > 2) = 0.0455
    assert abs((np.abs(z) > 2).mean() - 0.0455) < 0.003
    ref = torch.zeros(300, 300)
    n = secure_gaussian_like(ref, std=2.5)
    assert n.shape == ref.shape and n.dtype == torch.float32
    assert abs(float(n.std()) - 2.5) < 0.05
    assert not torch.equal(n, secure_gaussian_like(ref, std=2.5))


# -- closed forms and speed ------------------------------------------------------------------
@pytest.mark.parametrize(("sigma", "steps"), [(1.5, 16), (100.0, 100_000), (3.0, 1)])
def test_full_batch_history_is_one_gaussian_in_closed_form(sigma: float, steps: int) -> None:
    """q = 1: T steps at sigma are one Gaussian with mu = sqrt(T) / sigma; the exact
    epsilon (Balle & Wang 2018) agrees with Google's PLD accountant, at any T, and is
    the closed form itself (no PRV grid: its cost does not grow with T; the speed is
    measured in bench/accounting.py, not asserted here)."""
    from privacy.analysis import gaussian_delta, gaussian_epsilon

    ours = PRVAccountant().epsilon([_event(sigma, 1.0, steps)], delta=1e-5)
    assert ours == gaussian_epsilon(mu=np.sqrt(steps) / sigma, delta=1e-5)
    ref = float(pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
                .compose(dpa.GaussianDpEvent(sigma / np.sqrt(steps))).get_epsilon(1e-5))
    assert abs(ours - ref) <= 0.01 * ref + 1e-4, (ours, ref)
    # and it is the smallest epsilon at which the exact delta is <= 1e-5
    mu = np.sqrt(steps) / sigma
    assert gaussian_delta(mu=mu, epsilon=ours) <= 1e-5 < gaussian_delta(mu=mu,
                                                                        epsilon=ours * 0.999)


def test_calibration_is_tight_and_safe() -> None:
    for name in ("prv", "rdp"):
        a = get_accountant(name)
        for q, t in ((0.1, 400), (0.5, 40), (1.0, 40)):
            s = a.noise_for(target_epsilon=8.0, delta=1e-5, sample_rate=q, steps=t)
            assert a.epsilon([_event(s, q, t)], delta=1e-5) <= 8.0
            assert a.epsilon([_event(s * 0.985, q, t)], delta=1e-5) > 8.0  # within 1.5%


def test_replace_one_by_group_privacy() -> None:
    """(eps1, delta1) add/remove-one gives (2 eps1, (1 + e^eps1) delta1) replace-one."""
    from privacy.analysis import replace_one_epsilon

    acc = PRVAccountant()
    hist = [_event(1.2, 0.1, 200)]
    eps, d1 = replace_one_epsilon(delta=1e-5,
                                  epsilon_of=lambda d: acc.epsilon(hist, delta=d))
    e1 = acc.epsilon(hist, delta=d1)
    assert eps == pytest.approx(2 * e1) and (1 + np.exp(e1)) * d1 <= 1e-5
    assert eps > 2 * acc.epsilon(hist, delta=1e-5)  # the delta split costs something


#: an uncapped PRV accountant: the full-resolution recomputation (grid as large as needed)
FULL = PRVAccountant(max_grid=1 << 40)


@settings(max_examples=10, deadline=None)
@given(parts=st.lists(st.tuples(st.floats(0.6, 6.0), st.floats(0.005, 0.6),
                                st.integers(1, 2000)), min_size=1, max_size=3),
       max_grid=st.sampled_from([1024, 4096, 16384]), delta=st.sampled_from([1e-5, 1e-7]))
def test_a_bounded_grid_is_never_below_the_full_recomputation(
        parts: list[tuple[float, float, int]], max_grid: int, delta: float) -> None:
    """The bounded-cost PRV (a coarser grid past ``max_grid`` points, at delta - 2 d_err,
    plus twice the fine error) against the full-resolution PRV: never lower."""
    events = [_event(s, q, t) for s, q, t in parts]
    capped = PRVAccountant(max_grid=max_grid).epsilon(events, delta=delta)
    full = FULL.epsilon(events, delta=delta)
    assert capped >= full
    if max_grid >= 16384:
        assert capped <= full * 1.10 + 0.05  # and still a useful bound


def test_the_check_costs_the_same_in_round_100_as_in_round_1(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The grid of a history's composition stops growing with its steps: the check
    of round 100 runs on no more points than the bound (constant cost per round)."""
    import privacy.accountants as accountants

    sizes: list[int] = []
    original = accountants._safe_domain

    def spy(*args: object, **kw: object) -> object:
        d = original(*args, **kw)  # type: ignore[arg-type]
        sizes.append(d.size)
        return d

    monkeypatch.setattr(accountants, "_safe_domain", spy)
    acc = PRVAccountant()
    for rounds in (1, 100):
        sizes.clear()
        accountants._cached_epsilon.cache_clear()
        acc.epsilon([_event(1.43, 0.1, 80 * rounds)], delta=1e-5)
        assert sizes[-1] <= acc.max_grid  # the grid composed (the last one) is bounded
