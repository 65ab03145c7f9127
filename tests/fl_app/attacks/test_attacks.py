"""Simulated Byzantine behaviour: update attacks against hand computation, attacker selection."""

from __future__ import annotations

import math
import subprocess
import sys
from statistics import NormalDist

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fl_app.attacks import catalogue as attacks
from fl_app.attacks.poisoning import poison_num_examples, poison_weights
from fl_app.config.choices import ATTACK_NAMES, select_attackers
from fl_app.config.settings import Settings


@pytest.fixture
def rng():
    return np.random.default_rng(0)


HONEST = np.array([[1.0, -2.0, 0.0], [3.0, -2.0, 4.0], [2.0, 1.0, 2.0]], dtype=np.float32)
OWN = np.array([0.5, -1.0, 2.0], dtype=np.float32)


def test_sign_flip_scaling_and_nan(rng):
    np.testing.assert_array_equal(attacks.sign_flip(OWN, rng=rng, honest_updates=None), -OWN)
    np.testing.assert_array_equal(attacks.sign_flip(OWN, rng=rng, honest_updates=None, scale=4.0), [-2.0, 4.0, -8.0])
    np.testing.assert_array_equal(attacks.scaling(OWN, rng=rng, honest_updates=None, factor=10.0), [5.0, -10.0, 20.0])
    nan = attacks.nan_update(OWN, rng=rng, honest_updates=None)
    assert nan.shape == OWN.shape and nan.dtype == np.float32 and np.all(np.isnan(nan))
    np.testing.assert_array_equal(OWN, [0.5, -1.0, 2.0])  # inputs are not modified


def test_gaussian_noise_replaces_the_update_with_seeded_noise():
    own = np.full(20_000, 7.0, dtype=np.float32)

    def noise(seed):
        rng = np.random.default_rng(seed)
        return attacks.gaussian_noise(own, rng=rng, honest_updates=None, sigma=3.0)

    first, again = noise(1), noise(1)
    np.testing.assert_array_equal(first, again)
    assert first.dtype == np.float32
    assert abs(first.mean()) < 0.1 and abs(first.std() - 3.0) < 0.1


def test_alie_is_mean_minus_z_std_of_the_honest_updates(rng):
    # Hand computation: column means (2, -1, 2); population stds (sqrt(2/3), sqrt(2), sqrt(8/3)).
    expected = [2 - 1.5 * math.sqrt(2 / 3), -1 - 1.5 * math.sqrt(2), 2 - 1.5 * math.sqrt(8 / 3)]
    result = attacks.alie(OWN, rng=rng, honest_updates=HONEST, z=1.5)
    np.testing.assert_allclose(result, expected, rtol=1e-6)
    assert result.dtype == np.float32


@pytest.mark.parametrize(
    ("n", "f", "expected"),
    [
        # s = floor(n/2 + 1) - f; z = Phi^-1((n - s) / n)
        (50, 12, NormalDist().inv_cdf((50 - 14) / 50)),  # s = 26 - 12 = 14, z ~ 0.58
        (10, 1, 0.0),  # s = 5, Phi^-1(0.5) = 0
        (20, 5, NormalDist().inv_cdf(14 / 20)),  # s = 11 - 5 = 6
    ],
)
def test_alie_z_follows_the_paper(n, f, expected, rng):
    assert attacks.alie_z(n, f) == pytest.approx(expected)
    result = attacks.alie(OWN, rng=rng, honest_updates=HONEST, num_clients=n, num_attackers=f)
    direct = attacks.alie(OWN, rng=rng, honest_updates=HONEST, z=expected)
    np.testing.assert_allclose(result, direct, rtol=1e-6)
    assert attacks.alie_z(50, 12) == pytest.approx(0.5828, abs=1e-4)


@pytest.mark.parametrize(("n", "f"), [(10, 0), (10, 6), (10, 10), (3, 2)])
def test_alie_z_rejects_impossible_counts(n, f):
    with pytest.raises(ValueError, match=f"num_clients={n}, num_attackers={f}"):
        attacks.alie_z(n, f)


def test_ipm_is_minus_epsilon_times_the_honest_mean(rng):
    np.testing.assert_allclose(attacks.ipm(OWN, rng=rng, honest_updates=HONEST, epsilon=0.5), [-1.0, 0.5, -1.0])
    np.testing.assert_allclose(attacks.ipm(OWN, rng=rng, honest_updates=HONEST), [-0.2, 0.1, -0.2], rtol=1e-6)


@pytest.mark.parametrize(("attack", "params"), [(attacks.alie, {"z": 1.0}), (attacks.ipm, {})])
def test_omniscient_attacks_need_the_honest_updates(attack, params, rng):
    with pytest.raises(ValueError, match="needs honest_updates"):
        attack(OWN, rng=rng, honest_updates=None, **params)
    with pytest.raises(ValueError, match="K_h x 3"):
        attack(OWN, rng=rng, honest_updates=HONEST[:, :2], **params)


def test_update_attacks_reject_bad_parameters(rng):
    with pytest.raises(ValueError, match="sigma must be a positive number, got -1"):
        attacks.gaussian_noise(OWN, rng=rng, honest_updates=None, sigma=-1)
    with pytest.raises(ValueError, match="epsilon must be a positive number"):
        attacks.ipm(OWN, rng=rng, honest_updates=HONEST, epsilon=0)
    with pytest.raises(ValueError, match="flat vector"):
        attacks.sign_flip(HONEST, rng=rng, honest_updates=None)
    with pytest.raises(ValueError, match="alie needs z, or num_clients and num_attackers"):
        attacks.alie(OWN, rng=rng, honest_updates=HONEST)


def test_flip_labels():
    y = np.array([0, 1, 2, 9], dtype=np.int64)
    flipped = attacks.flip_labels(y, 10)
    np.testing.assert_array_equal(flipped, [9, 8, 7, 0])
    assert flipped.dtype == np.int64
    np.testing.assert_array_equal(attacks.flip_labels(flipped, 10), y)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 9\]"):
        attacks.flip_labels(np.array([10]), 10)
    with pytest.raises(ValueError, match="integers"):
        attacks.flip_labels(np.array([0.5]), 10)


def test_wrong_shapes_never_match_the_model():
    model = [np.zeros((4, 3)), np.zeros(3), np.zeros((3, 2)), np.zeros(2)]
    corrupted = attacks.wrong_shapes(model)
    assert [a.shape for a in corrupted] != [a.shape for a in model]
    assert len(corrupted) == len(model) - 1 and corrupted[0].shape == (12,)
    single = attacks.wrong_shapes([np.zeros(5)])
    assert [a.shape for a in single] == [(1, 5)]
    assert model[0].shape == (4, 3)  # inputs untouched


def test_float64_keeps_names_and_shapes_but_not_the_dtype():
    model = [np.ones((4, 3), np.float32), np.arange(3, dtype=np.float32)]
    sent = attacks.float64_arrays(model)
    assert [a.shape for a in sent] == [(4, 3), (3,)] and all(a.dtype == np.float64 for a in sent)
    np.testing.assert_array_equal(sent[1], [0.0, 1.0, 2.0])
    assert model[0].dtype == np.float32  # inputs untouched


def test_negative_examples_reports_minus_five_whatever_the_count():
    assert attacks.negative_examples(120) == attacks.negative_examples(1) == -5


def test_client_side_reply_attacks_act_only_on_their_partitions():
    settings = Settings(attack="float64,negative-examples", attack_ids="0,1", num_partitions=4)
    model = [np.zeros((2, 2), np.float32), np.zeros(2, np.float32)]
    trained = [w + 1 for w in model]
    assert all(a.dtype == np.float64 for a in poison_weights(settings, 0, model, trained, 1))
    assert poison_num_examples(settings, 0, 50) == 50  # float64 leaves the count alone
    assert poison_weights(settings, 1, model, trained, 1) is trained  # negative-examples leaves the arrays
    assert poison_num_examples(settings, 1, 50) == -5
    assert poison_num_examples(settings, 2, 50) == 50 and poison_weights(settings, 2, model, trained, 1) is trained


def test_registry_names_and_levels():
    assert set(attacks.ATTACKS) == {
        "label-flip",
        "sign-flip",
        "gaussian",
        "scaling",
        "alie",
        "ipm",
        "nan",
        "wrong-shapes",
        "float64",
        "negative-examples",
        "min-max",
        "min-sum",
        "fang-trimmed-mean",
        "fang-krum",
        "mimic",
        "backdoor",
    }
    assert set(attacks.ATTACKS) == set(ATTACK_NAMES)
    assert attacks.ATTACKS["label-flip"].level == attacks.ATTACKS["backdoor"].level == "data"
    assert attacks.ATTACKS["wrong-shapes"].level == attacks.ATTACKS["float64"].level == "arrays"
    assert attacks.ATTACKS["negative-examples"].level == "examples"
    assert {name for name, a in attacks.ATTACKS.items() if a.omniscient} == {
        "alie",
        "ipm",
        "min-max",
        "min-sum",
        "fang-trimmed-mean",
        "fang-krum",
        "mimic",
    }
    rng = np.random.default_rng(0)
    for name, attack in attacks.ATTACKS.items():
        if attack.level == "update":
            params = {"alie": {"z": 1.0}, "fang-krum": {"num_attackers": 1}}.get(name, {})
            out = attack.fn(OWN, rng=rng, honest_updates=HONEST, **params)
            assert out.shape == OWN.shape and out.dtype == np.float32


def test_attacks_module_does_not_import_tensorflow():
    code = "import sys, fl_app.attacks.catalogue; print('tensorflow' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 200), st.floats(0.0, 1.0), st.integers(0, 2**32 - 1))
def test_select_attackers_is_deterministic_and_sized(n, fraction, seed):
    chosen = select_attackers(n, fraction=fraction, seed=seed)
    assert chosen == select_attackers(n, fraction=fraction, seed=seed)
    assert len(chosen) == math.floor(fraction * n + 1e-9)
    assert all(isinstance(i, int) and 0 <= i < n for i in chosen)


def test_select_attackers_fraction_rounding_and_seeds():
    assert len(select_attackers(100, fraction=0.29)) == 29  # 0.29 * 100 = 28.999...
    assert len(select_attackers(10, fraction=0.25)) == 2
    draws = {select_attackers(20, fraction=0.3, seed=s) for s in range(10)}
    assert len(draws) > 1  # the seed matters
    assert select_attackers(5) == frozenset()


def test_select_attackers_explicit_ids():
    assert select_attackers(10, ids=[3, 0, 7]) == frozenset({0, 3, 7})
    assert select_attackers(10, ids=[]) == frozenset()


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"fraction": 1.5}, "attack-fraction must be in [0, 1], got 1.5"),
        ({"fraction": -0.1}, "attack-fraction must be in [0, 1], got -0.1"),
        ({"fraction": "0.2"}, "attack-fraction"),
        ({"ids": [1, 10]}, "attack-ids must be partition ids in [0, 9], got [10]"),
        ({"ids": [-1]}, "attack-ids must be partition ids in [0, 9], got [-1]"),
        ({"ids": [2, 2]}, "attack-ids must not repeat an id, got [2, 2]"),
        ({"ids": [1.5]}, "attack-ids"),
        ({"ids": [1], "fraction": 0.1}, "either attack-fraction or attack-ids"),
    ],
)
def test_select_attackers_errors_name_the_run_config_keys(kwargs, fragment):
    with pytest.raises(ValueError) as error:
        select_attackers(10, **kwargs)
    assert fragment in str(error.value)
