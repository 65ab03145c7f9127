"""The user's own binary classifier: Dense(16)-Dense(8)-Dense(1, sigmoid), compiled by its author.

The app keeps this compile (binary cross-entropy, Adam at 1e-3, accuracy and ROC-AUC), reports the
metrics under their Keras names (``accuracy``, ``auc``) and never replaces the optimizer (except
with DP-SGD, whose optimizer the run config chooses).
"""

from __future__ import annotations

import tensorflow as tf


def build(input_shape: tuple[int, ...], output_spec) -> tf.keras.Model:
    """The model factory: ``(input_shape, output_spec) -> tf.keras.Model``."""
    model = tf.keras.Sequential(
        [
            tf.keras.layers.Input(shape=input_shape),
            tf.keras.layers.Dense(16, activation="relu"),
            tf.keras.layers.Dense(8, activation="relu"),
            tf.keras.layers.Dense(1, activation="sigmoid"),
        ],
        name="breast_cancer",
    )
    model.compile(
        optimizer=tf.keras.optimizers.Adam(learning_rate=1e-3),
        loss="binary_crossentropy",
        metrics=["accuracy", tf.keras.metrics.AUC(name="auc")],
    )
    return model
