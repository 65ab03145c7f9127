"""Local training with a user's Keras callbacks: ``model.fit`` instead of the compiled fast loop.

The run config's ``callbacks='package.module:make'`` names a factory that every client calls at
the start of every local fit::

    def make(info: CallbackInfo) -> list[tf.keras.callbacks.Callback]: ...

``info`` (:class:`CallbackInfo`) says which round and partition the fit is for, its epochs, batch
size and example counts, and whether there is validation data. The factory returns **new**
callback objects each call (callbacks such as ``EarlyStopping`` keep state across epochs; the
worker's compiled model is reused by many virtual clients, so state must not leak between fits).
Any ``tf.keras`` callback works: ``EarlyStopping`` on ``val_loss`` (with
``callbacks-validation-fraction`` > 0), ``LearningRateScheduler``, ``ReduceLROnPlateau``, a
user's own ``Callback`` subclass.

With callbacks, local training is ``model.fit(..., callbacks=…, verbose=0)``: every Keras hook
runs as Keras documents it. Its per-call set-up costs more than the compiled loop
(:mod:`fl_app.task.compiled_loop`, the default without callbacks): ``scripts/client_cost.py``
measures both. The optimizer's learning rate is restored after the fit, so that a schedule of one
client never carries over to the next client or round on the same reused model. Batches are
shuffled by ``model.fit`` (TensorFlow's seeded global generator), not by the fast loop's
per-round NumPy permutation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

import fl_app  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)
from fl_app.task.targets import keras_targets


@dataclasses.dataclass(frozen=True)
class CallbackInfo:
    """What a callback factory learns about the local fit it makes callbacks for.

    Attributes
    ----------
    server_round : the round this fit belongs to (0 outside a federation)
    partition_id : the client's partition (node) id
    local_epochs : epochs ``model.fit`` runs at most (a callback may stop it earlier)
    batch_size : local batch size
    num_train_examples : examples the model trains on
    num_validation_examples : examples held out as validation data (``callbacks-validation-fraction``);
        0: no ``val_*`` logs, so monitor ``loss`` rather than ``val_loss``
    """

    server_round: int
    partition_id: int
    local_epochs: int
    batch_size: int
    num_train_examples: int
    num_validation_examples: int


CallbackFactory = Callable[[CallbackInfo], list[Any]]
"""``make(info) -> list[tf.keras.callbacks.Callback]``."""


def load_callback_factory(path: str) -> CallbackFactory:
    """The factory that ``callbacks='package.module:make'`` names; ``ValueError`` naming the key,
    the value and what is allowed if it cannot be imported or is not callable."""
    from strategies.core.loading import StrategyNameError, load_object

    try:
        factory = load_object(path, key="callbacks")
    except StrategyNameError as err:
        raise ValueError(f"{err} (callbacks names a factory make(info) -> list of tf.keras callbacks)") from err
    return factory


def make_callbacks(factory: CallbackFactory, info: CallbackInfo, path: str = "callbacks") -> list[Any]:
    """``factory(info)``, checked: a list (or tuple) of ``tf.keras.callbacks.Callback`` objects."""
    import tensorflow as tf

    made = factory(info)
    if not isinstance(made, (list, tuple)):
        raise ValueError(
            f"callbacks '{path}' returned {type(made).__name__}; it must return a list of tf.keras callbacks"
        )
    for callback in made:
        if not isinstance(callback, tf.keras.callbacks.Callback):
            module = type(callback).__module__
            hint = " (a Keras 3 callback: use tf.keras.callbacks)" if module.startswith("keras.") else ""
            raise ValueError(
                f"callbacks '{path}' returned a {module}.{type(callback).__name__}, not a "
                f"tf.keras.callbacks.Callback{hint}"
            )
    return list(made)


def validation_split(
    x: np.ndarray, y: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
    """``(x_train, y_train, (x_val, y_val) or None)``: a seeded ``fraction`` of the examples held
    out (at least one, and at least one left to train on), or None when ``fraction`` is 0."""
    n = len(y)
    held = int(round(fraction * n))
    if fraction <= 0 or n < 2:
        return x, y, None
    held = min(max(held, 1), n - 1)
    order = np.random.Generator(np.random.PCG64(seed)).permutation(n)
    train, val = np.sort(order[held:]), np.sort(order[:held])
    return x[train], y[train], (x[val], y[val])


def fit_with_callbacks(
    model,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    callbacks: list[Any],
    validation: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[dict[str, float], int]:
    """``model.fit`` with ``callbacks``; returns the last epoch's logs (Keras names; ``val_*`` for
    the validation data) and the number of epochs that ran (fewer when a callback stopped it).

    The optimizer's learning rate is put back afterwards (a schedule changes it in place).
    """
    import tensorflow as tf

    rate = getattr(model.optimizer, "learning_rate", None)
    learning_rate: tf.Variable | None = rate if isinstance(rate, tf.Variable) else None
    saved = None if learning_rate is None else learning_rate.numpy()
    try:
        if validation is not None:
            validation = (validation[0], keras_targets(validation[1]))
        history = model.fit(
            x,
            keras_targets(y),
            epochs=epochs,
            batch_size=batch_size,
            shuffle=True,
            callbacks=callbacks,
            validation_data=validation,
            verbose=0,
        )
    finally:
        if learning_rate is not None:
            learning_rate.assign(saved)
    logs = {key: float(values[-1]) for key, values in history.history.items() if values}
    ran = len(next(iter(history.history.values()), []))
    return logs, ran
