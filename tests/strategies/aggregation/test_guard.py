"""GuardedStrategy: no unscreened train reply reaches Flower's strategies, a user's, or ours."""

from __future__ import annotations

import re

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedProx, FedYogi
from hypothesis import given, settings
from hypothesis import strategies as st

from fl_app.config.settings import Settings
from fl_app.server.round_loop import run_rounds
from strategies.aggregation.guard import GuardedStrategy
from strategies.aggregation.steps import ClientWeighting, RuleStep
from strategies.aggregation.strategy import AggregationStrategy, build_aggregation_strategy
from strategies.core.replies import num_examples
from strategies.core.reporting import RoundReporting
from strategies.private.dp_fedavg import build_dp_strategy
from tests.fakes import FakeGrid, error_reply, instruction, reply

SHAPES = [(3, 2), (2,)]
NODES = list(range(1, 40))


class UsersFedAvg(FedAvg):
    """A user's FedAvg subclass that remembers the replies it was given."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seen: list[Message] = []

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        self.seen = replies
        return super().aggregate_train(server_round, replies)


INNER = {
    "fedavg": lambda: FedAvg(min_available_nodes=1, min_train_nodes=1),
    "fedadam": lambda: FedAdam(eta=0.1, min_available_nodes=1, min_train_nodes=1),
    "subclass": lambda: UsersFedAvg(min_available_nodes=1, min_train_nodes=1),
}


def global_arrays():
    return [np.full(s, 0.5, np.float32) for s in SHAPES]


def trained(rng):
    return [(0.5 + 0.1 * rng.standard_normal(s)).astype(np.float32) for s in SHAPES]


def configured(strategy, arrays=None):
    grid = FakeGrid(NODES, lambda m: m)
    list(strategy.configure_train(1, ArrayRecord(arrays or global_arrays()), ConfigRecord({}), grid))
    return strategy


def content_reply(node, content: RecordDict) -> Message:
    return Message(content=content, reply_to=instruction(node))


def hostile(kind: str, node: int, rng) -> tuple[Message, str]:
    """A bad reply of ``kind`` from ``node`` and a fragment of the reason it must be rejected for."""
    good = trained(rng)
    if kind == "nan":
        good[0][1, 1] = np.nan
        return reply(node, good), "array '0' holds NaN or infinite values"
    if kind == "inf":
        good[1][0] = -np.inf
        return reply(node, good), "array '1' holds NaN or infinite values"
    if kind == "float64":
        return reply(node, [a.astype(np.float64) for a in good]), "is float64[3, 2], expected float32[3, 2]"
    if kind == "negative-examples":
        return reply(node, good, -5), "num-examples must be a positive number (a whole count of examples), got -5"
    if kind == "zero-examples":
        return reply(node, good, 0), "got 0"
    if kind == "fractional-examples":
        return reply(node, good, 2.5), "got 2.5"
    if kind == "nan-examples":
        return reply(node, good, float("nan")), "got nan"
    if kind == "wrong-shape":
        return reply(node, [good[0].reshape(-1), good[1]]), "expected float32[3, 2]"
    if kind == "missing-array":
        return reply(node, good[:1]), "expected ['0', '1']"
    if kind == "renamed":
        record = ArrayRecord(array_dict={"w": Array(good[0]), "b": Array(good[1])})
        return reply(node, record), "arrays are named ['w', 'b']"
    if kind == "two-array-records":
        content = RecordDict(
            {"a": ArrayRecord(good), "b": ArrayRecord(good), "metrics": MetricRecord({"num-examples": 10})}
        )
        return content_reply(node, content), "one ArrayRecord and one MetricRecord, got 2 and 1"
    if kind == "no-metrics":
        return content_reply(node, RecordDict({"arrays": ArrayRecord(good)})), "got 1 and 0"
    if kind == "no-num-examples":
        content = RecordDict({"arrays": ArrayRecord(good), "metrics": MetricRecord({"loss": 0.1})})
        return content_reply(node, content), "the MetricRecord has no 'num-examples'"
    raise AssertionError(kind)


HOSTILE = (
    "nan",
    "inf",
    "float64",
    "negative-examples",
    "zero-examples",
    "fractional-examples",
    "nan-examples",
    "wrong-shape",
    "missing-array",
    "renamed",
    "two-array-records",
    "no-metrics",
    "no-num-examples",
)


def reasons(lines: list[str]) -> dict[int, str]:
    out = {}
    for line in lines:
        match = re.fullmatch(r"node (\d+): rejected: (.+)", line)
        assert match, line
        out[int(match.group(1))] = match.group(2)
    return out


def flat(record: ArrayRecord) -> np.ndarray:
    return np.concatenate([a.ravel() for a in record.to_numpy_ndarrays()])


@pytest.mark.parametrize("name", sorted(INNER))
def test_each_bad_reply_is_removed_and_recorded_and_the_rest_aggregate_as_without_them(name):
    rng = np.random.default_rng(0)
    good = [reply(node, trained(rng), 10 * node) for node in (1, 2, 3)]
    bad = {node: hostile(kind, node, rng) for node, kind in enumerate(HOSTILE, start=10)}
    error = error_reply(40, "ClientAppException: out of memory")
    duplicate = reply(2, trained(rng), 1000)  # node 2 again: only its first reply counts
    replies = [good[0], bad[10][0], error, good[1], *(m for m, _ in list(bad.values())[1:]), duplicate, good[2]]

    guard = configured(GuardedStrategy(INNER[name]()))
    assert guard.screens
    arrays, _ = guard.aggregate_train(1, replies)

    found = reasons(guard.rejections())
    assert set(found) == {*bad, 2}  # every bad reply, and node 2's second one; not the error reply
    for node, (_, fragment) in bad.items():
        assert fragment in found[node], (node, found[node])
    assert "a second reply in the same round" in found[2]
    reference = configured(INNER[name]())
    expected, _ = reference.aggregate_train(1, [good[0], error, good[1], good[2]])
    assert np.isfinite(flat(arrays)).all()
    np.testing.assert_allclose(flat(arrays), flat(expected), rtol=1e-6)
    if name == "subclass":  # the very messages, in order, error reply included
        assert [id(m) for m in guard.inner.seen] == [id(good[0]), id(error), id(good[1]), id(good[2])]


def test_valid_replies_pass_unchanged_and_nothing_is_recorded():
    rng = np.random.default_rng(1)
    replies = [reply(node, trained(rng), node) for node in (1, 2, 3, 4)]
    guard = configured(GuardedStrategy(INNER["subclass"]()))
    arrays, _ = guard.aggregate_train(1, replies)
    assert guard.rejections() == [] and [id(m) for m in guard.inner.seen] == [id(m) for m in replies]
    expected, _ = configured(INNER["subclass"]()).aggregate_train(1, replies)
    np.testing.assert_array_equal(flat(arrays), flat(expected))


def test_the_guard_checks_against_the_arrays_of_the_current_round():
    rng = np.random.default_rng(2)
    guard = configured(GuardedStrategy(INNER["fedavg"]()), [np.zeros((4,), np.float32)])
    guard.aggregate_train(1, [reply(1, trained(rng))])
    assert "arrays are named ['0', '1']" in guard.rejections()[0]
    configured(guard)  # the next round sends the two-array model
    arrays, _ = guard.aggregate_train(2, [reply(1, trained(rng))])
    assert arrays is not None and guard.rejections() == []


def test_fedadam_keeps_a_float32_model_float32_so_float32_replies_stay_valid():
    """FedAdam steps in float64; without the cast every honest reply of round 2 would be rejected."""
    guard = GuardedStrategy(INNER["fedadam"]())
    arrays = ArrayRecord(global_arrays())
    for server_round in (1, 2, 3):
        list(guard.configure_train(server_round, arrays, ConfigRecord({}), FakeGrid(NODES, lambda m: m)))
        # clients train a float32 Keras model: their replies are float32 whatever they received
        replies = [
            reply(node, [(w + 0.1 * node).astype(np.float32) for w in arrays.to_numpy_ndarrays()]) for node in (1, 2)
        ]
        arrays, _ = guard.aggregate_train(server_round, replies)
        assert guard.rejections() == [] and {a.dtype for a in arrays.to_numpy_ndarrays()} == {np.dtype(np.float32)}
    assert np.isfinite(flat(arrays)).all() and not np.allclose(flat(arrays), 0.5)


def test_a_round_of_only_bad_replies_aggregates_nothing():
    rng = np.random.default_rng(3)
    for name in INNER:
        guard = configured(GuardedStrategy(INNER[name]()))
        arrays, _ = guard.aggregate_train(1, [hostile("nan", 1, rng)[0], hostile("float64", 2, rng)[0]])
        assert arrays is None and sorted(reasons(guard.rejections())) == [1, 2]


class BrokenStrategy(FedAvg):
    """A strategy that turns valid replies into NaN (e.g. an optimiser that overflowed)."""

    def aggregate_train(self, server_round, replies):
        arrays, metrics = super().aggregate_train(server_round, replies)
        return ArrayRecord([np.full_like(a, np.nan) for a in arrays.to_numpy_ndarrays()]), metrics


def answer(message: Message) -> Message:
    """A client that trains to ``global + 1`` (train) or reports accuracy 0.5 (evaluate)."""
    if message.metadata.message_type == "train":
        weights = [w + 1 for w in message.content["arrays"].to_numpy_ndarrays()]
        content = RecordDict({"arrays": ArrayRecord(weights), "metrics": MetricRecord({"num-examples": 5})})
    else:
        content = RecordDict({"metrics": MetricRecord({"num-examples": 5, "loss": 1.0, "accuracy": 0.5})})
    return Message(content=content, reply_to=message)


def test_a_strategy_that_makes_valid_replies_non_finite_keeps_the_model():
    guard = configured(GuardedStrategy(BrokenStrategy()))
    with pytest.raises(
        ValueError,
        match=r"BrokenStrategy aggregated the round's valid replies into NaN or infinite values \(array '0'\)",
    ):
        guard.aggregate_train(1, [reply(1, global_arrays())])
    arrays, history = run_rounds(
        FakeGrid([1, 2], answer),
        BrokenStrategy(min_available_nodes=2, min_train_nodes=2),
        ArrayRecord(global_arrays()),
        num_rounds=1,
        timeout=1.0,
    )
    assert [f for f in history[0].failures if f.startswith("aggregation: ")] == [
        "aggregation: ValueError(\"BrokenStrategy aggregated the round's valid replies into NaN or infinite "
        "values (array '0'); the global model is kept\")"
    ]
    np.testing.assert_array_equal(flat(arrays), 0.5)


def test_the_round_loop_guards_any_strategy_and_records_rejections():
    def nan_from_node_2(message: Message) -> Message:
        out = answer(message)
        if message.metadata.dst_node_id == 2 and message.metadata.message_type == "train":
            arrays = [np.full(s, np.nan, np.float32) for s in SHAPES]
            out = Message(
                content=RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord({"num-examples": 5})}),
                reply_to=message,
            )
        return out

    strategy = FedAvg(min_available_nodes=3, min_train_nodes=3, min_evaluate_nodes=3)
    arrays, history = run_rounds(
        FakeGrid([1, 2, 3], nan_from_node_2), strategy, ArrayRecord(global_arrays()), num_rounds=2
    )
    for record in history:
        assert record.failures == ["node 2: rejected: array '0' holds NaN or infinite values"]
    np.testing.assert_allclose(flat(arrays), 2.5)  # two rounds of +1 from the honest nodes


def test_our_strategy_validates_itself_so_the_guard_only_forwards(monkeypatch):
    import strategies.aggregation.guard as guard_module

    def no_screening(*args, **kwargs):
        raise AssertionError("the guard screened replies that our strategy validates")

    monkeypatch.setattr(guard_module, "screen_replies", no_screening)
    inner = AggregationStrategy(RuleStep.mean(), weighting=ClientWeighting("num-examples"))
    streamed = []
    original = inner.collector.stream_mean
    monkeypatch.setattr(inner.collector, "stream_mean", lambda *a: streamed.append(1) or original(*a))
    guard = configured(GuardedStrategy(inner))
    assert not guard.screens and guard._layout is None
    rng = np.random.default_rng(4)
    _, metrics = guard.aggregate_train(1, [reply(1, trained(rng)), hostile("nan", 2, rng)[0]])
    assert streamed == [1]  # the plain mean stays streamed from the reply bytes
    assert metrics["rejected-replies"] == 1 and guard.rejections() == inner.rejections()
    assert reasons(guard.rejections()) == {2: "the update holds NaN or infinite values"}


def test_our_strategy_rejects_a_second_reply_of_a_node_too():
    rng = np.random.default_rng(5)
    first, second = trained(rng), trained(rng)
    params = Settings(num_partitions=3, min_train_clients=1).aggregation_params()
    strategy = configured(build_aggregation_strategy("median", params))
    arrays, _ = strategy.aggregate_train(1, [reply(1, first), reply(1, second)])
    np.testing.assert_allclose(flat(arrays), np.concatenate([a.ravel() for a in first]), rtol=1e-6)
    assert reasons(strategy.rejections()) == {1: "a second reply in the same round (only the first counts)"}


def test_round_reporting_is_delegated_to_the_inner_strategy():
    config = Settings(strategy="dp-fedavg", num_partitions=4, dp_target_epsilon=1.0, min_train_clients=2)
    dp = build_dp_strategy(config.aggregation_params(), config.dp_params())
    for strategy in (dp, AggregationStrategy(RuleStep.mean()), GuardedStrategy(FedAvg())):
        assert isinstance(strategy, RoundReporting)
    assert not isinstance(FedAvg(), RoundReporting)
    guarded = GuardedStrategy(dp)
    assert guarded.min_train_replies == 0 and GuardedStrategy(FedAvg()).min_train_replies is None
    assert guarded.stop_reason is None
    dp.mechanism.stop_reason = "privacy budget: round 9 would exceed dp-target-epsilon"
    assert guarded.stop_reason == dp.stop_reason and GuardedStrategy(FedAvg()).stop_reason is None
    assert guarded.state_dict().keys() == dp.state_dict().keys()
    assert guarded.dp_mode == "central" and GuardedStrategy(AggregationStrategy(RuleStep.mean())).dp_mode is None
    assert GuardedStrategy(FedAvg()).dp_mode is None
    assert GuardedStrategy.around(guarded) is guarded
    with pytest.raises(ValueError, match="already guarded"):
        GuardedStrategy(guarded)


def test_flower_optimizer_state_goes_through_the_guard():
    guard = GuardedStrategy(FedAvgM(server_momentum=0.9))
    assert guard.state_dict() == {"momentum_vector": None}
    guard.load_state_dict({"momentum_vector": {"0": np.ones(2)}})
    np.testing.assert_array_equal(guard.inner.momentum_vector["0"], np.ones(2))
    with pytest.raises(ValueError, match=r"holds \['m_t', 'v_t'\] but strategy FedAvgM keeps \['momentum_vector'\]"):
        guard.load_state_dict({"m_t": None, "v_t": None})


@pytest.mark.parametrize(
    ("value", "ok"),
    [(10, True), (10.0, True), (1, True), (0, False), (-5, False), (2.5, False), (float("inf"), False), ([10], False)],
)
def test_num_examples_must_be_a_positive_whole_number(value, ok):
    metrics = MetricRecord({"num-examples": value})
    if ok:
        assert num_examples(metrics) == float(value)
    else:
        with pytest.raises(ValueError, match="num-examples must be a positive number"):
            num_examples(metrics)


def _ours(rule: str, **params):
    from strategies.aggregation.collector import ReplyCollector
    from strategies.robust.preaggregation import FixedNormBound

    def build():
        return AggregationStrategy(
            RuleStep.builtin(rule, params),
            bound=FixedNormBound(5.0) if rule != "mean" else None,
            collector=ReplyCollector(max_update_norm=1e3),
            min_available_nodes=1,
        )

    return build


def _dp(mode: str):
    def build():
        config = Settings(
            strategy="dp-fedavg", num_partitions=12, min_train_clients=1, min_available_clients=1, dp_mode=mode
        )
        return build_dp_strategy(config.aggregation_params(), config.dp_params())

    return build


FUZZED = {
    **INNER,
    "fedavgm": lambda: FedAvgM(min_available_nodes=1, min_train_nodes=1, server_momentum=0.9),
    "fedyogi": lambda: FedYogi(eta=0.1, min_available_nodes=1, min_train_nodes=1),
    "fedadagrad": lambda: FedAdagrad(eta=0.1, min_available_nodes=1, min_train_nodes=1),
    "fedprox": lambda: FedProx(proximal_mu=0.1, min_available_nodes=1, min_train_nodes=1),
    "ours-mean": lambda: AggregationStrategy(RuleStep.mean(), min_available_nodes=1),
    "ours-median": _ours("median"),
    "ours-trimmed-mean": _ours("trimmed-mean", beta=0.2),
    "ours-krum": _ours("krum", f=1),
    "ours-multi-krum": _ours("multi-krum", f=1, m=None),
    "ours-bulyan": _ours("bulyan", f=1),
    "ours-geometric-median": _ours("geometric-median"),
    "ours-centered-clipping": _ours("centered-clipping", tau=1.0, iterations=3),
    "dp-central": _dp("central"),
    "dp-local-gaussian": _dp("local-gaussian"),
}
"""Every kind of strategy the server can run: the fuzz below drives hostile replies into each."""


@settings(max_examples=150, deadline=None)
@given(
    st.sampled_from(sorted(FUZZED)),
    st.integers(0, 2**32 - 1),
    st.lists(st.sampled_from(("good", "error", "duplicate", *HOSTILE)), min_size=1, max_size=10),
)
def test_any_mix_of_replies_never_raises_and_keeps_the_model_finite(name, seed, kinds):
    rng = np.random.default_rng(seed)
    guard = configured(GuardedStrategy(FUZZED[name]()))
    replies, good_nodes, bad_nodes = [], set(), set()
    for node, kind in enumerate(kinds, start=1):
        if kind == "good":
            replies.append(reply(node, trained(rng), int(rng.integers(1, 50))))
            good_nodes.add(node)
        elif kind == "error":
            replies.append(error_reply(node, "crashed"))
        elif kind == "duplicate":
            first = int(rng.integers(1, node + 1))
            replies.append(reply(first, trained(rng)))
            bad_nodes.add(first)  # a second reply of `first`, or the first of its own if node == first
        else:
            replies.append(hostile(kind, node, rng)[0])
            bad_nodes.add(node)
    arrays, _ = guard.aggregate_train(1, replies)
    rejected = reasons(guard.rejections())  # every line names a node
    assert set(rejected) <= bad_nodes | good_nodes
    assert not set(rejected) & (good_nodes - bad_nodes)  # a good first reply is never rejected
    if arrays is not None:
        assert np.isfinite(flat(arrays)).all()
