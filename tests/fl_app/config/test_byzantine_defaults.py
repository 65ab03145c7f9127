"""byzantine-fraction derives the robust rules' f, beta and m; too many simulated attackers are refused."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fl_app.config.settings import Settings, SettingsError, ToleranceWarning
from strategies.aggregation.steps import RuleStep
from strategies.robust import rules
from strategies.robust.tolerance import derived_params, tolerated

TWENTY = {"num-partitions": 20, "min-train-clients": 20, "min-available-clients": 20}


def test_defaults_at_twenty_clients_assume_four_byzantine():
    params = Settings.from_run_config(TWENTY).rule_params()
    assert (params.krum_f, params.bulyan_f, params.trimmed_mean_beta) == (4, 4, 0.2)
    assert rules.trimmed_count(20, params.trimmed_mean_beta) == 4
    step = RuleStep.builtin("multi-krum", params.of_rule("multi-krum"), num_clients=20)
    assert step.params_for(20) == {"f": 4, "m": 16}


def test_default_ten_clients_cap_bulyan_at_what_ten_clients_allow():
    params = Settings.from_run_config({}).rule_params()
    assert (params.krum_f, params.bulyan_f, params.trimmed_mean_beta) == (2, 1, 0.2)  # 10 >= 4*1 + 3
    Settings.from_run_config({"strategy": "bulyan"})  # the defaults build every rule


def test_explicit_keys_win_over_the_fraction():
    params = Settings.from_run_config(
        {**TWENTY, "krum-f": 1, "bulyan-f": 2, "trimmed-mean-beta": 0.1, "byzantine-fraction": 0.3}
    ).rule_params()
    assert (params.krum_f, params.bulyan_f, params.trimmed_mean_beta) == (1, 2, 0.1)
    derived = Settings.from_run_config({**TWENTY, "byzantine-fraction": 0.3}).rule_params()
    assert (derived.krum_f, derived.bulyan_f, derived.trimmed_mean_beta) == (6, 4, 0.3)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 500), st.floats(0.0, 0.5, exclude_max=True))
def test_derived_parameters_always_satisfy_the_rules_conditions(n, fraction):
    derived = derived_params(n, fraction)
    assert derived.count == math.floor(fraction * n + 1e-9)
    if n >= 3:
        assert n >= 2 * derived.krum_f + 3 and n >= 4 * derived.bulyan_f + 3
    assert rules.trimmed_count(n, derived.trimmed_mean_beta) == min(derived.count, (n - 1) // 2)
    assert 2 * rules.trimmed_count(n, derived.trimmed_mean_beta) < n
    assert derived.krum_f <= derived.count and derived.bulyan_f <= derived.count


def test_default_multi_krum_is_not_the_mean_under_a_four_of_twenty_sign_flip():
    rng = np.random.default_rng(0)
    honest = (rng.standard_normal((16, 50)) * 0.1 + 1.0).astype(np.float32)
    attacked = np.concatenate([-10 * honest[:4], honest])
    params = Settings.from_run_config({**TWENTY, "strategy": "multi-krum"}).rule_params().of_rule("multi-krum")
    aggregate, _ = RuleStep.builtin("multi-krum", params, num_clients=20)(attacked, np.ones(20))
    np.testing.assert_allclose(aggregate, honest.mean(axis=0), rtol=1e-5)  # the 4 attackers are excluded
    assert np.linalg.norm(rules.weighted_mean(attacked, np.ones(20)) - honest.mean(axis=0)) > 1.0


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        ({"strategy": "krum", "krum-f": 1, "attack-fraction": 0.2}, "4 simulated attackers can reach the rule"),
        ({"strategy": "krum", "krum-f": 1, "attack-fraction": 0.2}, "more than the 1 that krum with krum-f=1"),
        ({"strategy": "fedavg", "attack-fraction": 0.1}, "more than the 0 that mean tolerates"),
        ({"strategy": "robust", "attack-fraction": 0.1}, "more than the 0 that mean tolerates"),
        ({"strategy": "trimmed-mean", "trimmed-mean-beta": 0.1, "attack-fraction": 0.2}, "trimmed-mean-beta=0.1"),
        ({"strategy": "bulyan", "byzantine-fraction": 0.1, "attack-fraction": 0.2}, "bulyan-f=2"),
        ({"strategy": "median", "attack-ids": ",".join(map(str, range(10)))}, "more than the 9 that median"),
    ],
)
def test_more_attackers_than_the_rule_tolerates_are_refused(config, fragment):
    with pytest.raises(SettingsError) as err:
        Settings.from_run_config({**TWENTY, "attack": "sign-flip", **config})
    assert fragment in str(err.value) and "attack-allow-excess" in str(err.value)


def test_allow_excess_warns_instead():
    config = {**TWENTY, "strategy": "krum", "krum-f": 1, "attack": "min-max", "attack-fraction": 0.2}
    with pytest.warns(ToleranceWarning, match="more than the 1 that krum"):
        Settings.from_run_config({**config, "attack-allow-excess": True})


def test_within_tolerance_and_rejected_attacks_pass_silently():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Settings.from_run_config({**TWENTY, "strategy": "krum", "attack": "fang-krum", "attack-fraction": 0.2})
        Settings.from_run_config({**TWENTY, "strategy": "median", "attack": "sign-flip", "attack-fraction": 0.45})
        # NaN and wrong shapes are rejected before the mean: they never reach it
        Settings.from_run_config({**TWENTY, "strategy": "fedavg", "attack": "nan,wrong-shapes", "attack-ids": "0,1"})
        # a user's strategy states no tolerance
        assert Settings.parse({**TWENTY, "strategy": "dp-fedavg", "attack": "sign-flip"}).tolerance_excess() == ""


def test_tolerated_counts():
    assert tolerated("mean", 20, {}) == 0
    assert tolerated("median", 20, {}) == tolerated("geometric-median", 20, {}) == 9
    assert tolerated("trimmed-mean", 49, {"beta": 4 / 49}) == 4
    assert tolerated("krum", 20, {"f": 3}) == tolerated("bulyan", 20, {"f": 3}) == 3
    assert tolerated("centered-clipping", 20, {"tau": 1.0, "iterations": 3}) is None


def test_fang_krum_needs_two_c_plus_two_clients():
    with pytest.raises(SettingsError, match="attack='fang-krum' needs at least 2c \\+ 2 clients per round"):
        Settings.from_run_config({"strategy": "median", "attack": "fang-krum", "attack-ids": "0,1,2,3,4"})
