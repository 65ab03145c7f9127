"""Keras callbacks on clients (run config ``callbacks``): each kind has an observable effect, and
the combinations that cannot work are refused naming the key and the value."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pytest
import tensorflow as tf

from fl_app.config.settings import Settings, SettingsError
from fl_app.task.callbacks import CallbackInfo, make_callbacks, validation_split
from fl_app.task.data import client_data
from fl_app.task.keras_client import KerasClient, compile_model
from fl_app.task.models import build_model, make_optimizer

SETTINGS = Settings(num_partitions=4, partitioner="iid", local_epochs=2)
HERE = "tests.fl_app.task.test_callbacks"


class EpochCounter(tf.keras.callbacks.Callback):
    """A user's own callback: counts the epochs and batches it sees, and the infos it was made for."""

    epochs = 0
    batches = 0
    infos: ClassVar[list[CallbackInfo]] = []

    def on_epoch_end(self, epoch, logs=None):
        type(self).epochs += 1

    def on_train_batch_end(self, batch, logs=None):
        type(self).batches += 1


def make_counter(info: CallbackInfo) -> list:
    EpochCounter.infos.append(info)
    return [EpochCounter()]


def make_early_stopping(info: CallbackInfo) -> list:
    # min_delta so large that no epoch after the first is an improvement: stops after 2 epochs
    monitor = "val_loss" if info.num_validation_examples else "loss"
    return [tf.keras.callbacks.EarlyStopping(monitor=monitor, min_delta=1e9, patience=0)]


def make_frozen_schedule(info: CallbackInfo) -> list:
    return [tf.keras.callbacks.LearningRateScheduler(lambda epoch, lr: 0.0)]


def make_not_a_list(info: CallbackInfo):
    return tf.keras.callbacks.EarlyStopping()


@pytest.fixture(scope="module")
def compiled():
    tf.keras.utils.set_random_seed(0)
    model = build_model("mlp", (8, 8, 1), 10, seed=0)
    return compile_model(model, make_optimizer("adam", 0.01))


def _client(compiled, factory=None, **kwargs) -> KerasClient:
    model, proximal = compiled
    return KerasClient(
        model,
        client_data(SETTINGS, 0),
        local_epochs=5,
        batch_size=32,
        seed=1,
        proximal=proximal,
        callbacks=factory,
        **kwargs,
    )


def test_a_users_callback_runs_every_epoch_and_batch(compiled):
    EpochCounter.epochs = EpochCounter.batches = 0
    EpochCounter.infos = []
    client = _client(compiled, make_counter, partition_id=3)
    n = len(client.data.y_train)
    _, num_examples, metrics = client.fit(compiled[0].get_weights(), {"server-round": 4, "local-epochs": 3})
    assert EpochCounter.epochs == 3
    assert EpochCounter.batches == 3 * -(-n // 32)
    assert EpochCounter.infos == [CallbackInfo(4, 3, 3, 32, n, 0)]
    assert num_examples == n and metrics["local-epochs-run"] == 3
    assert {"train-loss", "train-accuracy", "fit-seconds"} <= set(metrics)


def test_early_stopping_on_validation_data_stops_the_local_fit(compiled):
    client = _client(compiled, make_early_stopping, validation_fraction=0.25)
    n = len(client.data.y_train)
    _, num_examples, metrics = client.fit(compiled[0].get_weights(), {"server-round": 1})
    assert metrics["local-epochs-run"] == 2  # of 5
    assert "train-val_loss" in metrics and "train-val_accuracy" in metrics
    assert num_examples == n - round(0.25 * n)  # the held-out examples are not trained on


def test_a_learning_rate_schedule_applies_and_is_restored(compiled):
    model = compiled[0]
    initial = model.get_weights()
    weights, _, metrics = _client(compiled, make_frozen_schedule).fit(initial, {"server-round": 1})
    for before, after in zip(initial, weights):
        np.testing.assert_array_equal(before, after)  # learning rate 0: no step moved the model
    assert metrics["train-lr"] == 0.0
    assert float(model.optimizer.learning_rate.numpy()) == pytest.approx(0.01)  # the next client's rate
    trained, _, _ = _client(compiled).fit(initial, {"server-round": 1})  # the fast loop, unaffected
    assert any(not np.allclose(a, b) for a, b in zip(initial, trained))


def test_without_callbacks_the_fast_loop_runs(compiled, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("model.fit ran without callbacks")

    monkeypatch.setattr(compiled[0], "fit", forbidden)
    _, _, metrics = _client(compiled).fit(compiled[0].get_weights(), {"server-round": 1})
    assert "local-epochs-run" not in metrics


def test_a_factory_that_returns_no_list_is_named(compiled):
    with pytest.raises(ValueError, match=r"callbacks 'pkg.mod:make' returned EarlyStopping; it must return a list"):
        make_callbacks(make_not_a_list, CallbackInfo(1, 0, 1, 32, 10, 0), "pkg.mod:make")
    with pytest.raises(ValueError, match="not a tf.keras.callbacks.Callback"):
        make_callbacks(lambda info: [object()], CallbackInfo(1, 0, 1, 32, 10, 0), "pkg.mod:make")
    keras3 = pytest.importorskip("keras")
    if keras3.__version__.startswith("3"):
        with pytest.raises(ValueError, match=r"EarlyStopping, not a tf.keras.callbacks.Callback \(a Keras 3 callback"):
            make_callbacks(lambda info: [keras3.callbacks.EarlyStopping()], CallbackInfo(1, 0, 1, 32, 10, 0))


def test_callbacks_and_dp_sgd_batches_are_refused_by_the_client():
    model = build_model("logreg", (4,), 2, seed=0)
    with pytest.raises(ValueError, match="cannot draw DP-SGD's batches"):
        KerasClient(model, None, callbacks=make_counter, epoch_batches=lambda n, b: [np.arange(n)])  # type: ignore[arg-type]


def test_validation_split_is_seeded_disjoint_and_leaves_training_data():
    x, y = np.arange(20).reshape(10, 2), np.arange(10)
    _, yt, validation = validation_split(x, y, 0.3, seed=5)
    assert validation is not None
    yv = validation[1]
    assert len(yv) == 3 and len(yt) == 7 and set(yt).isdisjoint(yv) and set(yt) | set(yv) == set(range(10))
    assert np.array_equal(validation_split(x, y, 0.3, seed=5)[1], yt)
    assert validation_split(x, y, 0.0, seed=5)[2] is None
    assert len(validation_split(x[:2], y[:2], 0.1, seed=0)[1]) == 1  # at least one held out, one kept


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"callbacks": "earlystop"}, r"callbacks must be \"\" or a factory 'package.module:make'.*got 'earlystop'"),
        ({"callbacks-validation-fraction": 0.2}, r"callbacks-validation-fraction=0.2 .* but callbacks is \"\""),
        (
            {"callbacks": f"{HERE}:make_counter", "dp-sgd-noise-multiplier": 1.0},
            rf"callbacks='{HERE}:make_counter' cannot run with DP-SGD \(dp-sgd-noise-multiplier=1\)",
        ),
        ({"callbacks": f"{HERE}:make_counter", "callbacks-validation-fraction": 0.5}, r"callbacks-validation-fraction"),
    ],
)
def test_settings_refuse_what_cannot_work(config, message):
    with pytest.raises(SettingsError, match=message):
        Settings.client_from_run_config(config)


def test_callbacks_through_a_federation():
    """The run config's key reaches every client: an in-process federation's train replies carry the
    epochs early stopping let run, and the validation loss, under their Keras names."""
    from fl_app.simulation.local_grid import run_local_federation

    _, history = run_local_federation(
        {
            "num-partitions": 2,
            "min-train-clients": 2,
            "min-evaluate-clients": 2,
            "min-available-clients": 2,
            "partitioner": "iid",
            "local-epochs": 4,
            "callbacks": f"{HERE}:make_early_stopping",
            "callbacks-validation-fraction": 0.2,
        },
        num_rounds=1,
    )
    last = history[-1]
    assert last.clients_replied == 2
    assert last.extra["local-epochs-run"] == 2
    assert last.value("train", "val_loss") is not None and last.train_accuracy is not None
