"""Cheap local training and evaluation for small client data sets, on a reused compiled model.

``model.fit`` and ``model.evaluate`` cost 0.1-0.5 s per call whatever the data size (a ``tf.data``
pipeline, a data handler, callbacks and a progress bar are built every call), which dominates a
virtual client holding a few hundred examples: on the digits default, ``model.fit`` for 5 epochs
of ~110 examples took ~0.5 s, of which the ~20 optimizer steps take a few milliseconds.

:class:`CompiledLoop` keeps, per Keras model, one ``tf.function`` around the model's own
``train_step`` (so a custom ``train_step``, the compiled loss with ``model.losses`` such as the
FedProx term, and the optimizer's own ``minimize``, e.g. a DP-SGD optimizer, all still apply) and
one around its ``test_step`` (the compiled loss and metrics, whatever they are). Both are traced once per input signature (batch dimension
left open, so clients of different sizes share the trace). One call runs many batches in the graph
(``train_step`` on gathered, sample-weighted batches of any sizes): a fit is two calls, the epochs
before the last and then the last, so a small client pays neither ``model.fit``'s per-call set-up
nor a Python round trip per batch or per epoch.

Which examples form the batches is the caller's choice (``epoch_batches``): by default seeded
permutations cut into batches of ``batch_size`` (NumPy's ``Generator(PCG64(seed))``: the order
depends only on the seed, so a reused model gives the same result as a fresh one); DP-SGD passes
its Poisson sampler (:mod:`fl_app.task.dp_sgd`), whose batches vary in size and may be empty. An
empty batch runs as one example of sample weight 0 (zero loss, zero gradient), so that the step
still happens (DP-SGD then releases its noise alone) and every batch has the same traced shape.

Targets for a model with several outputs (a structured array, :mod:`fl_app.task.targets`) go in
as Keras' dict ``{output name: targets}``; every step gathers each output's rows alike.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

import fl_app  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)
from fl_app.task.targets import keras_targets

_LOOPS: weakref.WeakKeyDictionary[Any, CompiledLoop] = weakref.WeakKeyDictionary()
EVAL_BATCH = 1024

EpochBatches = Callable[[int, int], list[np.ndarray]]
"""``(n, batch_size) -> one epoch's batches``, each an array of example indices in ``[0, n)``."""


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
    def _signature(x: np.ndarray, y: Any):
        import tensorflow as tf

        def spec(array: np.ndarray):
            return tf.TensorSpec((None, *array.shape[1:]), tf.as_dtype(array.dtype))

        return spec(x), tf.nest.map_structure(spec, y)

    @staticmethod
    def _key(x: np.ndarray, y: Any) -> tuple:
        """What a trace depends on: the per-example shapes and dtypes of ``x`` and every target."""
        import tensorflow as tf

        targets = tuple((a.shape[1:], a.dtype.str) for a in tf.nest.flatten(y))
        names = tuple(sorted(y)) if isinstance(y, dict) else ()
        return (x.shape[1:], x.dtype.str, targets, names)

    def _train_batches(self, x: np.ndarray, y: np.ndarray, weighted: bool):
        """Many batches in one graph: ``train_step`` on ``x[order[starts[i]:starts[i+1]]]`` for
        every i, so several epochs of batches cost one call. ``weighted``: with sample weights
        ``weights[starts[i]:starts[i+1]]`` (batches of any sizes, an empty one as a zero-weight
        example); without, Keras' unweighted step (the seeded shuffle, whose batches are never
        empty: measured faster, as Keras skips the weighting)."""
        key = (*self._key(x, y), weighted)
        batches = self._train_steps.get(key)
        if batches is None:
            import tensorflow as tf

            model = self.model

            def step(xs, ys, order, weights, start, end):
                index = order[start:end]
                targets = tf.nest.map_structure(lambda t: tf.gather(t, index), ys)
                if weights is None:
                    return model.train_step((tf.gather(xs, index), targets))
                return model.train_step((tf.gather(xs, index), targets, weights[start:end]))

            def train_batches(xs, ys, order, weights, starts):
                # the first step outside the loop: on the first trace it creates the optimizer's
                # and the metrics' variables, which a while-loop body may not do
                logs = step(xs, ys, order, weights, starts[0], starts[1])
                for i in tf.range(1, tf.shape(starts)[0] - 1):
                    logs = step(xs, ys, order, weights, starts[i], starts[i + 1])
                return logs

            index_spec = tf.TensorSpec((None,), tf.int32)
            if weighted:
                batches = tf.function(
                    train_batches,
                    input_signature=(
                        *self._signature(x, y),
                        index_spec,
                        tf.TensorSpec((None,), tf.float32),
                        index_spec,
                    ),
                )
            else:
                batches = tf.function(
                    lambda xs, ys, order, starts: train_batches(xs, ys, order, None, starts),
                    input_signature=(*self._signature(x, y), index_spec, index_spec),
                )
            self._train_steps[key] = batches
        return batches

    def _eval_step(self, x: np.ndarray, y: Any):
        key = self._key(x, y)
        step = self._eval_steps.get(key)
        if step is None:
            import tensorflow as tf

            model = self.model
            step = self._eval_steps[key] = tf.function(
                lambda xb, yb: model.test_step((xb, yb)), input_signature=self._signature(x, y)
            )
        return step

    # ------------------------------------------------------------------ public

    def fit(
        self,
        x: np.ndarray,
        y: np.ndarray,
        *,
        epochs: int,
        batch_size: int,
        seed: int,
        epoch_batches: EpochBatches | None = None,
    ) -> dict[str, float]:
        """``epochs`` passes of mini-batch training.

        ``epoch_batches`` draws each epoch's batches (``None``: a permutation from
        ``PCG64(seed)`` cut into batches of ``batch_size``, the last possibly partial).
        Returns the last epoch's logs as ``model.fit``'s history has them (e.g. ``loss``,
        ``accuracy``: running means over the epoch's batches, the loss including ``model.losses``).
        The epochs before the last run in one call and the last in another, with the metrics reset
        in between: two calls per fit whatever ``epochs`` is (a client with one batch per epoch
        paid ~1.4 ms per call).
        """
        n = len(y)
        y = keras_targets(y)
        if n == 0:
            raise ValueError("no training examples")
        if epochs < 1:
            raise ValueError(f"local-epochs must be >= 1, got {epochs}")
        if batch_size < 1:
            raise ValueError(f"batch-size must be >= 1, got {batch_size}")
        import tensorflow as tf

        weighted = epoch_batches is not None
        if epoch_batches is None:
            epoch_batches = shuffled_batches(np.random.Generator(np.random.PCG64(seed)))
        train = self._train_batches(x, y, weighted)
        xs, ys = tf.convert_to_tensor(x), tf.nest.map_structure(tf.convert_to_tensor, y)
        epochs_batches = [epoch_batches(n, batch_size) for _ in range(epochs)]

        def run(batches: list[np.ndarray]) -> Any:
            order, weights, starts = _flatten(batches)
            return train(xs, ys, order, weights, starts) if weighted else train(xs, ys, order, starts)

        if epochs > 1:
            run([b for batches in epochs_batches[:-1] for b in batches])
        self.model.reset_metrics()
        logs = run(epochs_batches[-1])
        return {key: float(value) for key, value in logs.items()}

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
        """The model's compiled loss and metrics over ``x, y`` in large batches, under their Keras
        names (``loss``, ``accuracy``, ``mae``, ``auc``, ...), as ``model.evaluate`` returns them."""
        n = len(y)
        if n == 0:
            raise ValueError("no evaluation examples")
        y = keras_targets(y)
        step = self._eval_step(x, y)
        self.model.reset_metrics()
        logs: Any = {}
        for start in range(0, n, EVAL_BATCH):
            batch = {k: v[start : start + EVAL_BATCH] for k, v in y.items()} if isinstance(y, dict) else None
            logs = step(x[start : start + EVAL_BATCH], y[start : start + EVAL_BATCH] if batch is None else batch)
        self.model.reset_metrics()
        return {key: float(value) for key, value in logs.items()}


def shuffled_batches(rng: np.random.Generator) -> EpochBatches:
    """Epochs of a permutation from ``rng`` cut into batches of ``batch_size`` (the last may be partial)."""

    def epoch(n: int, batch_size: int) -> list[np.ndarray]:
        order = rng.permutation(n).astype(np.int32)
        return [order[start : start + batch_size] for start in range(0, n, batch_size)]

    return epoch


def _flatten(batches: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(order, weights, starts)``: the batches' indices concatenated, their sample weights (1;
    an empty batch becomes example 0 with weight 0) and where each batch starts, then the end."""
    if not batches:
        raise ValueError("an epoch needs at least one batch")
    parts = [np.asarray(b, dtype=np.int32) if len(b) else np.zeros(1, np.int32) for b in batches]
    weights = [np.ones(len(b), np.float32) if len(b) else np.zeros(1, np.float32) for b in batches]
    starts = np.cumsum([0] + [len(p) for p in parts]).astype(np.int32)
    return np.concatenate(parts), np.concatenate(weights), starts
