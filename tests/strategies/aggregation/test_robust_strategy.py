"""AggregationStrategy and update collection: validation, rules, bounds, server step, state."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import FedAvg

from fl_app.config.settings import Settings
from strategies.aggregation.steps import ClientWeighting, RuleStep, ServerStep
from strategies.aggregation.strategy import AggregationStrategy, build_aggregation_strategy
from strategies.core.update_matrix import ModelLayout, UpdateBuffer, collect_updates
from strategies.registry import ROBUST_STRATEGIES, build_strategy
from strategies.robust.preaggregation import FixedNormBound, QuantileNormBound
from strategies.robust.rules import coordinate_median
from tests.fakes import FakeGrid, error_reply, reply, settings_of

SHAPES = [(3, 2), (2,)]
RNG = np.random.default_rng(0)


def weights_like(scale=1.0, offset=0.0):
    return [(offset + scale * RNG.standard_normal(s)).astype(np.float32) for s in SHAPES]


def flat(arrays):
    return np.concatenate([np.asarray(a).ravel() for a in arrays])


def run_round(strategy, global_arrays, replies):
    record = ArrayRecord(global_arrays)
    grid = FakeGrid(range(max(10, len(replies))), lambda m: m)
    list(strategy.configure_train(1, record, ConfigRecord({}), grid))
    return strategy.aggregate_train(1, replies)


def test_collect_updates_rejects_bad_replies_with_node_ids():
    g = weights_like()
    good = weights_like()
    replies = [
        reply(1, good, 10),
        reply(2, [np.full((3, 2), np.nan, np.float32), g[1]], 10),
        reply(3, [g[0].reshape(-1), g[1]], 10),
        reply(4, [g[0].astype(np.float64), g[1]], 10),
        reply(5, [g[0]], 10),
        reply(6, good, -3),
        reply(7, good, float("nan")),
        error_reply(8, "ClientAppException: data file missing"),
        reply(9, [g[0] + 1000, g[1]], 10),
    ]
    layout = ModelLayout.of(ArrayRecord(g))
    collected = collect_updates(replies, layout, flat(g), UpdateBuffer(), max_norm=100.0)
    assert collected.node_ids == [1]
    np.testing.assert_allclose(collected.updates[0], flat(good) - flat(g), rtol=1e-6)
    reasons = dict(line.split(": ", 1) for line in collected.rejections)
    assert "NaN or infinite" in reasons["node 2"]
    assert "expected float32[3, 2]" in reasons["node 3"]
    assert "float64" in reasons["node 4"]
    assert "2 arrays" in reasons["node 5"] or "expected" in reasons["node 5"]
    assert "num-examples must be a positive number" in reasons["node 6"]
    assert "num-examples must be a positive number" in reasons["node 7"]
    assert "data file missing" in reasons["node 8"]
    assert "exceeds max-update-norm" in reasons["node 9"]


def test_forged_npy_header_is_rejected_without_allocating():
    g = weights_like()
    real = Array(g[0])
    forged = Array(
        dtype=real.dtype,
        shape=(10**12,),
        stype=real.stype,
        data=real.data.replace(b"(3, 2)", b"(10**12,)"[:0] + b"(999999999999,)"),
    )
    record = ArrayRecord(array_dict={"0": forged, "1": Array(g[1])})
    collected = collect_updates([reply(1, record)], ModelLayout.of(ArrayRecord(g)), flat(g), UpdateBuffer())
    assert collected.count == 0 and "node 1" in collected.rejections[0]


def test_mean_with_example_weights_equals_flower_fedavg():
    g = weights_like()
    clients = [weights_like() for _ in range(4)]
    counts = [5, 10, 20, 40]
    replies = [reply(i, w, n) for i, (w, n) in enumerate(zip(clients, counts))]
    ours, metrics = run_round(
        AggregationStrategy(RuleStep.mean(), weighting=ClientWeighting("num-examples")), g, replies
    )
    flower, _ = FedAvg().aggregate_train(1, replies)
    for a, b in zip(ours.to_numpy_ndarrays(), flower.to_numpy_ndarrays()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert metrics["accepted-replies"] == 4 and metrics["rejected-replies"] == 0


def test_median_strategy_ignores_a_huge_attacker_and_a_nan_client():
    g = weights_like()
    honest = [weights_like(0.1) for _ in range(4)]
    replies = [reply(i, w) for i, w in enumerate(honest)]
    replies.append(reply(10, [a + 1e6 for a in g]))
    replies.append(reply(11, [np.full(s, np.nan, np.float32) for s in SHAPES]))
    new, metrics = run_round(AggregationStrategy(RuleStep.builtin("median")), g, replies)
    result = flat(new.to_numpy_ndarrays())
    stacked = np.stack([flat(w) for w in honest])
    assert np.all(result >= stacked.min(0) - 1e-6) and np.all(result <= stacked.max(0) + 1e-6)
    assert metrics["rejected-replies"] == 1 and metrics["accepted-replies"] == 5


def test_round_with_too_few_replies_for_krum_is_skipped():
    strategy = build_aggregation_strategy(
        "krum", settings_of({"krum-f": 1, "num-partitions": 5, "min-train-clients": 5}).aggregation_params()
    )
    g = weights_like()
    new, metrics = run_round(strategy, g, [reply(i, weights_like()) for i in range(3)])
    assert new is None and metrics["round-skipped"] == 1


def test_startup_check_names_the_key():
    with pytest.raises(ValueError, match="bulyan-f=1 requires 7 clients, got 5"):
        build_aggregation_strategy("bulyan", settings_of({"bulyan-f": 1, "num-partitions": 5}).aggregation_params())


def test_norm_bound_limits_a_scaled_update():
    g = weights_like()
    honest = [[a + 0.01 for a in g] for _ in range(3)]
    attacker = [a + 50.0 for a in g]
    strategy = AggregationStrategy(RuleStep.mean(), bound=FixedNormBound(1.0))
    new, metrics = run_round(strategy, g, [reply(i, w) for i, w in enumerate([*honest, attacker])])
    assert np.linalg.norm(flat(new.to_numpy_ndarrays()) - flat(g)) <= 0.25 + 0.75 * 0.01 * np.sqrt(8) + 1e-5
    assert metrics["bounded-replies"] == 1


def test_adaptive_norm_bound_moves_and_round_trips():
    strategy = AggregationStrategy(RuleStep.mean(), bound=QuantileNormBound(0.5, 1.0))
    g = weights_like()
    run_round(strategy, g, [reply(i, [a + 5.0 for a in g]) for i in range(4)])
    bound = strategy.state_dict()["norm-bound"]["bound"]
    assert bound > 1.0
    other = AggregationStrategy(RuleStep.mean(), bound=QuantileNormBound(0.5, 1.0))
    other.load_state_dict(strategy.state_dict())
    assert other.bound.bound == bound


def test_server_momentum_accumulates():
    strategy = AggregationStrategy(RuleStep.mean(), server_step=ServerStep(1.0, 0.5))
    g = [np.zeros(s, np.float32) for s in SHAPES]
    step = [np.ones(s, np.float32) for s in SHAPES]
    first, _ = run_round(strategy, g, [reply(0, step)])
    second, _ = run_round(strategy, g, [reply(0, step)])  # same global and update: m = 0.5 * 1 + 1
    assert np.allclose(flat(first.to_numpy_ndarrays()), 1.0)
    assert np.allclose(flat(second.to_numpy_ndarrays()), 1.5)
    assert np.allclose(strategy.state_dict()["momentum"], 1.5)


def test_client_weights():
    n = np.array([10.0, 20.0, 1e9])
    assert np.array_equal(ClientWeighting("uniform")(n), [1, 1, 1])
    assert np.array_equal(ClientWeighting("num-examples")(n), n)
    assert np.array_equal(ClientWeighting("capped", 2.0)(n), [10, 20, 40])
    with pytest.raises(ValueError, match="client-weighting must be one of"):
        ClientWeighting("trusting")
    with pytest.raises(ValueError, match="weight-cap-ratio must be > 0"):
        ClientWeighting("capped", 0.0)


def test_every_robust_name_builds():
    config = {"num-partitions": 20, "min-train-clients": 20, "krum-f": 2, "bulyan-f": 2}
    for name in ROBUST_STRATEGIES:
        assert isinstance(build_strategy(name, settings_of(config).strategy_params()), AggregationStrategy)


def test_user_rule_by_dotted_path():
    params = settings_of().aggregation_params()
    strategy = build_aggregation_strategy("strategies.robust.rules:coordinate_median", params)
    assert strategy.rule.rule is coordinate_median
    with pytest.raises(ValueError, match="aggregation-rule must be one of"):
        build_aggregation_strategy("avg", params)


def test_rule_params_come_from_the_settings():
    params = settings_of({"krum-f": 2, "multi-krum-m": 0, "trimmed-mean-beta": 0.1}).aggregation_params()
    assert params.rules.of_rule("multi-krum") == {"f": 2, "m": None}  # 0: n - f per round
    assert params.rules.of_rule("trimmed-mean") == {"beta": 0.1}
    assert params.rules.of_rule("mean") == {}
    strategy = build_aggregation_strategy("krum", params)
    assert strategy.rule.params == {"f": 2} and strategy.weighting.name == params.weighting


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        ({"trimmed-mean-beta": 0.5}, "trimmed-mean-beta must be in [0, 0.5), got 0.5"),
        ({"krum-f": -2}, "krum-f must be >= 0, got -2"),  # -1 derives f from byzantine-fraction
        ({"centered-clipping-tau": 0.0}, "centered-clipping-tau must be > 0, got 0.0"),
        ({"client-weighting": "trusting"}, "client-weighting must be one of uniform, num-examples, capped; got"),
        ({"norm-bound-quantile": 1.5}, "norm-bound-quantile must be in [0, 1] (0: off), got 1.5"),
        ({"server-momentum": 1.0}, "server-momentum must be in [0, 1), got 1.0"),
        ({"aggregation-threads": -1}, "aggregation-threads must be >= 0, got -1"),
        ({"min-train-clients": 0}, "min-train-clients must be >= 1, got 0"),
    ],
)
def test_typed_params_name_key_value_and_allowed(config, fragment):
    # built without Settings.parse, whose ranges would refuse these first: the typed parameters
    # check their values themselves, for any caller of the strategies
    unchecked = Settings(**{key.replace("-", "_"): value for key, value in config.items()})
    with pytest.raises(ValueError) as err:
        unchecked.aggregation_params()
    assert fragment in str(err.value)


def test_blas_threads_default_to_the_cores_of_the_server_process():
    import os

    from strategies.core.blas_threads import server_cores

    assert server_cores() == len(os.sched_getaffinity(0))
    assert AggregationStrategy(RuleStep.mean()).blas_threads == server_cores()
    for threads, expected in ((0, server_cores()), (3, 3)):
        params = Settings.from_run_config({"aggregation-threads": threads}).aggregation_params()
        assert build_aggregation_strategy("mean", params).blas_threads == expected
