"""KerasClient: fit/evaluate round trip, model reuse across clients, FedProx, legacy NumPyClient use."""

import numpy as np
import pytest
from flwr.client import NumPyClient

from fl_app.config.settings import Settings
from fl_app.task.data import client_data
from fl_app.task.keras_client import KerasClient, compile_model
from fl_app.task.models import build_model, make_optimizer

SETTINGS = Settings(num_partitions=4, partitioner="iid", local_epochs=2)


@pytest.fixture(scope="module")
def compiled():
    model = build_model("mlp", (8, 8, 1), 10, seed=0)
    return compile_model(model, make_optimizer("adam", 0.01))


def make_client(compiled, partition_id=0, **kwargs):
    model, proximal = compiled
    return KerasClient(
        model, client_data(SETTINGS, partition_id), local_epochs=2, batch_size=32, seed=1, proximal=proximal, **kwargs
    )


def test_fit_evaluate_round_trip(compiled):
    client = make_client(compiled)
    assert isinstance(client, NumPyClient)
    initial = [w.copy() for w in client.get_parameters({})]
    loss0, n_test, metrics0 = client.evaluate(initial, {})
    weights, n_train, metrics = client.fit(initial, {"server-round": 1})
    assert n_train == len(client.data.y_train) and n_test == len(client.data.y_test)
    assert [w.shape for w in weights] == [w.shape for w in initial]
    assert any(not np.allclose(a, b) for a, b in zip(weights, initial))
    assert {"train-loss", "train-accuracy", "fit-seconds"} <= set(metrics)
    loss1, _, metrics1 = client.evaluate(weights, {})
    assert loss1 < loss0 and metrics1["accuracy"] > metrics0["accuracy"] + 0.3


def test_reused_model_gives_same_result_as_fresh(compiled):
    """Optimizer state is reset and the batch order seeded per fit, so a reused compiled model is
    like a fresh one."""
    initial = compiled[0].get_weights()
    first = make_client(compiled, 1).fit(initial, {"server-round": 3})[0]
    make_client(compiled, 2).fit(initial, {"server-round": 3})  # another client in between
    again = make_client(compiled, 1).fit(initial, {"server-round": 3})[0]
    for a, b in zip(first, again):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_fit_does_not_reseed_tensorflow(compiled, monkeypatch):
    """``tf.random.set_seed`` clears the function cache (~190 ms of re-instantiation per fit, 14x
    the training of a digits client), so fit must order batches without touching TF's seed."""
    import tensorflow as tf

    def forbidden(*args, **kwargs):
        raise AssertionError("KerasClient.fit reseeded TensorFlow")

    monkeypatch.setattr(tf.random, "set_seed", forbidden)
    monkeypatch.setattr(tf.keras.utils, "set_random_seed", forbidden)
    make_client(compiled, 1).fit(compiled[0].get_weights(), {"server-round": 2})


def test_proximal_term_pulls_towards_global(compiled):
    initial = compiled[0].get_weights()

    def drift(mu):
        weights = make_client(compiled, 0).fit(initial, {"server-round": 1, "proximal-mu": mu})[0]
        return sum(float(np.sum((w - g) ** 2)) for w, g in zip(weights, initial))

    assert drift(10.0) < 0.5 * drift(0.0)


def test_legacy_numpy_client_stack(compiled):
    from flwr.common import Code, FitIns, ndarrays_to_parameters, parameters_to_ndarrays

    legacy = make_client(compiled).to_client()
    initial = compiled[0].get_weights()
    res = legacy.fit(FitIns(ndarrays_to_parameters(initial), {"server-round": 1}))
    assert res.status.code == Code.OK and res.num_examples > 0
    assert [w.shape for w in parameters_to_ndarrays(res.parameters)] == [w.shape for w in initial]
