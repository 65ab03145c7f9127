"""Krum, Multi-Krum and Bulyan computed from the reply bytes (a Gram matrix of column blocks, no
K x P matrix).

They must give what the matrix path (collect_updates + the rule) gives, including rejections, and
choose the rows that float64 distances computed from direct differences choose.
"""

import tracemalloc

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies.aggregation.collector import ReplyCollector
from strategies.aggregation.steps import RuleStep
from strategies.aggregation.strategy import AggregationStrategy
from strategies.core.update_matrix import ModelLayout, ReplyRows
from strategies.robust import rules
from tests.fakes import FakeGrid, reply
from tests.strategies.aggregation.test_streamed_mean import SHAPES, arrays_of, flat, insert_faulty_replies, round_of


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
    st.sampled_from(["krum", "multi-krum", "bulyan"]),
    st.lists(st.sampled_from(["nan", "inf", "-inf", "shape", "error"]), max_size=2),
)
def test_streamed_krum_equals_the_matrix_path(seed, num_clients, name, faults):
    rng = np.random.default_rng(seed)
    g = arrays_of(rng, 3.0)
    replies = [reply(node, arrays_of(rng), 10) for node in range(1, num_clients + 1)]
    insert_faulty_replies(rng, replies, faults)
    params = {"f": 1, "m": None} if name == "multi-krum" else {"f": 1}
    streamed = AggregationStrategy(RuleStep.builtin(name, params))
    matrix = AggregationStrategy(RuleStep.builtin(name, params), collector=ReplyCollector(max_update_norm=np.inf))
    assert streamed.streams_distances() and not matrix.streams_distances()
    (ours, metrics), (reference, reference_metrics) = round_of(streamed, g, replies), round_of(matrix, g, replies)
    assert dict(metrics).keys() == dict(reference_metrics).keys()
    assert metrics.get("rule-f") == reference_metrics.get("rule-f")
    assert streamed.rejections() == matrix.rejections()
    assert (ours is None) == (reference is None)  # Bulyan with f = 1 needs 7 valid replies
    if ours is None:
        return
    # Krum: the same row, read from the bytes as the matrix path writes it; Bulyan with f > 0: the
    # same sorted float32 values of the same rows
    exact = name == "krum" or (name == "bulyan" and metrics.get("rule-f", 1) > 0)
    for a, b in zip(ours.to_numpy_ndarrays(), reference.to_numpy_ndarrays()):
        if exact:
            np.testing.assert_array_equal(a, b)
        else:  # sum_k c_k w_k - w instead of sum_k c_k (w_k - w): float32 rounding
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(0, 3), st.integers(0, 5), st.integers(1, 3000), st.integers(1, 3))
def test_bulyan_of_rows_equals_the_matrix_bulyan(seed, f, extra, size, num_arrays):
    """On the matrix's rows and on the replies' bytes, over 1024-column blocks (P not a multiple of
    the block width) and arrays that split the blocks anywhere."""
    rng = np.random.default_rng(seed)
    num_clients = 4 * f + 3 + extra
    cuts = np.sort(rng.choice(np.arange(1, size), min(num_arrays - 1, size - 1), replace=False))
    g = [rng.standard_normal(n).astype(np.float32) for n in np.diff([0, *cuts, size])]
    weights = [[a + rng.standard_normal(a.shape).astype(np.float32) for a in g] for _ in range(num_clients)]
    weights[:f] = [[a + np.float32(30.0) for a in w] for w in weights[:f]]  # far rows for the selection
    layout = ModelLayout.of(ArrayRecord(g))
    replies = ReplyRows([layout.views(ArrayRecord(w)) for w in weights], layout, flat(g))
    updates = np.stack([flat(w) for w in weights]) - flat(g)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(rules, "_BLOCK_BYTES", 1)  # 1024-column blocks
        expected = rules.bulyan(updates, np.ones(num_clients), f)
        matrix = rules.MatrixRows(updates)
        np.testing.assert_array_equal(rules.bulyan_of_rows(matrix, rules.distances_of_rows(matrix), f), expected)
        streamed = rules.bulyan_of_rows(replies, rules.distances_of_rows(replies), f)
    if f == 0:  # the mean: sum_k c_k w_k - w instead of sum_k c_k (w_k - w), float32 rounding
        np.testing.assert_allclose(streamed, expected, rtol=1e-5, atol=1e-6)
    else:  # the same float32 values, the same distances, rows and sorted blocks
        np.testing.assert_array_equal(streamed, expected)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_streamed_bulyan_rejects_a_non_finite_reply_and_aggregates_the_others(value):
    rng = np.random.default_rng(4)
    g = arrays_of(rng, 3.0)
    honest = [arrays_of(rng) for _ in range(11)]
    bad = arrays_of(rng)
    bad[0][1, 2] = value
    replies = [reply(node, w) for node, w in enumerate(honest, start=1)]
    replies.insert(5, reply(99, bad))
    strategy = AggregationStrategy(RuleStep.builtin("bulyan", {"f": 2}))
    assert strategy.streams_distances()
    arrays, metrics = round_of(strategy, g, replies)
    assert strategy.rejections() == ["node 99: rejected: the update holds NaN or infinite values"]
    assert metrics["rule-f"] == 1  # the rejected reply was one of the f = 2 faulty clients
    assert metrics["accepted-replies"] == 11 and metrics["rejected-replies"] == 1
    others = np.stack([flat(w) for w in honest]) - flat(g)
    np.testing.assert_array_equal(
        flat(arrays.to_numpy_ndarrays()), flat(g) + rules.bulyan(others, np.ones(len(others)), f=1)
    )


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
    """Krum, Multi-Krum and Bulyan (distances) and the median and trimmed mean (sorted column blocks)."""
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
        ("bulyan", {"f": 2}),
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


@pytest.mark.parametrize("name", ["krum", "bulyan"])
def test_streamed_krum_falls_back_to_the_matrix_when_updates_overflow(name):
    g = [np.full(s, -3e38, np.float32) for s in SHAPES]
    replies = [reply(n, [np.full(s, 3e38, np.float32) for s in SHAPES], 1) for n in range(1, 4)]
    streamed = AggregationStrategy(RuleStep.builtin(name, {"f": 0}))
    matrix = AggregationStrategy(RuleStep.builtin(name, {"f": 0}), collector=ReplyCollector(max_update_norm=np.inf))
    (arrays, metrics), (reference, reference_metrics) = round_of(streamed, g, replies), round_of(matrix, g, replies)
    assert arrays is None and reference is None  # every update x - w overflows: all rejected, round skipped
    assert dict(metrics) == dict(reference_metrics)
    assert streamed.rejections() == matrix.rejections() != []
