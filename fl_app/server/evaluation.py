"""Centralized evaluation of the global model on the server's held-out test set."""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, MetricRecord

from fl_app.config.settings import Settings
from fl_app.task.output_spec import OutputSpec


def model_spec(settings: Settings) -> tuple[tuple[int, ...], OutputSpec, tuple[np.ndarray, np.ndarray] | None]:
    """(input shape, the task's :class:`OutputSpec`, server test set or None) for the configured data."""
    from fl_app.task.data import declared_spec, federated_data, per_node_loader

    if settings.dataset == "local-file" or per_node_loader(settings.dataset):
        shape = settings.parsed_input_shape()
        least = 1 if settings.task in ("multilabel", "regression") else 2
        if shape is None or settings.num_classes < least:  # Settings.validate requires it for local-file
            raise ValueError(
                f"dataset='{settings.dataset}' gives each node its own data and the server none, so the server "
                f"builds the nodes' model from input-shape and num-classes (>= {least}, with task); got "
                f"input-shape='{settings.input_shape}', num-classes={settings.num_classes}"
            )
        return shape, declared_spec(settings), None
    data = federated_data(settings)
    shape = settings.parsed_input_shape() or data.input_shape
    test = (data.x_server_test.reshape((-1, *shape)), data.y_server_test)
    return shape, data.spec, test if len(test[1]) else None


class CentralEvaluator:
    """Evaluates global weights on the server's held-out test set with one compiled model: the
    user's compile (loss, metrics) if the model has one, else its task's loss and metrics; the
    results keep their Keras names (``loss``, ``accuracy``, ``mae``, ...).

    With a simulated ``backdoor`` attack (:meth:`from_settings`) it also reports ``backdoor-success``:
    the fraction of the test examples whose class is not ``backdoor-target`` that, with the trigger
    stamped, the model classifies as the target (:func:`fl_app.attacks.catalogue.backdoor_success`).
    """

    def __init__(
        self,
        model,
        x: np.ndarray,
        y: np.ndarray,
        spec: OutputSpec | None = None,
        backdoor: tuple[np.ndarray, np.ndarray, int] | None = None,
    ) -> None:
        from fl_app.task.keras_client import compile_model
        from fl_app.task.output_spec import infer_output_spec

        compile_model(model, spec=spec or infer_output_spec(y), with_proximal_term=False)
        self.model = model
        self.x, self.y = x, y
        self.backdoor = backdoor

    @classmethod
    def from_settings(
        cls, settings: Settings, model, x: np.ndarray, y: np.ndarray, spec: OutputSpec | None = None
    ) -> CentralEvaluator:
        """The evaluator of the run: with the triggered test set when a ``backdoor`` attack is simulated."""
        if "backdoor" not in settings.attack_names():
            return cls(model, x, y, spec)
        from fl_app.attacks.catalogue import stamp_trigger

        eligible = y != settings.backdoor_target
        triggered = stamp_trigger(x[eligible], settings.backdoor_trigger_size, float(x.max()))
        return cls(model, x, y, spec, (triggered, y[eligible], settings.backdoor_target))

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        from fl_app.task.compiled_loop import loop_for

        self.model.set_weights(arrays.to_numpy_ndarrays())
        metrics: dict[str, int | float | list[int] | list[float]] = dict(
            loop_for(self.model).evaluate(self.x, self.y).items()
        )
        if self.backdoor is not None:
            from fl_app.attacks.catalogue import backdoor_success

            triggered, labels, target = self.backdoor
            scores = np.asarray(self.model.predict(triggered, batch_size=1024, verbose=0))
            classes = scores.argmax(axis=-1) if scores.ndim == 2 and scores.shape[1] > 1 else scores.ravel() > 0.5
            metrics["backdoor-success"] = backdoor_success(classes.astype(labels.dtype), labels, target)
        return MetricRecord(metrics)
