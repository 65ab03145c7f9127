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
    """Evaluates global weights on the server's held-out test set with one compiled model.

    With a simulated ``backdoor`` attack (:meth:`from_settings`) it also reports ``backdoor-success``:
    the fraction of the test examples whose class is not ``backdoor-target`` that, with the trigger
    stamped, the model classifies as the target (:func:`fl_app.attacks.catalogue.backdoor_success`;
    computed as the accuracy on those triggered examples labelled with the target).
    """

    def __init__(self, model, x: np.ndarray, y: np.ndarray, backdoor: tuple[np.ndarray, np.ndarray] | None = None):
        import tensorflow as tf

        self.model = model
        self.model.compile(loss=tf.keras.losses.SparseCategoricalCrossentropy(), metrics=["accuracy"])
        self.x, self.y = x, y
        self.backdoor = backdoor

    @classmethod
    def from_settings(cls, settings: Settings, model, x: np.ndarray, y: np.ndarray) -> CentralEvaluator:
        """The evaluator of the run: with the triggered test set when a ``backdoor`` attack is simulated."""
        if "backdoor" not in settings.attack_names():
            return cls(model, x, y)
        from fl_app.attacks.catalogue import stamp_trigger

        eligible = y != settings.backdoor_target
        triggered = stamp_trigger(x[eligible], settings.backdoor_trigger_size, float(x.max()))
        return cls(model, x, y, (triggered, np.full(int(eligible.sum()), settings.backdoor_target, dtype=y.dtype)))

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        from fl_app.task.compiled_loop import loop_for

        self.model.set_weights(arrays.to_numpy_ndarrays())
        loop = loop_for(self.model)
        loss, accuracy = loop.evaluate(self.x, self.y)
        metrics: dict[str, int | float | list[int] | list[float]] = {"loss": float(loss), "accuracy": float(accuracy)}
        if self.backdoor is not None:
            metrics["backdoor-success"] = float(loop.evaluate(*self.backdoor)[1])
        return MetricRecord(metrics)
