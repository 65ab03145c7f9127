"""Krum and Multi-Krum computed from the reply bytes (a Gram matrix of column blocks, no K x P matrix).

They must give what the matrix path (collect_updates + the rule) gives, including rejections, and
choose the rows that float64 distances computed from direct differences choose.
"""

import tracemalloc

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies.aggregation.collector import ReplyCollector
from strategies.aggregation.steps import RuleStep
from strategies.aggregation.strategy import AggregationStrategy
from strategies.core.update_matrix import ModelLayout, ReplyRows
from strategies.robust import rules
from tests.fakes import FakeGrid, error_reply, reply
from tests.strategies.aggregation.test_streamed_mean import SHAPES, arrays_of, flat, round_of


def well_separated(rng, num_clients, g):
    """Replies whose updates sit at distinct distances from a common point (distinct Krum scores)."""
    direction = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    return [
        [a + np.float32(0.5 * k + 0.01 * rng.standard_normal()) * d for a, d in zip(g, direction)]
        for k in range(num_clients)
    ]


@settings(max_examples=20, deadline=None)
@given(
    st.integers(0, 2**32 - 1),
    st.integers(5, 12),
    st.sampled_from(["krum", "multi-krum"]),
    st.lists(st.sampled_from(["nan", "inf", "shape", "error"]), max_size=2),
)
def test_streamed_krum_equals_the_matrix_path(seed, num_clients, name, faults):
    rng = np.random.default_rng(seed)
    g = arrays_of(rng, 3.0)
    replies = [reply(node, arrays_of(rng), 10) for node in range(1, num_clients + 1)]
    for node, fault in enumerate(faults, start=num_clients + 1):
        bad = arrays_of(rng)
        if fault == "nan":
            bad[0][1, 2] = np.nan
        elif fault == "inf":
            bad[3][0] = -np.inf
        elif fault == "shape":
            bad[2] = bad[2].reshape(-1)
        replies.insert(
            int(rng.integers(0, len(replies) + 1)), error_reply(node, "x") if fault == "error" else reply(node, bad)
        )
    params = {"f": 1} if name == "krum" else {"f": 1, "m": None}
    streamed = AggregationStrategy(RuleStep.builtin(name, params))
    matrix = AggregationStrategy(RuleStep.builtin(name, params), collector=ReplyCollector(max_update_norm=np.inf))
    assert streamed.streams_distances() and not matrix.streams_distances()
    (ours, metrics), (reference, reference_metrics) = round_of(streamed, g, replies), round_of(matrix, g, replies)
    assert dict(metrics).keys() == dict(reference_metrics).keys()
    assert metrics.get("rule-f") == reference_metrics.get("rule-f")
    assert streamed.rejections() == matrix.rejections()
    for a, b in zip(ours.to_numpy_ndarrays(), reference.to_numpy_ndarrays()):
        if name == "krum":  # the same row, read from the bytes as the matrix path writes it
            np.testing.assert_array_equal(a, b)
        else:  # sum_k c_k w_k - w instead of sum_k c_k (w_k - w): float32 rounding
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(4, 30), st.sampled_from([1.0, 1e3]))
def test_gram_distances_choose_the_rows_of_a_float64_reference(seed, num_clients, offset):
    """On well-separated rows (even with a large common component) the float32 Gram distances
    rank the rows as float64 distances from direct differences do, and agree to float32 rounding."""
    rng = np.random.default_rng(seed)
    g = arrays_of(rng)
    weights = well_separated(rng, num_clients, [a + np.float32(offset) for a in g])
    layout = ModelLayout.of(ArrayRecord(g))
    rows = ReplyRows([layout.views(ArrayRecord(w)) for w in weights], layout, flat(g))
    x = np.stack([flat(w) for w in weights]).astype(np.float64) - flat(g)
    reference = ((x[:, None, :] - x[None, :, :]) ** 2).sum(axis=2)
    distances = rules.distances_of_rows(rows)
    np.testing.assert_allclose(distances, reference, rtol=1e-4, atol=1e-6 * reference.max())
    neighbours = max(num_clients - 3, 1)
    np.testing.assert_array_equal(
        rules._krum_order(distances, neighbours)[:3], rules._krum_order(reference, neighbours)[:3]
    )


def test_rules_streamed_from_the_reply_bytes_allocate_no_update_matrix():
    """Krum and Multi-Krum (distances) and the median and trimmed mean (sorted column blocks)."""
    rng = np.random.default_rng(0)
    shapes = [(500, 1000), (1000,)]
    g = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    num_clients = 20
    replies = [
        reply(n, [a + np.float32(0.01) * rng.standard_normal(a.shape, np.float32) for a in g])
        for n in range(1, num_clients + 1)
    ]
    for name, params in (
        ("krum", {"f": 2}),
        ("multi-krum", {"f": 2, "m": None}),
        ("median", {}),
        ("trimmed-mean", {"beta": 0.2}),
    ):
        strategy = AggregationStrategy(RuleStep.builtin(name, params))
        list(strategy.configure_train(1, ArrayRecord(g), ConfigRecord({}), FakeGrid(range(num_clients), lambda m: m)))
        tracemalloc.start()
        arrays, _ = strategy.aggregate_train(1, replies)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert arrays is not None
        matrix_bytes = 4 * num_clients * sum(a.size for a in g)
        assert peak < matrix_bytes / 3, (name, peak, matrix_bytes)


def test_streamed_krum_falls_back_to_the_matrix_when_updates_overflow():
    g = [np.full(s, -3e38, np.float32) for s in SHAPES]
    replies = [reply(n, [np.full(s, 3e38, np.float32) for s in SHAPES], 1) for n in range(1, 4)]
    streamed = AggregationStrategy(RuleStep.builtin("krum", {"f": 0}))
    matrix = AggregationStrategy(RuleStep.builtin("krum", {"f": 0}), collector=ReplyCollector(max_update_norm=np.inf))
    (arrays, metrics), (reference, reference_metrics) = round_of(streamed, g, replies), round_of(matrix, g, replies)
    assert arrays is None and reference is None  # every update x - w overflows: all rejected, round skipped
    assert dict(metrics) == dict(reference_metrics)
    assert streamed.rejections() == matrix.rejections() != []
