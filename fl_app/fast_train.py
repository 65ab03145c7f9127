"""Cheap local training and evaluation for small client data sets, on a reused compiled model.

``model.fit`` and ``model.evaluate`` cost 0.1-0.5 s per call whatever the data size (a ``tf.data``
pipeline, a data handler, callbacks and a progress bar are built every call), which dominates a
virtual client holding a few hundred examples: on the digits default, ``model.fit`` for 5 epochs
of ~110 examples took ~0.5 s, of which the ~20 optimizer steps take a few milliseconds.

:class:`CompiledLoop` keeps, per Keras model, one ``tf.function`` around the model's own
``train_step`` (so a custom ``train_step``, the compiled loss with ``model.losses`` such as the
FedProx term, and the optimizer's own ``minimize``, e.g. a DP-SGD optimizer, all still apply) and
one ``tf.function`` for a forward pass. Both are traced once per input signature (batch dimension
left open, so clients of different sizes share the trace). One call runs a whole epoch in the graph
(``train_step`` on the gathered batches of a permutation), so a small client pays neither
``model.fit``'s per-call set-up nor a Python round trip per batch.

Shuffling uses NumPy's ``Generator(PCG64(seed))``: the order of the batches depends only on the
seed, so a reused model gives the same result as a fresh one.
"""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np

import fl_app  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)

_LOOPS: "weakref.WeakKeyDictionary[Any, CompiledLoop]" = weakref.WeakKeyDictionary()
EVAL_BATCH = 1024


def loop_for(model) -> CompiledLoop:
    """The :class:`CompiledLoop` of ``model`` (built on first use, then reused)."""
    loop = _LOOPS.get(model)
    if loop is None:
        loop = _LOOPS[model] = CompiledLoop(model)
    return loop


class CompiledLoop:
    """Compiled train step and forward pass of one compiled Keras model, traced once each."""

    def __init__(self, model) -> None:
        if getattr(model, "loss", None) is None:
            raise ValueError("CompiledLoop needs a compiled model (model.compile(optimizer, loss))")
        self.model = model
        self._train_steps: dict[tuple, Any] = {}
        self._eval_steps: dict[tuple, Any] = {}

    # ------------------------------------------------------------------ tracing

    @staticmethod
    def _signature(x: np.ndarray, y: np.ndarray):
        import tensorflow as tf

        return (
            tf.TensorSpec((None, *x.shape[1:]), tf.as_dtype(x.dtype)),
            tf.TensorSpec((None, *y.shape[1:]), tf.as_dtype(y.dtype)),
        )

    def _train_epoch(self, x: np.ndarray, y: np.ndarray):
        """One epoch in one graph: ``train_step`` on ``x[order[i b:(i+1) b]]`` for every batch i."""
        key = (x.shape[1:], x.dtype.str, y.shape[1:], y.dtype.str)
        epoch = self._train_steps.get(key)
        if epoch is None:
            import tensorflow as tf

            model = self.model

            def train_epoch(xs, ys, order, batch_size):
                steps = (tf.shape(order)[0] + batch_size - 1) // batch_size
                first = order[:batch_size]
                # the first step outside the loop: on the first trace it creates the optimizer's
                # and the metrics' variables, which a while-loop body may not do
                logs = model.train_step((tf.gather(xs, first), tf.gather(ys, first)))
                for i in tf.range(1, steps):
                    index = order[i * batch_size:(i + 1) * batch_size]
                    logs = model.train_step((tf.gather(xs, index), tf.gather(ys, index)))
                return logs

            epoch = self._train_steps[key] = tf.function(
                train_epoch,
                input_signature=(
                    *self._signature(x, y),
                    tf.TensorSpec((None,), tf.int32),
                    tf.TensorSpec((), tf.int32),
                ),
            )
        return epoch

    def _eval_step(self, x: np.ndarray, y: np.ndarray):
        key = (x.shape[1:], x.dtype.str, y.shape[1:], y.dtype.str)
        step = self._eval_steps.get(key)
        if step is None:
            import tensorflow as tf

            model = self.model
            loss_fn = tf.keras.losses.get(model.loss)

            def eval_step(xb, yb):
                probabilities = model(xb, training=False)
                loss = tf.reduce_mean(loss_fn(yb, probabilities))  # a DP loss is per example
                if model.losses:
                    loss += tf.add_n(model.losses)
                labels = tf.cast(tf.reshape(yb, [-1]), tf.int64)
                correct = tf.reduce_sum(
                    tf.cast(tf.equal(tf.argmax(probabilities, axis=-1), labels), tf.float32)
                )
                return loss, correct

            step = self._eval_steps[key] = tf.function(
                eval_step, input_signature=self._signature(x, y)
            )
        return step

    # ------------------------------------------------------------------ public

    def fit(
        self, x: np.ndarray, y: np.ndarray, *, epochs: int, batch_size: int, seed: int
    ) -> dict[str, float]:
        """``epochs`` passes of mini-batch training in a seeded random order.

        Returns the last epoch's logs as ``model.fit``'s history has them (e.g. ``loss``,
        ``accuracy``: running means over the epoch's batches, the loss including ``model.losses``).
        """
        n = len(y)
        if n == 0:
            raise ValueError("no training examples")
        import tensorflow as tf

        epoch = self._train_epoch(x, y)
        xs, ys = tf.convert_to_tensor(x), tf.convert_to_tensor(y)
        batch = tf.constant(int(batch_size), tf.int32)
        rng = np.random.Generator(np.random.PCG64(seed))
        logs: dict[str, Any] = {}
        for _ in range(epochs):
            self.model.reset_metrics()
            logs = epoch(xs, ys, rng.permutation(n).astype(np.int32), batch)
        return {key: float(value) for key, value in logs.items()}

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        """(mean loss, accuracy) over ``x, y`` with the model's compiled loss, in large batches."""
        n = len(y)
        if n == 0:
            raise ValueError("no evaluation examples")
        step = self._eval_step(x, y)
        loss_sum, correct = 0.0, 0.0
        for start in range(0, n, EVAL_BATCH):
            xb, yb = x[start:start + EVAL_BATCH], y[start:start + EVAL_BATCH]
            loss, hits = step(xb, yb)
            loss_sum += float(loss) * len(yb)
            correct += float(hits)
        return loss_sum / n, correct / n
