"""The export check judges TFLite by the model's own metric: higher-is-better in points, errors relatively."""

import numpy as np
import pytest

from fl_app.delivery.shipping import BestWeights, judge
from fl_app.server.run_directory import RoundRecord
from fl_app.task.losses import agreement


def _report(metric: str, keras: float, tflite: float) -> dict:
    return {
        "metric": metric,
        "models": {
            "final": {
                "keras": {f"centralized_{metric}": keras},
                "tflite": {"float32": {f"centralized_{metric}": tflite}},
            }
        },
    }


@pytest.mark.parametrize(
    ("metric", "keras", "tflite", "ready"),
    [
        ("mae", 0.50, 0.504, True),  # 0.8 % above: within 1 % relative
        ("mae", 0.50, 0.51, False),  # 2 % above
        ("mae", 0.50, 0.40, True),  # a smaller error is never a failure
        ("auc", 0.95, 0.945, True),
        ("auc", 0.95, 0.93, False),
    ],
)
def test_judge_by_the_models_metric(metric, keras, tflite, ready):
    report = judge(_report(metric, keras, tflite), tolerance=0.01)
    assert report["ready"] is ready
    if not ready:
        assert f"centralized {metric}" in report["reasons"][0]


def test_best_round_of_an_error_is_its_smallest():
    from flwr.app import ArrayRecord

    best = BestWeights()
    for round_, mae in ((0, 0.9), (1, 0.6), (2, 0.4), (3, 0.5)):
        record = RoundRecord(round=round_)
        record.set_metrics("centralized", {"loss": 1.0, "mae": mae})
        best.update(record, ArrayRecord([np.full(2, round_, np.float32)]))
    assert (best.round, best.metric, best.value) == (2, "mae", 0.4)


def test_agreement_by_task():
    keras = np.array([[0.2], [0.7], [0.9]])
    assert agreement(keras, np.array([[0.3], [0.4], [0.8]]), "binary") == (
        "threshold_agreement_with_keras",
        pytest.approx(2 / 3),
    )
    assert agreement(keras, keras + 0.1, "regression") == ("mean_abs_difference_from_keras", pytest.approx(0.1))
    probs = np.array([[0.1, 0.9], [0.8, 0.2]])
    assert agreement(probs, probs[::-1], "multiclass") == ("argmax_agreement_with_keras", 0.0)
