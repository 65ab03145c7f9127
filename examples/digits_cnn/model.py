"""The user's own CNN, compiled by the user, and the Keras callbacks each client trains with."""

from __future__ import annotations

import tensorflow as tf

BASE_LEARNING_RATE = 0.005
ROUND_DECAY = 0.9
"""The learning rate of round r's local fit is BASE_LEARNING_RATE * ROUND_DECAY ** (r - 1)."""


def build(input_shape: tuple[int, ...], output_spec) -> tf.keras.Model:
    """A small CNN for ``input_shape`` images (8x8x1 digits), compiled with its own loss and metrics."""
    model = tf.keras.Sequential(
        [
            tf.keras.layers.Input(shape=input_shape),
            tf.keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
            tf.keras.layers.MaxPooling2D(),
            tf.keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
            tf.keras.layers.GlobalAveragePooling2D(),
            tf.keras.layers.Dense(output_spec.units, activation="softmax"),
        ],
        name="digits_cnn",
    )
    model.compile(
        optimizer=tf.keras.optimizers.Adam(BASE_LEARNING_RATE),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


def callbacks(info) -> list[tf.keras.callbacks.Callback]:
    """New callbacks for each local fit (``info``: :class:`fl_app.task.callbacks.CallbackInfo`):
    early stopping on the local validation split (when there is one) and a per-round learning rate."""
    rate = BASE_LEARNING_RATE * ROUND_DECAY ** max(info.server_round - 1, 0)
    made: list[tf.keras.callbacks.Callback] = [tf.keras.callbacks.LearningRateScheduler(lambda epoch: rate)]
    if info.num_validation_examples:
        made.append(tf.keras.callbacks.EarlyStopping(monitor="val_loss", patience=1, restore_best_weights=True))
    return made
