"""Integration: the bring-your-own-model examples (``examples/``, outside ``fl_app``) train through the app.

The binary classifier runs through ``fl-keras-run`` (a real Flower simulation, with a TFLite export
checked by the model's own metric); the regression, a one-hot multi-class data set and a robust +
DP-SGD run and a compressed run of the user's binary model run in-process on a LocalGrid (the same ClientApp code).
"""

import json

import numpy as np
import pytest

from tests.helpers import run_to_completion

pytestmark = pytest.mark.integration

BINARY = "model='examples.breast_cancer.model:build' dataset='examples.breast_cancer.data:load'"


def onehot_digits():
    """Digits with one-hot labels: a user's loader for a multi-class task given as one-hot rows."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.data.astype(np.float32) / 16.0, np.eye(10, dtype=np.float32)[digits.target]


def _federation(run_config: dict, rounds: int = 3):
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
    return run_local_federation(config, num_rounds=rounds)[1]


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

    import tensorflow as tf

    model = tf.keras.models.load_model(run.run_dir / "model.keras")
    assert model.output_shape == (None, 1) and model.loss == "binary_crossentropy"


def test_regression_example_reports_mae():
    history = _federation(
        {"model": "examples.diabetes.model:build", "dataset": "examples.diabetes.data:load", "learning-rate": 0.01}
    )
    first, last = history[0], history[-1]
    assert last.centralized_accuracy is None and set(last.metric_names()) == {"mae"}
    assert last.value("centralized", "mae") < first.value("centralized", "mae")
    assert last.value("federated", "mae") is not None and last.value("train", "mae") is not None


def test_one_hot_multiclass_with_a_builtin_model():
    history = _federation({"model": "mlp", "dataset": f"{__name__}:onehot_digits"}, rounds=2)
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
