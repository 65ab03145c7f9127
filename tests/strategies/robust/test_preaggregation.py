"""Pre-aggregation: clipping rows to a norm, norm bounding, quantile-tracking bound."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from strategies.core.clipping import clip_rows
from strategies.robust.preaggregation import QuantileNormBound, norm_bound


@st.composite
def update_matrices(draw):
    k = draw(st.integers(1, 8))
    p = draw(st.integers(1, 40))
    limit = float(np.float32(1e15))
    elements = st.floats(-limit, limit, width=32, allow_subnormal=False)
    return draw(hnp.arrays(np.float32, (k, p), elements=elements))


@settings(max_examples=100, deadline=None)
@given(update_matrices(), st.floats(1e-3, 1e6))
def test_clipping_bounds_every_row_and_leaves_short_rows_unchanged(x, max_norm):
    original = x.copy()
    norms_before = clip_rows(x, max_norm)
    exact_before = np.linalg.norm(original.astype(np.float64), axis=1)
    np.testing.assert_allclose(norms_before, exact_before, rtol=1e-12)
    norms_after = np.linalg.norm(x.astype(np.float64), axis=1)
    assert np.all(norms_after <= max_norm)  # exactly, despite float32 rounding
    short = exact_before <= max_norm
    np.testing.assert_array_equal(x[short], original[short])
    # Long rows keep their direction and end up on the bound.
    long = ~short
    np.testing.assert_allclose(norms_after[long], max_norm, rtol=1e-6)
    scales = max_norm / exact_before[long]
    np.testing.assert_allclose(x[long], original[long] * scales[:, None], rtol=1e-6, atol=1e-6 * max_norm)


def test_clipping_works_in_place_on_the_strategy_buffer():
    x = np.array([[3.0, 4.0], [0.3, 0.4]], dtype=np.float32)
    buffer_address = x.__array_interface__["data"][0]
    np.testing.assert_allclose(clip_rows(x, 1.0), [5.0, 0.5])
    assert x.__array_interface__["data"][0] == buffer_address
    np.testing.assert_allclose(x, [[0.6, 0.8], [0.3, 0.4]], rtol=1e-6)


@pytest.mark.parametrize("bad", [0, -1.0, math.inf, math.nan, "1", True])
def test_clipping_rejects_a_bad_bound(bad):
    with pytest.raises(ValueError, match="max_norm must be a positive number"):
        clip_rows(np.ones((2, 2), dtype=np.float32), bad)


def test_clipping_rejects_a_matrix_it_cannot_modify_in_place():
    with pytest.raises(ValueError, match="float32"):
        clip_rows(np.ones((2, 2), dtype=np.float64), 1.0)
    frozen = np.ones((2, 2), dtype=np.float32)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        clip_rows(frozen, 1.0)


def test_norm_bound_scales_down_boosted_updates_and_reports_them():
    x = np.array([[30.0, 40.0], [0.6, 0.8], [-6.0, 8.0]], dtype=np.float32)
    bounded = norm_bound(x, 5.0)
    np.testing.assert_array_equal(bounded, [True, False, True])
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), [5.0, 1.0, 5.0], rtol=1e-6)
    np.testing.assert_allclose(x[2], [-3.0, 4.0], rtol=1e-6)


def test_quantile_bound_converges_to_the_target_quantile_of_the_norms():
    rng = np.random.default_rng(0)
    bound = QuantileNormBound(quantile=0.5, initial_bound=100.0, learning_rate=0.2)
    for _ in range(200):
        updates = rng.standard_normal((50, 20)).astype(np.float32)
        updates *= rng.lognormal(0.0, 0.5, size=(50, 1)).astype(np.float32)
        applied = bound.bound
        bound.clip(updates)
        assert np.all(np.linalg.norm(updates.astype(np.float64), axis=1) <= applied)
    # The median norm of sqrt(chi^2_20) * lognormal(0, 0.5) is about sqrt(19.3) ~ 4.4.
    assert 3.5 < bound.bound < 5.5


def test_quantile_bound_moves_by_a_bounded_factor_per_round():
    bound = QuantileNormBound(quantile=0.9, initial_bound=1.0, learning_rate=0.2)
    huge = np.full((10, 3), 1e20, dtype=np.float32)  # every client attacks with a huge update
    bound.clip(huge)
    assert bound.bound == pytest.approx(math.exp(0.2 * 0.9))
    assert np.all(np.linalg.norm(huge.astype(np.float64), axis=1) <= 1.0)
    tiny = np.full((10, 3), 1e-9, dtype=np.float32)
    before = bound.bound
    bound.clip(tiny)
    assert bound.bound == pytest.approx(before * math.exp(-0.2 * (1.0 - 0.9)))


def test_quantile_bound_state_round_trips_through_json():
    bound = QuantileNormBound(quantile=0.5, initial_bound=2.0)
    bound.update(np.array([10.0, 20.0, 30.0]))
    state = json.loads(json.dumps(bound.state_dict()))
    restored = QuantileNormBound(quantile=0.5, initial_bound=99.0)
    restored.load_state_dict(state)
    assert restored.bound == bound.bound
    assert restored.update(np.array([1.0])) == bound.update(np.array([1.0]))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"quantile": 1.5, "initial_bound": 1.0}, "quantile must be in [0, 1], got 1.5"),
        ({"quantile": 0.5, "initial_bound": 0.0}, "initial_bound must be a positive number"),
        ({"quantile": 0.5, "initial_bound": 1.0, "learning_rate": -1}, "learning_rate"),
    ],
)
def test_quantile_bound_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError) as error:
        QuantileNormBound(**kwargs)
    assert message in str(error.value)


def test_quantile_bound_rejects_a_bad_state():
    bound = QuantileNormBound(quantile=0.5, initial_bound=1.0)
    with pytest.raises(ValueError, match="needs a 'bound'"):
        bound.load_state_dict({})
    with pytest.raises(ValueError, match="bound must be a positive number"):
        bound.load_state_dict({"bound": -3.0})
