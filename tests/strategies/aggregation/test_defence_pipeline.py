"""Pre-aggregation steps, weak-DP noise and centered clipping's carried centre inside
AggregationStrategy, built from the run config."""

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord

from fl_app.config.settings import Settings, SettingsError
from strategies.aggregation.steps import CenteredClippingStep, RuleStep
from strategies.aggregation.strategy import AggregationStrategy, build_aggregation_strategy
from strategies.private.dp_fedavg import build_dp_strategy
from strategies.robust import preaggregation as pre
from strategies.robust.rules import centered_clipping, coordinate_median
from strategies.robust.weak_dp import WeakDpNoise
from tests.fakes import FakeGrid, reply

SHAPES = [(3, 2), (2,)]


def flat(arrays):
    return np.concatenate([np.asarray(a).ravel() for a in arrays])


def unflat(vector):
    return [vector[:6].reshape(3, 2).astype(np.float32), vector[6:].astype(np.float32)]


def run_round(strategy, global_vector, updates, server_round=1):
    record = ArrayRecord(unflat(global_vector))
    grid = FakeGrid(range(max(10, len(updates))), lambda m: m)
    list(strategy.configure_train(server_round, record, ConfigRecord({}), grid))
    replies = [reply(i, unflat(global_vector + u)) for i, u in enumerate(updates)]
    arrays, metrics = strategy.aggregate_train(server_round, replies)
    return (None if arrays is None else flat(arrays.to_numpy_ndarrays())), metrics


def strategy_of(**run_config):
    config = {"num-partitions": 10, "min-train-clients": 10, "min-available-clients": 10, **run_config}
    settings = Settings.from_run_config(config)
    return build_aggregation_strategy(settings.aggregation_rule, settings.aggregation_params())


def test_nnm_then_median_runs_the_steps_in_order_and_reports_them():
    strategy = strategy_of(**{"aggregation-rule": "median", "pre-aggregation": "nnm,arc", "pre-aggregation-f": 2})
    assert [type(step) for step in strategy.pre_aggregation] == [pre.NearestNeighbourMixing, pre.AdaptiveRobustClipping]
    assert not strategy.streams_mean()
    updates = np.random.default_rng(0).standard_normal((10, 8)).astype(np.float32)
    updates[:2] = 1e4  # two attackers
    new_global, metrics = run_round(strategy, np.zeros(8, np.float32), updates)
    mixed = pre.nearest_neighbour_mixing(updates, 2)
    pre.adaptive_robust_clipping(mixed, 2)
    np.testing.assert_allclose(new_global, coordinate_median(mixed, np.ones(10)), rtol=1e-5, atol=1e-6)
    assert metrics["nnm-f"] == 2 and metrics["arc-clipped-replies"] >= 2
    assert np.abs(new_global).max() < 5  # the attackers' 1e4 never reaches the model


def test_bucketing_shrinks_the_rows_the_rule_must_handle():
    with pytest.raises(SettingsError, match="Krum needs more than 2\\*krum-f \\+ 2 clients"):
        Settings.from_run_config(
            {
                "num-partitions": 10,
                "min-train-clients": 10,
                "strategy": "krum",
                "krum-f": 2,
                "pre-aggregation": "bucketing",
                "bucketing-size": 2,  # 5 buckets: Krum with f = 2 needs 7
            }
        )
    strategy = strategy_of(**{"aggregation-rule": "krum", "krum-f": 1, "pre-aggregation": "bucketing"})
    _, metrics = run_round(strategy, np.zeros(8, np.float32), np.ones((10, 8), np.float32))
    assert metrics["buckets"] == 5
    assert strategy._cannot_aggregate(9) == ""  # 5 buckets > 2 f + 2
    assert "too few for krum" in strategy._cannot_aggregate(8)  # 4 buckets


def test_pre_aggregation_keys_are_checked_when_the_settings_are_read():
    with pytest.raises(SettingsError, match="pre-aggregation must be a comma-separated list"):
        Settings.from_run_config({"pre-aggregation": "mixing"})
    with pytest.raises(SettingsError, match="nnm needs more than 2\\*pre-aggregation-f updates"):
        strategy_of(**{"strategy": "median", "pre-aggregation": "nnm", "pre-aggregation-f": 5})
    with pytest.raises(SettingsError, match=r"bucketing-size must be in \[1, 1000000\], got 0"):
        Settings.from_run_config({"bucketing-size": 0})
    with pytest.raises(SettingsError, match="dp-fedavg' cannot use pre-aggregation='nnm'"):
        Settings.from_run_config({"strategy": "dp-fedavg", "pre-aggregation": "nnm"})


def test_weak_dp_noise_is_added_to_the_rule_output():
    strategy = AggregationStrategy(RuleStep.mean(), noise=WeakDpNoise(0.5, rng=np.random.default_rng(3)))
    assert strategy.streams_mean()  # the noise acts on the aggregate, not on single updates
    new_global, metrics = run_round(strategy, np.zeros(8, np.float32), np.ones((4, 8), np.float32))
    expected = 1.0 + 0.5 * np.random.default_rng(3).standard_normal(8, dtype=np.float32)
    np.testing.assert_allclose(new_global, expected, rtol=1e-6)
    assert metrics["weak-dp-noise-std"] == 0.5


def test_centered_clipping_starts_from_the_previous_aggregate_and_the_centre_survives_a_restart():
    strategy = strategy_of(**{"strategy": "centered-clipping", "aggregation-rule": "centered-clipping"})
    assert isinstance(strategy.rule, CenteredClippingStep)
    rng = np.random.default_rng(1)
    first, second = (rng.standard_normal((10, 8)).astype(np.float32) + 3 for _ in range(2))
    w1, _ = run_round(strategy, np.zeros(8, np.float32), first)
    v1 = centered_clipping(first, np.ones(10), 1.0, 3, tau_quantile=0.5)
    np.testing.assert_allclose(w1, v1, rtol=1e-5)
    state = strategy.state_dict()
    np.testing.assert_allclose(state["rule"]["center"], v1, rtol=1e-5)

    restarted = strategy_of(**{"strategy": "centered-clipping", "aggregation-rule": "centered-clipping"})
    restarted.load_state_dict(state)
    w2, _ = run_round(restarted, w1, second, server_round=2)
    v2 = centered_clipping(second, np.ones(10), 1.0, 3, center=v1, tau_quantile=0.5)
    np.testing.assert_allclose(w2 - w1, v2, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="centered-clipping centre in the saved state is not a finite vector"):
        restarted.load_state_dict({"rule": {"center": np.array([np.nan], np.float32)}})


def test_centered_clipping_momentum_averages_the_centre():
    step = RuleStep.builtin("centered-clipping", {"tau": 1.0, "iterations": 1, "momentum": 0.75})
    assert isinstance(step, CenteredClippingStep) and step.momentum == 0.75
    x = np.ones((3, 2), np.float32)
    first, _ = step(x, np.ones(3))
    second, _ = step(x, np.ones(3))
    np.testing.assert_allclose(step.center, 0.75 * first + 0.25 * second, rtol=1e-6)
    with pytest.raises(ValueError, match=r"centered-clipping-momentum must be in \[0, 1\), got 1.0"):
        RuleStep.builtin("centered-clipping", {"tau": 1.0, "iterations": 1, "momentum": 1.0})


def test_dp_fedavg_runs_centered_clipping_without_a_carried_centre():
    settings = Settings.from_run_config(
        {"strategy": "dp-fedavg", "aggregation-rule": "centered-clipping", "num-partitions": 10}
    )
    strategy = build_dp_strategy(settings.aggregation_params(), settings.dp_params(), noise_multiplier=1.0)
    assert type(strategy.rule) is RuleStep and strategy.rule.name == "centered-clipping"
