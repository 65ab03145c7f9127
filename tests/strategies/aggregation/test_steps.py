"""The pipeline's step objects: each checks its parameters when built and reports its measurements."""

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies.aggregation.collector import ReplyCollector
from strategies.aggregation.steps import ClientWeighting, RuleStep, ServerStep
from strategies.aggregation.strategy import AggregationStrategy
from strategies.robust.preaggregation import FixedNormBound, QuantileNormBound
from strategies.robust.rules import coordinate_median, krum
from tests.helpers import ROOT


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: ClientWeighting("by-size"), "client-weighting must be one of uniform, num-examples, capped"),
        (lambda: ClientWeighting("capped", -1.0), "weight-cap-ratio must be > 0, got -1.0"),
        (lambda: ServerStep(0.0), "server-learning-rate must be > 0, got 0.0"),
        (lambda: ServerStep(1.0, 1.0), r"server-momentum must be in \[0, 1\), got 1.0"),
        (lambda: FixedNormBound(float("inf")), "norm-bound must be a positive number, got inf"),
        (lambda: ReplyCollector(max_update_norm=-2.0), "max-update-norm must be > 0, got -2.0"),
        (lambda: RuleStep.builtin("average"), "aggregation-rule must be one of mean, median"),
        (lambda: RuleStep.builtin("krum", {"f": 2}, num_clients=5), "krum-f=2 requires"),
        (lambda: RuleStep(42, "mine"), "aggregation-rule 'mine' is not callable"),
        (lambda: RuleStep(coordinate_median, "krum"), "rule name 'krum' is the built-in rule's"),
        (lambda: AggregationStrategy(RuleStep.mean(), min_valid_replies=0), "min-valid-replies must be >= 1"),
    ],
)
def test_every_step_checks_its_parameters_when_built(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_rule_step_reports_the_f_it_ran_with():
    rng = np.random.default_rng(0)
    updates = rng.standard_normal((7, 5)).astype(np.float32)
    step = RuleStep.builtin("krum", {"f": 2})
    out, measured = step(updates, np.ones(7))
    np.testing.assert_array_equal(out, krum(updates, np.ones(7), 2))
    assert measured == {}
    out, measured = step(updates, np.ones(7), faults=1)
    assert measured == {"rule-f": 1}
    np.testing.assert_array_equal(out, krum(updates, np.ones(7), 1))
    assert step.cannot_run(4) and not step.cannot_run(7)
    assert RuleStep(coordinate_median, "mine").cannot_run(1) == ""  # a user's rule has no known conditions


def test_norm_bounds_report_what_they_clipped():
    updates = np.array([[3.0, 4.0], [0.3, 0.4], [30.0, 40.0]], np.float32)
    assert FixedNormBound(1.0)(updates) == {"bounded-replies": 2}
    assert np.allclose(np.linalg.norm(updates, axis=1), [1.0, 0.5, 1.0])
    adaptive = QuantileNormBound(0.5, 2.0)
    measured = adaptive(np.array([[3.0, 4.0], [0.3, 0.4], [30.0, 40.0]], np.float32))
    assert measured == {"norm-bound": 2.0, "bounded-replies": 2} and adaptive.bound > 2.0


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(1, 1e6), min_size=1, max_size=20), st.floats(0.5, 10))
def test_capped_weights_never_exceed_the_cap_and_keep_small_counts(counts, cap):
    n = np.array(counts)
    weights = ClientWeighting("capped", cap)(n)
    assert np.all(weights <= cap * np.median(n) + 1e-9)
    small = n <= cap * np.median(n)
    np.testing.assert_array_equal(weights[small], n[small])


def test_server_step_momentum_state_round_trips_and_refuses_nan():
    step = ServerStep(0.5, 0.9)
    g = np.zeros(3, np.float32)
    first = step(g, np.ones(3, np.float32))
    second = step(g, np.ones(3, np.float32))
    np.testing.assert_allclose(first, 0.5)
    np.testing.assert_allclose(second, 0.5 * 1.9)
    restored = ServerStep(0.5, 0.9)
    restored.load_state_dict(step.state_dict())
    np.testing.assert_allclose(restored(g, np.ones(3, np.float32)), step(g, np.ones(3, np.float32)))
    with pytest.raises(ValueError, match="server momentum .* NaN"):
        restored.load_state_dict({"momentum": [np.nan, 0.0, 0.0]})


def test_the_composition_example_of_the_docs_builds():
    text = (ROOT / "docs" / "extending.md").read_text(encoding="utf-8")
    block = re.search(r"## Composing our steps in Python.*?```python\n(.*?)```", text, re.S)
    assert block is not None
    namespace: dict = {}
    exec(block.group(1), namespace)
    strategy = namespace["strategy"]
    assert isinstance(strategy, AggregationStrategy) and strategy.rule.params == {"beta": 0.1}
    assert strategy.collector.max_update_norm == 100.0 and not strategy.streams_mean()


def nan_rule(updates, weights):
    return np.full(updates.shape[1], np.nan, np.float32)


def scalar_rule(updates, weights):
    return np.float32(updates.mean())


def crashing_rule(updates, weights):
    raise KeyError("boom")


def in_place_rule(updates, weights):
    updates *= 0
    return updates[0]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("nan_rule", "returned NaN, infinite or non-numeric values"),
        ("scalar_rule", r"returned shape \[\], expected \[16\]"),
        ("crashing_rule", "failed on a synthetic round of 10 updates of 16 values: KeyError"),
        ("in_place_rule", "modified its input matrix"),
    ],
)
def test_a_broken_user_rule_fails_at_start_up(name, message):
    from fl_app.config.settings import Settings, SettingsError

    key = f"tests.strategies.aggregation.test_steps:{name}"
    with pytest.raises(SettingsError, match=f"aggregation-rule '{key}' {message}"):
        Settings.from_run_config({"strategy": "robust", "aggregation-rule": key})
    Settings.from_run_config({"strategy": "robust", "aggregation-rule": "strategies.robust.rules:coordinate_median"})
