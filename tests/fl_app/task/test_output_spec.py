"""Task inference from targets, stratification and metric naming (no TensorFlow)."""

import numpy as np
import pytest

from fl_app.server.run_directory import RoundRecord, headline
from fl_app.task.output_spec import OutputSpec, headline_metric, infer_output_spec, lower_is_better, strata


@pytest.mark.parametrize(
    ("y", "task", "expected"),
    [
        (np.arange(20) % 10, "auto", OutputSpec("multiclass", 10, 10)),
        (np.arange(20) % 2, "auto", OutputSpec("binary", 1, 2)),
        (np.eye(3)[np.arange(9) % 3], "auto", OutputSpec("multiclass", 3, 3, one_hot=True)),
        (np.array([[1, 0, 1], [0, 0, 1], [1, 1, 0]]), "auto", OutputSpec("multilabel", 3, 3)),
        (np.array([0.5, 2.25, -1.0]), "auto", OutputSpec("regression", 1)),
        (np.array([[0.5, 1.0], [2.0, 3.5]]), "auto", OutputSpec("regression", 2)),
        (np.array([3, 7, 120]), "regression", OutputSpec("regression", 1)),
        (np.array([0, 1, 1]), "multiclass", OutputSpec("multiclass", 2, 2)),
    ],
)
def test_task_inferred_from_targets(y, task, expected):
    assert infer_output_spec(y, task) == expected


def test_num_classes_keeps_classes_the_labels_do_not_show():
    assert infer_output_spec(np.array([0, 1, 1]), num_classes=5) == OutputSpec("multiclass", 5, 5)


@pytest.mark.parametrize(
    ("y", "task", "fragment"),
    [
        (np.array([0, 1, 2]), "binary", "task 'binary' needs labels 0 and 1; found 3 classes"),
        (np.array([0.5, 1.0]), "multiclass", "task 'multiclass' needs integer (or 0/1) targets >= 0"),
        (np.array([0, 1]), "multilabel", "task 'multilabel' needs targets of shape (n, labels)"),
        (
            np.array([0, 1]),
            "ranking",
            "task must be one of auto, multiclass, binary, multilabel, regression; got 'ranking'",
        ),
        (np.array([0.0, np.nan]), "auto", "targets hold NaN or infinite values"),
    ],
)
def test_impossible_task_says_why(y, task, fragment):
    with pytest.raises(ValueError) as err:
        infer_output_spec(y, task)
    assert fragment in str(err.value)


def test_regression_strata_are_quantile_bins():
    y = np.linspace(0.0, 1.0, 100)
    groups = strata(y, OutputSpec("regression", 1), bins=4)
    assert sorted(np.unique(groups)) == [0, 1, 2, 3] and np.all(np.diff(groups) >= 0)
    assert list(strata(np.eye(3)[[2, 0, 1]], OutputSpec("multiclass", 3, 3, one_hot=True))) == [2, 0, 1]


def test_metric_direction_and_headline():
    assert lower_is_better("mae") and lower_is_better("mean_squared_error") and lower_is_better("loss")
    assert not lower_is_better("accuracy") and not lower_is_better("auc")
    assert headline_metric(["loss", "auc", "accuracy"]) == "accuracy"
    assert headline_metric(["loss", "mae"]) == "mae" and headline_metric(["loss"]) is None


def test_round_record_keeps_keras_names_in_history_rows():
    record = RoundRecord(round=1)
    others = record.set_metrics("train", {"train-loss": 0.5, "train-auc": 0.9, "fit-seconds": 1.0}, prefix="train-")
    record.set_metrics("centralized", {"loss": 0.4, "mae": 0.3})
    assert others == {"fit-seconds": 1.0}
    assert record.train_loss == 0.5 and record.value("train", "auc") == 0.9
    assert record.value("centralized", "mae") == 0.3 and record.centralized_accuracy is None
    row = record.flat()
    assert row["centralized_mae"] == 0.3 and row["train_auc"] == 0.9
    assert headline([record]) == "auc"
