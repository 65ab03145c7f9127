"""Simulated Byzantine clients: client-side poisoning and the server-side omniscient attacks."""

import numpy as np
from flwr.app import MetricRecord

from fl_app.attacks.poisoning import OmniscientAttack, boost_factor, poison_data, poison_weights
from fl_app.config.settings import Settings
from strategies.core.update_matrix import CollectedUpdates

G = [np.zeros((2, 2), np.float32), np.zeros(3, np.float32)]
W = [np.ones((2, 2), np.float32), np.full(3, 2.0, np.float32)]


def settings(**kw):
    config = {"num-partitions": 5, "strategy": "median", **{k.replace("_", "-"): v for k, v in kw.items()}}
    return Settings.from_run_config(config)


def test_honest_clients_are_untouched():
    s = settings(attack="sign-flip", attack_ids="1")
    assert poison_weights(s, 0, G, W, 1) is W
    x, y = np.zeros((3, 8, 8, 1)), np.arange(3)
    assert poison_data(s, 0, x, y, 10) == (x, y)


def test_sign_flip_and_scaling_act_on_the_update():
    flipped = poison_weights(settings(attack="sign-flip", attack_ids="1", attack_scale=3.0), 1, G, W, 1)
    assert np.allclose(flipped[0], -3.0) and np.allclose(flipped[1], -6.0)
    scaled = poison_weights(settings(attack="scaling", attack_ids="1", attack_scale=5.0), 1, G, W, 1)
    assert np.allclose(scaled[1], 10.0)


def test_faults_and_label_flip():
    s = settings(attack="nan,wrong-shapes,label-flip", attack_ids="0,2,4")
    assert np.isnan(poison_weights(s, 0, G, W, 1)[0]).all()
    broken = poison_weights(s, 2, G, W, 1)
    assert len(broken) != len(W) or broken[0].shape != W[0].shape
    x = np.zeros((3, 8, 8, 1))
    px, py = poison_data(s, 4, x, np.array([0, 3, 9]), 10)
    assert px is x and np.array_equal(py, [9, 6, 0])


def test_omniscient_alie_rewrites_only_attacker_rows():
    s = settings(attack="alie", attack_ids="0,1", alie_z=1.0)
    updates = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    honest = updates[2:].copy()
    collected = CollectedUpdates(
        updates,
        np.ones(5),
        list(range(5)),
        [MetricRecord({"partition-id": i, "num-examples": 1}) for i in range(5)],
        [],
    )
    OmniscientAttack(s)(1, collected)
    expected = honest.mean(0) - 1.0 * honest.std(0)
    np.testing.assert_allclose(updates[0], expected, rtol=1e-5)
    np.testing.assert_allclose(updates[1], expected, rtol=1e-5)
    np.testing.assert_array_equal(updates[2:], honest)


def test_backdoor_attackers_train_on_triggered_copies_and_boost_in_the_chosen_rounds():
    s = settings(attack="backdoor", attack_ids="3", backdoor_target=7, backdoor_fraction=1.0, backdoor_boost_rounds="2")
    x = np.random.default_rng(0).uniform(0, 0.5, (4, 8, 8, 1)).astype(np.float32)
    x[0, 0, 0, 0] = 1.0
    y = np.array([0, 1, 2, 3])
    px, py = poison_data(s, 3, x, y, 10)
    assert len(px) == 8 and np.array_equal(py[4:], [7] * 4) and np.all(px[4:, 6:, 6:] == 1.0)
    assert poison_data(s, 2, x, y, 10) == (x, y)
    assert poison_weights(s, 3, G, W, 1) is W  # no boost in round 1
    assert boost_factor(s) == 5.0  # n / (eta c) = 5 / (1 * 1)
    boosted = poison_weights(s, 3, G, W, 2)
    assert np.allclose(boosted[0], 5.0) and np.allclose(boosted[1], 10.0)
    assert boost_factor(settings(attack="backdoor", attack_ids="3", backdoor_boost=3.0)) == 3.0


def collected_round(updates):
    return CollectedUpdates(
        updates,
        np.ones(len(updates)),
        list(range(len(updates))),
        [MetricRecord({"partition-id": i, "num-examples": 1}) for i in range(len(updates))],
        [],
    )


def test_new_omniscient_attacks_rewrite_attacker_rows_with_the_catalogue_functions():
    from fl_app.attacks import catalogue

    rng = np.random.default_rng(0)
    base = (rng.normal(size=(10, 6)) + 1).astype(np.float32)
    config = {"num_partitions": 10, "strategy": "median", "attack_ids": "0,1"}
    for name, params in [
        ("min-max", {"perturbation": "std", "gamma_init": 10.0}),
        ("min-sum", {"perturbation": "sign", "gamma_init": 10.0}),
        ("mimic", {}),
        ("fang-krum", {"num_attackers": 2}),
    ]:
        extra = {"attack_perturbation": "sign"} if name == "min-sum" else {}
        s = Settings.from_run_config({k.replace("_", "-"): v for k, v in {**config, "attack": name, **extra}.items()})
        updates = base.copy()
        OmniscientAttack(s)(1, collected_round(updates))
        expected = catalogue.ATTACKS[name].fn(base[2], rng=rng, honest_updates=base[2:], **params)
        np.testing.assert_allclose(updates[:2], np.stack([expected, expected]), rtol=1e-6, err_msg=name)
        np.testing.assert_array_equal(updates[2:], base[2:])
    s = Settings.from_run_config(
        {"num-partitions": 10, "strategy": "median", "attack-ids": "0,1", "attack": "fang-trimmed-mean"}
    )
    updates = base.copy()
    OmniscientAttack(s)(1, collected_round(updates))
    assert not np.array_equal(updates[0], updates[1])  # each attacker draws its own values
    honest = base[2:]
    down = honest.mean(0) > 0
    assert np.all(updates[:2, down] <= honest[:, down].min(0)) and np.all(updates[:2, ~down] >= honest[:, ~down].max(0))
