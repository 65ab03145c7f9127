"""One-run auditing bound (Steinke, Nasr, Jagielski 2023): against a slow reference and closed forms."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies.private.auditing import (
    audit_scores,
    guesses_from_scores,
    one_run_epsilon_lower_bound,
    one_run_p_value,
)


def reference_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Theorem 5.2 term by term in plain Python: f(v) + 2 m delta max_i (f(v - i) - f(v)) / i."""
    q = math.exp(epsilon) / (1 + math.exp(epsilon))

    def f(k: int) -> float:  # P[Binomial(r, q) >= k]
        return sum(math.comb(r, j) * q**j * (1 - q) ** (r - j) for j in range(max(k, 0), r + 1))

    if v == 0:
        return 1.0
    tail = max((f(v - i) - f(v)) / i for i in range(1, v + 1))
    return min(f(v) + 2 * m * delta * tail, 1.0)


def reference_lower_bound(m: int, r: int, v: int, delta: float, significance: float = 0.05) -> float:
    """The largest epsilon on a 0.005 grid whose p-value is below the significance."""
    grid = [i * 0.005 for i in range(2001)]
    rejected = [e for e in grid if reference_p_value(m, r, v, e, delta) < significance]
    return max(rejected, default=0.0)


@pytest.mark.parametrize(
    ("m", "r", "v", "delta"),
    [(40, 40, 40, 0.0), (40, 40, 40, 1e-5), (60, 30, 27, 1e-5), (100, 20, 19, 1e-3), (50, 40, 30, 1e-5)],
)
def test_lower_bound_equals_the_slow_reference(m, r, v, delta):
    for epsilon in (0.0, 0.5, 2.0, 5.0):
        assert one_run_p_value(m, r, v, epsilon, delta) == pytest.approx(
            reference_p_value(m, r, v, epsilon, delta), rel=1e-9, abs=1e-15
        )
    expected = reference_lower_bound(m, r, v, delta)
    assert expected > 0
    assert one_run_epsilon_lower_bound(m, r, v, delta) == pytest.approx(expected, abs=0.005)


@pytest.mark.parametrize("r", [10, 100, 1000])
def test_all_correct_without_delta_is_the_randomised_response_bound(r):
    """delta = 0, v = r: p = q^r, so the bound is logit(0.05^(1/r))."""
    q = 0.05 ** (1 / r)
    assert one_run_epsilon_lower_bound(r, r, r, 0.0) == pytest.approx(math.log(q / (1 - q)), rel=1e-9)


def test_monotone_in_the_correct_guesses_and_zero_at_chance():
    bounds = [one_run_epsilon_lower_bound(120, 60, v, 1e-5) for v in range(61)]
    assert all(a <= b for a, b in itertools.pairwise(bounds))
    assert bounds[30] == 0.0 and bounds[35] == 0.0  # chance, and within its 95% range
    assert bounds[60] > bounds[50] > 0


def test_delta_only_lowers_the_bound():
    assert one_run_epsilon_lower_bound(1000, 200, 190, 1e-3) < one_run_epsilon_lower_bound(1000, 200, 190, 0.0)


@settings(max_examples=200, deadline=None)
@given(
    m=st.integers(1, 400),
    r_fraction=st.floats(0, 1),
    v_fraction=st.floats(0, 1),
    delta=st.sampled_from([0.0, 1e-10, 1e-5, 1e-2, 0.5, 1.0]),
)
def test_never_nan_and_never_negative(m, r_fraction, v_fraction, delta):
    r = round(r_fraction * m)
    v = round(v_fraction * r)
    bound = one_run_epsilon_lower_bound(m, r, v, delta)
    assert math.isfinite(bound) and bound >= 0


def test_guesses_take_the_top_and_bottom_scores():
    guesses = guesses_from_scores(np.array([0.1, 5.0, -3.0, 2.0, 0.0]), 2, 1)
    assert guesses.tolist() == [0, 1, -1, 1, 0]
    with pytest.raises(ValueError, match="k\\+ \\+ k-"):
        guesses_from_scores(np.zeros(3), 2, 2)


def test_audit_of_separated_scores_is_the_best_bonferroni_bound_of_its_guesses():
    included = np.random.default_rng(0).random(400) < 0.5
    result = audit_scores(np.where(included, 1.0, -1.0), included, 1e-5)
    assert result.choices == 5
    # r = 2k for k = ceil(f m / 2); of the top (bottom) k, min(k, #in) (min(k, #out)) are right; each at 0.05 / 5
    n_in = int(included.sum())
    expected = max(
        one_run_epsilon_lower_bound(400, 2 * k, min(k, n_in) + min(k, 400 - n_in), 1e-5, 0.01)
        for k in (10, 20, 40, 100, 200)
    )
    assert result.epsilon_lower == expected


def test_audit_of_uninformative_scores_is_zero():
    rng = np.random.default_rng(1)
    included = rng.random(1000) < 0.5
    assert audit_scores(rng.standard_normal(1000), included, 1e-5).epsilon_lower == 0.0
