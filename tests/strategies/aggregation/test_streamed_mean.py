"""The fast paths of update collection: header-compare views and the mean streamed from the replies.

Each must give what the matrix path (collect_updates + the rule) gives, including rejections.
"""

import io

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.common.constant import SType
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies.aggregation.collector import ReplyCollector
from strategies.aggregation.steps import ClientWeighting, RuleStep
from strategies.aggregation.strategy import AggregationStrategy
from strategies.core.update_matrix import ModelLayout, UpdateBuffer, collect_updates, stream_weighted_mean
from strategies.robust.rules import weighted_mean
from tests.fakes import FakeGrid, error_reply, reply

SHAPES = [(4, 3), (3,), (3, 2), (2,)]


def arrays_of(rng, scale=1.0):
    return [(scale * rng.standard_normal(s)).astype(np.float32) for s in SHAPES]


def flat(arrays):
    return np.concatenate([np.asarray(a).ravel() for a in arrays])


def npy_v2(array: np.ndarray) -> Array:
    """The array serialised as .npy format version 2.0: a valid header unlike the global one."""
    stream = io.BytesIO()
    np.lib.format.write_array(stream, array, version=(2, 0))
    return Array(dtype=str(array.dtype), shape=tuple(array.shape), stype=SType.NUMPY, data=stream.getvalue())


def insert_faulty_replies(rng, replies: list, faults: list[str], num_examples: int = 10) -> list:
    """``replies`` with one more reply per fault, each at a random position, from the next node ids:
    ``nan``, ``inf``, ``-inf`` (one such value in its arrays), ``shape`` (an array flattened),
    ``error`` (an error reply), ``count`` (0 examples); the others report ``num_examples``."""
    for node, fault in enumerate(faults, start=len(replies) + 1):
        bad = arrays_of(rng)
        if fault == "nan":
            bad[0][1, 2] = np.nan
        elif fault == "inf":
            bad[3][0] = np.inf
        elif fault == "-inf":
            bad[1][0] = -np.inf
        elif fault == "shape":
            bad[2] = bad[2].reshape(-1)
        faulty = (
            error_reply(node, "crashed")
            if fault == "error"
            else reply(node, bad, 0 if fault == "count" else num_examples)
        )
        replies.insert(int(rng.integers(0, len(replies) + 1)), faulty)
    return replies


def round_of(strategy, global_arrays, replies):
    list(strategy.configure_train(1, ArrayRecord(global_arrays), ConfigRecord({}), FakeGrid(range(20), lambda m: m)))
    return strategy.aggregate_train(1, replies)


def test_views_read_the_bytes_without_copy_and_parse_other_headers():
    rng = np.random.default_rng(0)
    g, w = arrays_of(rng), arrays_of(rng)
    layout = ModelLayout.of(ArrayRecord(g))
    assert all(layout.headers)
    record = ArrayRecord(w)
    views = layout.views(record)
    assert all(not v.flags.writeable for v in views)  # views of the received bytes
    np.testing.assert_array_equal(np.concatenate(views), flat(w))
    other = ArrayRecord(array_dict={k: npy_v2(a) for k, a in zip(record.keys(), w)})
    np.testing.assert_array_equal(np.concatenate(layout.views(other)), flat(w))
    wrong = ArrayRecord(array_dict={k: npy_v2(a.astype(np.float64)) for k, a in zip(record.keys(), w)})
    with pytest.raises(ValueError, match="float64"):
        layout.views(wrong)


@pytest.mark.filterwarnings("ignore:overflow encountered")
def test_overflowing_squares_are_not_mistaken_for_infinity():
    g = [np.zeros(s, np.float32) for s in SHAPES]
    huge = [np.full(s, 1e30, np.float32) for s in SHAPES]
    collected = collect_updates([reply(1, huge, 1)], ModelLayout.of(ArrayRecord(g)), flat(g), UpdateBuffer())
    assert collected.node_ids == [1]


@settings(max_examples=25, deadline=None)
@given(
    st.integers(0, 2**32 - 1),
    st.integers(1, 8),
    st.sampled_from(["num-examples", "uniform", "capped"]),
    st.lists(st.sampled_from(["nan", "inf", "-inf", "shape", "error", "count"]), max_size=3),
)
def test_streamed_mean_equals_the_matrix_path(seed, num_clients, weighting, faults):
    rng = np.random.default_rng(seed)
    g = arrays_of(rng, 3.0)
    replies = [reply(node, arrays_of(rng), int(rng.integers(1, 100))) for node in range(1, num_clients + 1)]
    insert_faulty_replies(rng, replies, faults, num_examples=5)
    layout = ModelLayout.of(ArrayRecord(g))
    weigh = ClientWeighting(weighting)
    matrix = collect_updates(replies, layout, flat(g), UpdateBuffer())
    streamed, mean = stream_weighted_mean(replies, layout, flat(g), weigh, np.empty(layout.size, np.float32))
    assert streamed.updates is None
    assert streamed.node_ids == matrix.node_ids
    assert streamed.rejections == matrix.rejections
    np.testing.assert_array_equal(streamed.num_examples, matrix.num_examples)
    expected = weighted_mean(matrix.updates, weigh(matrix.num_examples))
    np.testing.assert_allclose(mean, expected, rtol=1e-5, atol=1e-5)


def test_strategy_streams_only_a_plain_mean_and_gives_the_same_model():
    rng = np.random.default_rng(1)
    g = arrays_of(rng)
    replies = [reply(n, arrays_of(rng), n * 7) for n in range(1, 6)]
    replies.append(reply(6, [np.full(s, np.nan, np.float32) for s in SHAPES], 3))
    plain = AggregationStrategy(RuleStep.mean(), weighting=ClientWeighting("num-examples"))
    assert plain.streams_mean()
    bounded = AggregationStrategy(
        RuleStep.mean(), weighting=ClientWeighting("num-examples"), collector=ReplyCollector(max_update_norm=1e9)
    )
    assert not bounded.streams_mean()
    ours, metrics = round_of(plain, g, replies)
    reference, reference_metrics = round_of(bounded, g, replies)
    for a, b in zip(ours.to_numpy_ndarrays(), reference.to_numpy_ndarrays()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    assert metrics["rejected-replies"] == reference_metrics["rejected-replies"] == 1
    assert plain.rejections() == bounded.rejections()


def test_strategy_falls_back_to_the_matrix_when_the_streamed_mean_overflows():
    g = [np.full(s, -3e38, np.float32) for s in SHAPES]
    replies = [reply(n, [np.full(s, 3e38, np.float32) for s in SHAPES], 1) for n in range(1, 4)]
    layout = ModelLayout.of(ArrayRecord(g))
    assert (
        stream_weighted_mean(replies, layout, flat(g), lambda c: np.ones(len(c)), np.empty(layout.size, np.float32))
        is None
    )
    streamed = AggregationStrategy(RuleStep.mean())
    matrix = AggregationStrategy(RuleStep.mean(), collector=ReplyCollector(max_update_norm=np.inf))
    assert streamed.streams_mean() and not matrix.streams_mean()
    (arrays, metrics), (reference, reference_metrics) = round_of(streamed, g, replies), round_of(matrix, g, replies)
    assert arrays is None and reference is None  # every update x - w overflows: all rejected, round skipped
    assert dict(metrics) == dict(reference_metrics)
    assert streamed.rejections() == matrix.rejections()


def test_unflatten_writes_the_bytes_np_save_writes():
    rng = np.random.default_rng(2)
    arrays = [*arrays_of(rng), np.array(1.5, np.float32), np.zeros((0, 3), np.float32)]
    layout = ModelLayout.of(ArrayRecord(arrays))
    record = layout.unflatten(flat(arrays))
    for ours, array in zip(record.values(), arrays):
        expected = Array(array)
        assert (ours.data, ours.dtype, tuple(ours.shape), ours.stype) == (
            expected.data,
            expected.dtype,
            tuple(expected.shape),
            expected.stype,
        )
