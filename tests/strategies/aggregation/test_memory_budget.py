"""The update matrix is sized by the valid replies, capped by a memory budget, and shrinks."""

import tracemalloc

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord

from strategies.aggregation.collector import ReplyCollector
from strategies.aggregation.steps import RuleStep
from strategies.aggregation.strategy import AggregationStrategy
from strategies.core.update_matrix import UpdateBuffer
from tests.fakes import FakeGrid, reply


def started(collector, size):
    collector.start_round(ArrayRecord([np.zeros(size, np.float32)]))
    return collector


def test_thousands_of_malformed_replies_allocate_no_matrix():
    collector = started(ReplyCollector(max_update_norm=1e9), 1_000_000)  # 4 MB per row
    replies = [reply(node, ArrayRecord([np.zeros(3, np.float32)])) for node in range(2000)]
    tracemalloc.start()
    collected = collector.collect(1, replies)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert collected.count == 0 and len(collected.rejections) == 2000
    assert peak < 64 * 2**20  # the old sizing by all replies asked for 2000 x 4 MB = 8 GB
    assert collector._buffer.capacity == 0


def test_replies_beyond_the_budget_are_dropped_not_counted_as_faults():
    size = 1024  # 4 KiB per row; a budget of 3 rows
    collector = started(ReplyCollector(memory_budget_gb=3 * 4 * size / 2**30), size)
    assert collector.max_rows == 3
    replies = [reply(node, [np.full(size, node, np.float32)]) for node in range(1, 6)]
    collected = collector.collect(1, replies)
    assert collected.node_ids == [1, 2, 3] and collected.rejections == []
    assert [line.split(":")[0] for line in collected.dropped] == ["node 4", "node 5"]
    assert "exceed the server's memory budget" in collected.dropped[0]
    assert collector.faults(collected) == 0 and collector.measurements(collected)["dropped-replies"] == 2
    assert collector.rejections() == collected.dropped


def test_the_buffer_shrinks_when_rounds_get_smaller():
    buffer = UpdateBuffer()
    assert buffer.rows(10, 8).shape == (10, 8) and buffer.capacity == 10
    buffer.rows(6, 8)
    assert buffer.capacity == 10  # within a factor of two: reused
    buffer.rows(2, 8)
    assert buffer.capacity == 2


def test_a_strategy_with_a_budget_aggregates_what_fits():
    size = 256
    strategy = AggregationStrategy(
        RuleStep.builtin("median"),
        # a norm limit reads single updates, so the median builds the matrix (else it streams: below)
        collector=ReplyCollector(memory_budget_gb=2 * 4 * size / 2**30, max_update_norm=np.inf),
    )
    assert not strategy.streams_sorted_columns()
    g = [np.zeros(size, np.float32)]
    list(strategy.configure_train(1, ArrayRecord(g), ConfigRecord({}), FakeGrid(range(5), lambda m: m)))
    arrays, metrics = strategy.aggregate_train(1, [reply(n, [np.full(size, n, np.float32)]) for n in (1, 3, 100)])
    assert metrics["accepted-replies"] == 2 and metrics["dropped-replies"] == 1
    np.testing.assert_allclose(arrays.to_numpy_ndarrays()[0], 2.0)  # median of 1 and 3


def test_a_streamed_median_needs_no_matrix_and_so_drops_nothing():
    size = 256
    strategy = AggregationStrategy(
        RuleStep.builtin("median"), collector=ReplyCollector(memory_budget_gb=2 * 4 * size / 2**30)
    )
    assert strategy.streams_sorted_columns()
    g = [np.zeros(size, np.float32)]
    list(strategy.configure_train(1, ArrayRecord(g), ConfigRecord({}), FakeGrid(range(5), lambda m: m)))
    arrays, metrics = strategy.aggregate_train(1, [reply(n, [np.full(size, n, np.float32)]) for n in (1, 3, 100)])
    assert metrics["accepted-replies"] == 3 and "dropped-replies" not in metrics
    np.testing.assert_allclose(arrays.to_numpy_ndarrays()[0], 3.0)  # median of 1, 3 and 100
