"""The median and the trimmed mean computed from the reply bytes, without the K x P matrix."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies.aggregation.collector import ReplyCollector
from strategies.aggregation.steps import RuleStep
from strategies.aggregation.strategy import AggregationStrategy
from strategies.robust import rules
from tests.fakes import reply
from tests.strategies.aggregation.test_streamed_mean import arrays_of, insert_faulty_replies, round_of

RULE_PARAMS = {"median": {}, "trimmed-mean": {"beta": 0.2}}


@settings(max_examples=25, deadline=None)
@given(
    st.integers(0, 2**32 - 1),
    st.integers(1, 12),
    st.sampled_from(sorted(RULE_PARAMS)),
    st.lists(st.sampled_from(["nan", "inf", "-inf", "shape", "error"]), max_size=3),
)
def test_streamed_sorted_column_rules_equal_the_matrix_path(seed, num_clients, name, faults):
    rng = np.random.default_rng(seed)
    g = arrays_of(rng, 3.0)
    replies = [reply(node, arrays_of(rng), 10) for node in range(1, num_clients + 1)]
    insert_faulty_replies(rng, replies, faults)
    streamed = AggregationStrategy(RuleStep.builtin(name, RULE_PARAMS[name]))
    matrix = AggregationStrategy(
        RuleStep.builtin(name, RULE_PARAMS[name]), collector=ReplyCollector(max_update_norm=np.inf)
    )
    assert streamed.streams_sorted_columns() and not matrix.streams_sorted_columns()
    (ours, metrics), (reference, reference_metrics) = round_of(streamed, g, replies), round_of(matrix, g, replies)
    assert dict(metrics).keys() == dict(reference_metrics).keys()
    assert streamed.rejections() == matrix.rejections()
    assert (ours is None) == (reference is None)
    if ours is not None:
        trims_none = name == "trimmed-mean" and rules.trimmed_count(num_clients, 0.2) == 0  # faults never count
        for a, b in zip(ours.to_numpy_ndarrays(), reference.to_numpy_ndarrays()):
            if trims_none:  # a plain mean: sum_k c_k w_k - w against sum_k c_k (w_k - w), float32 rounding
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
            else:  # the same sorted float32 values, the same sums
                np.testing.assert_array_equal(a, b)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 15), st.integers(1, 3000), st.sampled_from([0.0, 0.1, 0.3, 0.45]))
def test_row_versions_equal_the_matrix_rules(seed, num_clients, size, beta):
    updates = np.random.default_rng(seed).standard_normal((num_clients, size)).astype(np.float32)
    rows = rules.MatrixRows(updates)
    weights = np.ones(num_clients)
    np.testing.assert_array_equal(rules.coordinate_median_of_rows(rows), rules.coordinate_median(updates, weights))
    np.testing.assert_array_equal(rules.trimmed_mean_of_rows(rows, beta), rules.trimmed_mean(updates, weights, beta))


def test_a_non_finite_value_anywhere_makes_the_whole_result_nan():
    updates = np.random.default_rng(1).standard_normal((7, 5000)).astype(np.float32)
    for value, where in ((np.nan, (3, 4999)), (np.inf, (0, 17)), (-np.inf, (6, 2500))):
        bad = updates.copy()
        bad[where] = value
        for result in (
            rules.coordinate_median_of_rows(rules.MatrixRows(bad)),
            rules.trimmed_mean_of_rows(rules.MatrixRows(bad), 0.2),
        ):
            assert np.isnan(result).all()  # the median of the matrix path would hide it: 1 of 7


def test_too_few_replies_still_names_the_nan_reply():
    """Two valid replies and one with NaN: the trimmed mean (beta 0.45) cannot run on 2, the round is
    skipped either way, and both paths reject the same reply."""
    rng = np.random.default_rng(3)
    g = arrays_of(rng)
    bad = arrays_of(rng)
    bad[0][0, 0] = np.nan
    replies = [reply(1, arrays_of(rng)), reply(2, bad), reply(3, arrays_of(rng))]
    params = {"beta": 0.45}
    streamed = AggregationStrategy(RuleStep.builtin("trimmed-mean", params), min_valid_replies=3)
    matrix = AggregationStrategy(
        RuleStep.builtin("trimmed-mean", params),
        collector=ReplyCollector(max_update_norm=np.inf),
        min_valid_replies=3,
    )
    (ours, _), (reference, _) = round_of(streamed, g, replies), round_of(matrix, g, replies)
    assert ours is None and reference is None
    assert streamed.rejections() == matrix.rejections() and len(streamed.rejections()) == 1
