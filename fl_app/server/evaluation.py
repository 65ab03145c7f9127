"""Centralized evaluation of the global model on the server's held-out test set."""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, MetricRecord

from fl_app.config.settings import Settings


def model_spec(settings: Settings) -> tuple[tuple[int, ...], int, tuple[np.ndarray, np.ndarray] | None]:
    """(input shape, number of classes, server test set or None) for the configured data."""
    if settings.dataset == "local-file":
        shape = settings.parsed_input_shape()
        if shape is None:  # Settings.validate requires it; this keeps the promise explicit
            raise ValueError("dataset='local-file' needs input-shape so that the server builds the nodes' model")
        return shape, settings.num_classes, None
    from fl_app.task.data import federated_data

    data = federated_data(settings)
    shape = settings.parsed_input_shape() or data.input_shape
    test = (data.x_server_test.reshape((-1, *shape)), data.y_server_test)
    return shape, settings.num_classes or data.num_classes, test if len(test[1]) else None


class CentralEvaluator:
    """Evaluates global weights on the server's held-out test set with one compiled model."""

    def __init__(self, model, x: np.ndarray, y: np.ndarray) -> None:
        import tensorflow as tf

        self.model = model
        self.model.compile(loss=tf.keras.losses.SparseCategoricalCrossentropy(), metrics=["accuracy"])
        self.x, self.y = x, y

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        from fl_app.task.compiled_loop import loop_for

        self.model.set_weights(arrays.to_numpy_ndarrays())
        loss, accuracy = loop_for(self.model).evaluate(self.x, self.y)
        return MetricRecord({"loss": float(loss), "accuracy": float(accuracy)})
