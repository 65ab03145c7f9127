"""Cheap local training and evaluation for small client data sets, on a reused compiled model.

``model.fit`` and ``model.evaluate`` cost 0.1-0.5 s per call whatever the data size (a ``tf.data``
pipeline, a data handler, callbacks and a progress bar are built every call), which dominates a
virtual client holding a few hundred examples: on the digits default, ``model.fit`` for 5 epochs
of ~110 examples took ~0.5 s, of which the ~20 optimizer steps take a few milliseconds.

:class:`CompiledLoop` keeps, per Keras model, one ``tf.function`` around the model's own
``train_step`` (so a custom ``train_step``, the compiled loss with ``model.losses`` such as the
FedProx term, and the optimizer's own ``minimize``, e.g. a DP-SGD optimizer, all still apply) and
one ``tf.function`` for a forward pass. Both are traced once per input signature (batch dimension
left open, so clients of different sizes share the trace). One call runs many batches in the graph
(``train_step`` on gathered batches of seeded permutations): a fit is two calls, the epochs before
the last and then the last, so a small client pays neither ``model.fit``'s per-call set-up nor a
Python round trip per batch or per epoch.

Shuffling uses NumPy's ``Generator(PCG64(seed))``: the order of the batches depends only on the
seed, so a reused model gives the same result as a fresh one.
"""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np

import fl_app  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)

_LOOPS: weakref.WeakKeyDictionary[Any, CompiledLoop] = weakref.WeakKeyDictionary()
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

    def _train_batches(self, x: np.ndarray, y: np.ndarray):
        """Many batches in one graph: ``train_step`` on ``x[order[starts[i]:starts[i+1]]]`` for
        every i, so several epochs (each its own permutation, its last batch possibly partial) cost
        one call."""
        key = (x.shape[1:], x.dtype.str, y.shape[1:], y.dtype.str)
        batches = self._train_steps.get(key)
        if batches is None:
            import tensorflow as tf

            model = self.model

            def train_batches(xs, ys, order, starts):
                first = order[starts[0] : starts[1]]
                # the first step outside the loop: on the first trace it creates the optimizer's
                # and the metrics' variables, which a while-loop body may not do
                logs = model.train_step((tf.gather(xs, first), tf.gather(ys, first)))
                for i in tf.range(1, tf.shape(starts)[0] - 1):
                    index = order[starts[i] : starts[i + 1]]
                    logs = model.train_step((tf.gather(xs, index), tf.gather(ys, index)))
                return logs

            batches = self._train_steps[key] = tf.function(
                train_batches,
                input_signature=(
                    *self._signature(x, y),
                    tf.TensorSpec((None,), tf.int32),
                    tf.TensorSpec((None,), tf.int32),
                ),
            )
        return batches

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
                correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(probabilities, axis=-1), labels), tf.float32))
                return loss, correct

            step = self._eval_steps[key] = tf.function(eval_step, input_signature=self._signature(x, y))
        return step

    # ------------------------------------------------------------------ public

    def fit(self, x: np.ndarray, y: np.ndarray, *, epochs: int, batch_size: int, seed: int) -> dict[str, float]:
        """``epochs`` passes of mini-batch training in a seeded random order.

        Returns the last epoch's logs as ``model.fit``'s history has them (e.g. ``loss``,
        ``accuracy``: running means over the epoch's batches, the loss including ``model.losses``).
        The epochs before the last run in one call and the last in another, with the metrics reset
        in between: two calls per fit whatever ``epochs`` is (a client with one batch per epoch
        paid ~1.4 ms per call).
        """
        n = len(y)
        if n == 0:
            raise ValueError("no training examples")
        if epochs < 1:
            raise ValueError(f"local-epochs must be >= 1, got {epochs}")
        import tensorflow as tf

        train = self._train_batches(x, y)
        xs, ys = tf.convert_to_tensor(x), tf.convert_to_tensor(y)
        rng = np.random.Generator(np.random.PCG64(seed))
        orders = [rng.permutation(n).astype(np.int32) for _ in range(epochs)]
        if epochs > 1:
            train(xs, ys, np.concatenate(orders[:-1]), _batch_starts(n, batch_size, epochs - 1))
        self.model.reset_metrics()
        logs = train(xs, ys, orders[-1], _batch_starts(n, batch_size, 1))
        return {key: float(value) for key, value in logs.items()}

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        """(mean loss, accuracy) over ``x, y`` with the model's compiled loss, in large batches."""
        n = len(y)
        if n == 0:
            raise ValueError("no evaluation examples")
        step = self._eval_step(x, y)
        loss_sum, correct = 0.0, 0.0
        for start in range(0, n, EVAL_BATCH):
            xb, yb = x[start : start + EVAL_BATCH], y[start : start + EVAL_BATCH]
            loss, hits = step(xb, yb)
            loss_sum += float(loss) * len(yb)
            correct += float(hits)
        return loss_sum / n, correct / n


def _batch_starts(n: int, batch_size: int, epochs: int) -> np.ndarray:
    """Where each batch starts in ``epochs`` concatenated permutations of ``n`` examples, then
    the end: ``[0, b, 2b, …, n, n + b, …, epochs n]`` (an epoch's last batch may be partial)."""
    if batch_size < 1:
        raise ValueError(f"batch-size must be >= 1, got {batch_size}")
    within = np.arange(0, n, batch_size, dtype=np.int32)
    starts = (within[None, :] + n * np.arange(epochs, dtype=np.int32)[:, None]).reshape(-1)
    return np.append(starts, np.int32(epochs * n))
