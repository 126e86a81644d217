"""DP-FedAvg accounting: agrees with opacus/dp_accounting, resumes exactly, plans budgets."""

from __future__ import annotations

import json
import math

import dp_accounting
import pytest
from opacus.accountants import RDPAccountant

from fedlora.privacy.accountant import RoundAccountant, noise_for_budget, rounds_within_budget

CASES = [  # (q, z, rounds, delta)
    (0.1, 1.1, 50, 1e-5),
    (0.05, 0.8, 200, 1e-5),
    (1.0, 2.0, 10, 1e-6),
    (0.02, 1.5, 1000, 1e-5),
]


def _accountant(delta: float, *entries: tuple[float, float, int]) -> RoundAccountant:
    acc = RoundAccountant(delta)
    for q, z, n in entries:
        acc.compose(q, z, n)
    return acc


def _eps(q: float, z: float, n: int, delta: float) -> float:
    return _accountant(delta, (q, z, n)).epsilon()


@pytest.mark.parametrize(("q", "z", "n", "delta"), CASES)
def test_epsilon_matches_opacus_and_dp_accounting(q, z, n, delta):
    eps = _eps(q, z, n, delta)
    assert 0 < eps < math.inf

    opacus_acc = RDPAccountant()
    opacus_acc.history = [(z, q, n)]
    assert eps == pytest.approx(opacus_acc.get_epsilon(delta), rel=0.01)

    direct = dp_accounting.rdp.RdpAccountant()
    direct.compose(
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), n
        )
    )
    assert eps == pytest.approx(direct.get_epsilon(delta), rel=0.01)


def test_one_at_a_time_equals_all_at_once():
    q, z, n, delta = CASES[0]
    stepwise = RoundAccountant(delta)
    for _ in range(n):
        stepwise.compose(q, z)
    assert stepwise.history == [[q, z, n]]
    assert stepwise.rounds == n
    assert stepwise.epsilon() == pytest.approx(_eps(q, z, n, delta), rel=1e-9)


def test_resume_from_json_checkpoint_is_exact():
    q, z, delta = 0.1, 1.1, 1e-5
    first = _accountant(delta, (q, z, 7))
    state = json.loads(json.dumps(first.state_dict()))
    assert state == {"delta": delta, "history": [[q, z, 7]]}

    resumed = RoundAccountant(0.5)  # a different delta, to show the checkpoint's wins
    resumed.load_state_dict(state)
    for _ in range(5):
        resumed.compose(q, z)

    uninterrupted = _accountant(delta, (q, z, 12))
    assert resumed.rounds == 12
    assert resumed.state_dict() == uninterrupted.state_dict()
    assert resumed.epsilon() == uninterrupted.epsilon()
    assert first.rounds == 7  # the checkpointed accountant is not aliased by the resumed one


def test_load_state_dict_rejects_bad_state():
    acc = RoundAccountant(1e-5)
    with pytest.raises(ValueError, match="history"):
        acc.load_state_dict({"delta": 1e-5})
    with pytest.raises(ValueError, match="sample_rate"):
        acc.load_state_dict({"delta": 1e-5, "history": [[1.5, 1.0, 3]]})
    assert acc.history == []  # a failed load leaves the state alone


def test_mixed_histories_compose():
    delta, a, b = 1e-5, (0.1, 1.1, 20), (0.05, 0.8, 30)
    only_a = _accountant(delta, a)
    both = _accountant(delta, a, b)
    assert both.history == [list(a), list(b)]
    assert both.rounds == 50
    assert both.epsilon() > only_a.epsilon()

    direct = dp_accounting.rdp.RdpAccountant()
    direct.compose(
        dp_accounting.ComposedDpEvent(
            [
                dp_accounting.SelfComposedDpEvent(
                    dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), n
                )
                for q, z, n in (a, b)
            ]
        )
    )
    assert both.epsilon() == pytest.approx(direct.get_epsilon(delta), rel=1e-12)
    # A, B, A stays three entries: only consecutive identical (q, z) merge.
    both.compose(*a)
    assert len(both.history) == 3 and both.rounds == 70


def test_epsilon_after_leaves_state_alone():
    acc = _accountant(1e-5, (0.1, 1.1, 10))
    before = (acc.state_dict(), acc.epsilon())
    after = acc.epsilon_after(0.1, 1.1, 40)
    assert (acc.state_dict(), acc.epsilon()) == before
    assert after == pytest.approx(_eps(0.1, 1.1, 50, 1e-5), rel=1e-12)
    assert after > before[1]
    assert RoundAccountant(1e-5).epsilon() == 0.0


def test_rounds_within_budget():
    q, z, delta, budget = 0.1, 1.1, 1e-5, 3.0
    r = rounds_within_budget(q, z, delta, budget, limit=10_000)
    assert 0 < r < 10_000
    assert _eps(q, z, r, delta) <= budget < _eps(q, z, r + 1, delta)
    assert rounds_within_budget(q, z, delta, 0.01, limit=10_000) == 0
    assert rounds_within_budget(q, z, delta, 1000.0, limit=37) == 37
    assert rounds_within_budget(q, z, delta, budget, limit=0) == 0
    assert rounds_within_budget(q, 0.0, delta, 1000.0, limit=37) == 0


def test_noise_for_budget():
    q, n, delta, budget = 0.05, 200, 1e-5, 4.0
    z = noise_for_budget(q, n, delta, budget)
    assert 0 < z < 10
    assert _eps(q, z, n, delta) <= budget < _eps(q, z * 0.99, n, delta)
    with pytest.raises(ValueError, match="epsilon_budget"):
        noise_for_budget(1.0, 10, 1e-5, 1e-6)


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: RoundAccountant(0.0), "delta"),
        (lambda: RoundAccountant(1.0), "delta"),
        (lambda: RoundAccountant(1e-5).compose(0.0, 1.0), "sample_rate"),
        (lambda: RoundAccountant(1e-5).compose(1.01, 1.0), "sample_rate"),
        (lambda: RoundAccountant(1e-5).compose(float("nan"), 1.0), "sample_rate"),
        (lambda: RoundAccountant(1e-5).compose(0.1, -0.1), "noise_multiplier"),
        (lambda: RoundAccountant(1e-5).compose(0.1, math.inf), "noise_multiplier"),
        (lambda: RoundAccountant(1e-5).compose(0.1, 1.0, 0), "rounds"),
        (lambda: RoundAccountant(1e-5).compose(0.1, 1.0, 2.5), "rounds"),
        (lambda: RoundAccountant(1e-5).epsilon_after(0.1, 1.0, 0), "rounds"),
        (lambda: rounds_within_budget(0.1, 1.0, 1e-5, 0.0, 10), "epsilon_budget"),
        (lambda: rounds_within_budget(0.1, 1.0, 1e-5, 1.0, -1), "limit"),
        (lambda: rounds_within_budget(0.1, 1.0, 2.0, 1.0, 10), "delta"),
        (lambda: noise_for_budget(0.0, 10, 1e-5, 1.0), "sample_rate"),
        (lambda: noise_for_budget(0.1, 0, 1e-5, 1.0), "rounds"),
    ],
)
def test_bad_arguments_name_the_argument(call, name):
    with pytest.raises(ValueError, match=name):
        call()


def test_zero_noise_is_no_privacy():
    acc = _accountant(1e-5, (0.1, 1.1, 10))
    acc.compose(0.1, 0.0)
    assert acc.epsilon() == math.inf
    assert acc.epsilon_pld() == math.inf


def test_pld_epsilon_beside_rdp():
    acc = _accountant(1e-5, (0.1, 1.1, 50))
    rdp, pld = acc.epsilon(), acc.epsilon_pld()
    assert 0 < pld < math.inf
    assert rdp / 2 < pld <= rdp * 1.05
    assert RoundAccountant(1e-5).epsilon_pld() == 0.0


def test_pld_epsilon_of_a_tiny_noise_multiplier_is_inf_instead_of_an_unbounded_grid():
    """z = 1e-6 once asked dp_accounting for a 5e15-point grid (a MemoryError that ended the run)."""
    tiny = _accountant(1e-5, (0.5, 1e-6, 8))
    assert tiny.epsilon_pld() == math.inf
    assert tiny.epsilon() > 1e6  # RDP still states it: no privacy to speak of
    ordinary = _accountant(1e-5, (0.5, 0.3, 8))  # the smallest z a run is likely to set keeps its PLD epsilon
    assert math.isfinite(ordinary.epsilon_pld()) and ordinary.epsilon_pld() <= ordinary.epsilon() * 1.05
