"""The user's own regression model, left uncompiled: the app compiles it for the task it infers
from the targets (regression: mean squared error, metric ``mae``) with the run config's optimizer
and learning rate."""

from __future__ import annotations

import tensorflow as tf


def build(input_shape: tuple[int, ...], output_spec) -> tf.keras.Model:
    """The model factory: ``(input_shape, output_spec) -> tf.keras.Model`` (one linear output per target)."""
    return tf.keras.Sequential(
        [
            tf.keras.layers.Input(shape=input_shape),
            tf.keras.layers.Dense(32, activation="relu"),
            tf.keras.layers.Dense(output_spec.units),
        ],
        name="diabetes",
    )
