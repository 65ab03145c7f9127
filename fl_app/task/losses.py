"""Losses and metrics for a task: the defaults of an uncompiled model, and DP-SGD's per-example loss.

An uncompiled model's loss follows from its task and its output layer (:func:`default_loss`):
mean squared error for regression; binary cross-entropy for one sigmoid unit (binary) or for
multi-label outputs; categorical cross-entropy for one-hot targets; sparse categorical
cross-entropy for integer classes. An output layer without an activation (linear) gives logits
(``from_logits=True``). Its metrics (:func:`default_metrics`) are ``accuracy`` for classification,
``binary_accuracy`` for multi-label and ``mae`` for regression, reported under those Keras names.

DP-SGD needs the loss of every example, not the batch mean (:func:`per_example_loss`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

import fl_app  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)
from fl_app.task.output_spec import OutputSpec


def output_units(model) -> int:
    """Width of the model's (single) output."""
    shape = model.output_shape
    if isinstance(shape, list):
        raise ValueError(
            f"model '{model.name}' has {len(shape)} outputs; an uncompiled model must have one output "
            "(compile a multi-output model yourself, with a loss per output)"
        )
    return int(np.prod([d for d in shape[1:] if d is not None])) if len(shape) > 1 else 1


def gives_logits(model) -> bool:
    """Whether the model's last layer has no squashing activation (linear: logits)."""
    import tensorflow as tf

    activation = getattr(model.layers[-1], "activation", None) if model.layers else None
    return activation is None or activation is tf.keras.activations.linear


def default_loss(model, spec: OutputSpec):
    """The loss of an uncompiled ``model`` for ``spec`` (see the module docstring)."""
    import tensorflow as tf

    losses = tf.keras.losses
    if spec.task == "regression":
        return losses.MeanSquaredError()
    logits = gives_logits(model)
    units = output_units(model)
    if spec.task == "multilabel" or units == 1:
        if units != spec.units:
            raise ValueError(f"model '{model.name}' has {units} output units; task '{spec.task}' needs {spec.units}")
        return losses.BinaryCrossentropy(from_logits=logits)
    if units != spec.num_classes:
        raise ValueError(
            f"model '{model.name}' has {units} output units but the data has {spec.num_classes} classes "
            "(end the model in one unit per class, or one sigmoid unit for binary labels)"
        )
    if spec.one_hot:
        return losses.CategoricalCrossentropy(from_logits=logits)
    return losses.SparseCategoricalCrossentropy(from_logits=logits)


def default_metrics(model, spec: OutputSpec) -> list[Any]:
    """The metrics of an uncompiled ``model`` for ``spec``, under their Keras names."""
    import tensorflow as tf

    if spec.task == "regression":
        return ["mae"]
    threshold = 0.0 if gives_logits(model) else 0.5
    if spec.task == "multilabel":
        return [tf.keras.metrics.BinaryAccuracy(name="binary_accuracy", threshold=threshold)]
    if output_units(model) == 1:
        return [tf.keras.metrics.BinaryAccuracy(name="accuracy", threshold=threshold)]
    return ["accuracy"]


def user_metrics(model) -> Any:
    """The metrics a compiled model was compiled with (as given to ``compile``), to recompile it."""
    container = getattr(model, "compiled_metrics", None)
    return getattr(container, "_user_metrics", None)  # tf.keras keeps compile's argument there


def _wrap_per_example(fn, name: str):
    """A reduction-NONE Keras loss around a loss function of ``(y_true, y_pred)``."""
    import tensorflow as tf

    class PerExampleLoss(tf.keras.losses.Loss):
        def call(self, y_true, y_pred):
            return fn(y_true, y_pred)

    return PerExampleLoss(reduction=tf.keras.losses.Reduction.NONE, name=name)


def per_example_loss(loss: Any, model, input_shape: tuple[int, ...], spec: OutputSpec) -> Any:
    """A version of ``loss`` that returns one value per example, as DP-SGD's optimizers need.

    A Keras ``Loss`` object is rebuilt from its config with ``reduction='none'``; a loss name or
    a function of ``(y_true, y_pred)`` is wrapped in a reduction-NONE ``Loss``. The result is
    checked on a batch of two examples: a loss that still returns one number per batch (e.g. a
    function that takes the mean itself) is refused with what to change.
    """
    import tensorflow as tf

    losses = tf.keras.losses
    name = loss if isinstance(loss, str) else getattr(loss, "name", getattr(loss, "__name__", type(loss).__name__))
    if isinstance(loss, (list, tuple, dict)):
        raise ValueError(
            f"DP-SGD (dp-sgd-noise-multiplier > 0) needs a single per-example loss; the model has several ({name})"
        )
    resolved = losses.get(loss) if isinstance(loss, str) else loss
    if isinstance(resolved, losses.Loss):
        config = dict(resolved.get_config())
        config["reduction"] = losses.Reduction.NONE
        try:
            rebuilt = type(resolved).from_config(config)
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"DP-SGD cannot rebuild the model's loss '{name}' with reduction='none' ({err}): give the "
                "loss class a get_config/from_config that accepts 'reduction', or compile with a loss function"
            ) from err
    elif callable(resolved):
        rebuilt = _wrap_per_example(resolved, str(name))
    else:
        raise ValueError(f"DP-SGD needs a loss function or tf.keras Loss; the model's loss is {type(loss).__name__}")
    n = 2
    units = output_units(model)
    sparse = spec.classification and spec.task != "multilabel" and not spec.one_hot and units > 1
    y = np.zeros((n,) if sparse else (n, units), np.float32)
    values = rebuilt(tf.convert_to_tensor(y), model(np.zeros((n, *input_shape), np.float32), training=False))
    if values.shape.rank != 1 or values.shape[0] != n:
        raise ValueError(
            f"DP-SGD needs one loss value per example; the model's loss '{name}' returns shape "
            f"{tuple(values.shape)} for {n} examples: make it return a vector (no reduction over the batch)"
        )
    return rebuilt


def score_predictions(model, y: np.ndarray, predictions: np.ndarray) -> dict[str, float]:
    """The compiled metrics of ``model`` (Keras names) on given ``predictions`` of targets ``y``,
    e.g. a TFLite interpreter's outputs, scored exactly as Keras scores the model's own."""
    import tensorflow as tf

    model.reset_metrics()
    results = model.compute_metrics(None, tf.convert_to_tensor(y), tf.convert_to_tensor(predictions), None)
    model.reset_metrics()
    return {name: float(value) for name, value in results.items() if name != "loss"}


def agreement(keras_predictions: np.ndarray, other: np.ndarray, task: str, threshold: float = 0.5) -> tuple[str, float]:
    """How closely ``other`` (e.g. TFLite's outputs) follows Keras' predictions: the share of the
    same decisions (argmax of several outputs; ``threshold`` of one output or of multi-label
    outputs: 0.5 for probabilities, 0 for logits), or for regression the mean absolute difference.
    Returns (report key, value)."""
    keras_predictions, other = np.asarray(keras_predictions), np.asarray(other)
    if task == "regression":
        return "mean_abs_difference_from_keras", float(np.mean(np.abs(keras_predictions - other)))
    if task == "multilabel" or keras_predictions.reshape(len(keras_predictions), -1).shape[1] == 1:
        same = (keras_predictions > threshold) == (other > threshold)
        return "threshold_agreement_with_keras", float(np.mean(same))
    return "argmax_agreement_with_keras", float(
        np.mean(np.argmax(keras_predictions, axis=-1) == np.argmax(other, axis=-1))
    )
