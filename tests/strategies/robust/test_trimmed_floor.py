"""Regression: the trimmed mean trims k values at each end for beta = k / n (float rounding of beta * n)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fl_app.config.choices import select_attackers
from strategies.robust import rules


@pytest.mark.parametrize(("k", "n"), [(4, 49), (1, 49), (3, 10), (7, 100), (29, 100)])
def test_beta_k_over_n_trims_k(k, n):
    assert rules.trimmed_count(n, k / n) == k
    x = np.zeros((n, 1), np.float32)
    x[:k, 0] = 1e6  # k attackers far above, k far below
    x[k : 2 * k, 0] = -1e6
    out = rules.trimmed_mean(x, np.ones(n), beta=k / n)
    assert out[0] == 0.0  # all 2k outliers trimmed; a floor without tolerance kept one pair (or all)


def test_the_old_floor_was_wrong_here():
    assert int(4 / 49 * 49) == 3 and int(1 / 49 * 49) == 0  # what math.floor(beta * n) trimmed


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 500), st.data())
def test_trimmed_count_agrees_with_select_attackers(n, data):
    k = data.draw(st.integers(0, (n - 1) // 2))
    assert rules.trimmed_count(n, k / n) == k == len(select_attackers(n, fraction=k / n))


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 500), st.floats(0.0, 0.5, exclude_max=True))
def test_some_value_is_always_kept(n, beta):
    assert 0 <= 2 * rules.trimmed_count(n, beta) < n
