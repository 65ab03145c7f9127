"""Integration: the bring-your-own-model examples (``examples/``, outside ``fl_app``) train through the app.

The binary classifier runs through ``fl-keras-run`` (a real Flower simulation, with a TFLite export
checked by the model's own metric); the regression, a one-hot multi-class data set and a robust +
DP-SGD run, a central DP run and a compressed run of the user's binary model run in-process on a
LocalGrid (the same ClientApp code). Each run's TensorBoard events, read back with TensorBoard's
reader, equal its history under the model's metric names.
"""

import json
import math

import numpy as np
import pytest

from tests.events import history_scalars, read_events
from tests.helpers import run_to_completion

pytestmark = pytest.mark.integration

BINARY = "model='examples.breast_cancer.model:build' dataset='examples.breast_cancer.data:load'"


def onehot_digits():
    """Digits with one-hot labels: a user's loader for a multi-class task given as one-hot rows."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.data.astype(np.float32) / 16.0, np.eye(10, dtype=np.float32)[digits.target]


def _federation(run_config: dict, rounds: int = 3, events_dir=None):
    """The federation in-process; with ``events_dir``, its TensorBoard events written there by the
    trackers the ServerApp would make (:meth:`RunTracker.for_run`)."""
    from fl_app.config.settings import Settings
    from fl_app.server.strategy_setup import make_strategy
    from fl_app.server.tracking import RunTracker
    from fl_app.simulation.local_grid import run_local_federation

    config = {
        "num-partitions": 3,
        "min-train-clients": 3,
        "min-evaluate-clients": 3,
        "min-available-clients": 3,
        "partitioner": "iid",
        "local-epochs": 2,
        "batch-size": 16,
        **run_config,
    }
    tracker = None
    if events_dir is not None:  # the ServerApp's trackers for these settings and this strategy's privacy
        settings = Settings.from_run_config(config)
        tracker = RunTracker.for_run(settings, events_dir, make_strategy(settings).dp_mode)
    history = run_local_federation(
        config,
        num_rounds=rounds,
        on_round_end=(lambda record, arrays: tracker.log_round(record)) if tracker else None,
        observe_replies=tracker.observe_replies if tracker else None,
    )[1]
    if tracker is not None:
        tracker.finish([])
    return history


def _assert_events_hold(events_dir, history, names: set[str]) -> None:
    """The events (read back with TensorBoard's reader) equal the history, under the model's metric names."""
    scalars, histograms = read_events(events_dir)
    expected = history_scalars(history)
    assert set(scalars) == set(expected)
    for tag, steps in expected.items():
        assert scalars[tag] == pytest.approx(steps, rel=1e-6), tag
    for scope in ("centralized", "federated", "train"):
        assert {tag.split("/")[1] for tag in scalars if tag.startswith(f"{scope}/")} == names | {"loss"}
    assert "clients/update_norm" in histograms


def test_binary_example_through_fl_keras_run(tmp_path):
    run = run_to_completion(
        tmp_path / "outputs",
        3,
        f"{BINARY} num-server-rounds=3 local-epochs=2 batch-size=16 min-train-clients=3 "
        "min-available-clients=3 partitioner='iid' export='tflite' export-tflite-types='float32'",
    )
    history = run.history
    last = history[-1]
    for scope in ("centralized", "federated", "train"):
        assert 0.0 <= last[f"{scope}_accuracy"] <= 1.0 and 0.5 < last["metrics"][f"{scope}_auc"] <= 1.0
    assert last["metrics"]["centralized_auc"] > history[0]["metrics"]["centralized_auc"]
    assert "centralized_auc" in (run.run_dir / "history.csv").read_text().splitlines()[0]
    summary = json.loads((run.run_dir / "summary.json").read_text())
    assert summary["headline metric"] == "accuracy"
    assert np.isclose(summary["final centralized auc"], last["metrics"]["centralized_auc"])
    card = (run.run_dir / "model_card.md").read_text()
    assert "`auc`" in card and "task: auto" in card
    report = json.loads((run.run_dir / "export_check.json").read_text())
    float32 = report["models"]["final"]["tflite"]["float32"]
    assert report["metric"] == "accuracy" and report["ready"], report["reasons"]
    assert float32["threshold_agreement_with_keras"] >= 0.99 and "federated_accuracy" in float32
    assert (run.run_dir / "metrics.png").stat().st_size > 1000
    _assert_events_hold(run.run_dir, history, {"accuracy", "auc"})  # written by the ServerApp of the simulation

    import tensorflow as tf

    model = tf.keras.models.load_model(run.run_dir / "model.keras")
    assert model.output_shape == (None, 1) and model.loss == "binary_crossentropy"


def test_regression_example_reports_mae(tmp_path):
    history = _federation(
        {"model": "examples.diabetes.model:build", "dataset": "examples.diabetes.data:load", "learning-rate": 0.01},
        events_dir=tmp_path,
    )
    _assert_events_hold(tmp_path, history, {"mae"})
    first, last = history[0], history[-1]
    assert last.centralized_accuracy is None and set(last.metric_names()) == {"mae"}
    assert last.value("centralized", "mae") < first.value("centralized", "mae")
    assert last.value("federated", "mae") is not None and last.value("train", "mae") is not None


def test_one_hot_multiclass_with_a_builtin_model(tmp_path):
    history = _federation({"model": "mlp", "dataset": f"{__name__}:onehot_digits"}, rounds=2, events_dir=tmp_path)
    _assert_events_hold(tmp_path, history, {"accuracy"})
    assert history[-1].centralized_accuracy > 0.6 > history[0].centralized_accuracy


def test_compressed_uploads_with_a_users_binary_model():
    history = _federation(
        {
            "model": "examples.breast_cancer.model:build",
            "dataset": "examples.breast_cancer.data:load",
            "compression": "int8",
            "strategy": "robust",
        },
        rounds=2,
    )
    assert history[-1].clients_failed == 0 and history[-1].value("centralized", "auc") > 0.8


def test_robust_and_dp_sgd_with_a_users_binary_model():
    history = _federation(
        {
            "model": "examples.breast_cancer.model:build",
            "dataset": "examples.breast_cancer.data:load",
            "strategy": "robust",
            "aggregation-rule": "median",
            "dp-sgd-noise-multiplier": 0.5,
            "optimizer": "sgd",
            "learning-rate": 0.1,
        },
        rounds=2,
    )
    last = history[-1]
    assert last.clients_failed == 0 and last.extra["dp-sgd-epsilon-max"] > 0
    assert last.value("centralized", "auc") > 0.8


def test_central_dp_with_a_users_binary_model(tmp_path):
    """DP-FedAvg (central: the server clips and noises) around the user's compiled binary model;
    epsilon is accounted every round and is in the TensorBoard events, the update norms are not."""
    history = _federation(
        {
            "model": "examples.breast_cancer.model:build",
            "dataset": "examples.breast_cancer.data:load",
            "strategy": "dp-fedavg",
            "dp-mode": "central",
            "dp-noise-multiplier": 0.1,
            "dp-clip-norm": 1.0,
            "dp-sampling": "fixed-size",
            "local-epochs": 5,
        },
        rounds=2,
        events_dir=tmp_path,
    )
    last = history[-1]
    # three clients need little noise to learn, so epsilon is large (here about 295, then 535): the
    # run shows the wiring (clip, noise, accountant) with a user's model, not a useful guarantee
    assert last.clients_failed == 0 and 0 < history[1].extra["epsilon"] < last.extra["epsilon"] < math.inf
    assert last.value("centralized", "auc") > 0.8
    scalars, histograms = read_events(tmp_path)
    assert "clients/update_norm" not in histograms
    assert scalars["privacy/epsilon"] == pytest.approx({1: history[1].extra["epsilon"], 2: last.extra["epsilon"]})


def test_a_users_cnn_trains_with_the_users_callbacks():
    """examples/digits_cnn: a user's compiled CNN from a module outside the package, with the user's
    callbacks on every client: the per-round learning rate reaches every fit, and early stopping on
    the local validation split can end a fit before its epochs."""
    from examples.digits_cnn.model import BASE_LEARNING_RATE, ROUND_DECAY

    history = _federation(
        {
            "model": "examples.digits_cnn.model:build",
            "callbacks": "examples.digits_cnn.model:callbacks",
            "callbacks-validation-fraction": 0.2,
            "local-epochs": 4,
        },
        rounds=3,
    )
    rounds = [record for record in history if record.round > 0]
    assert [record.value("train", "lr") for record in rounds] == pytest.approx(
        [BASE_LEARNING_RATE * ROUND_DECAY ** (record.round - 1) for record in rounds], rel=1e-5
    )
    assert all(1 <= record.extra["local-epochs-run"] <= 4 for record in rounds)
    assert all(record.value("train", "val_accuracy") is not None for record in rounds)
    assert history[-1].centralized_accuracy > max(0.5, history[0].centralized_accuracy + 0.3)
