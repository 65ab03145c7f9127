"""Simulated Byzantine clients: client-side poisoning and the server-side omniscient attacks."""

import numpy as np
from flwr.app import MetricRecord

from fl_app.attacks.poisoning import OmniscientAttack, poison_labels, poison_weights
from fl_app.config.settings import Settings
from strategies.core.update_matrix import CollectedUpdates

G = [np.zeros((2, 2), np.float32), np.zeros(3, np.float32)]
W = [np.ones((2, 2), np.float32), np.full(3, 2.0, np.float32)]


def settings(**kw):
    return Settings.from_run_config({"num-partitions": 5, **{k.replace("_", "-"): v for k, v in kw.items()}})


def test_honest_clients_are_untouched():
    s = settings(attack="sign-flip", attack_ids="1")
    assert poison_weights(s, 0, G, W, 1) is W
    assert poison_labels(s, 0, np.arange(3), 10) is not None


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
    assert np.array_equal(poison_labels(s, 4, np.array([0, 3, 9]), 10), [9, 6, 0])


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
