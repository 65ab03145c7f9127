"""The Keras model zoo, one factory signature: ``(input_shape, num_classes, seed) -> tf.keras.Model``.

Models end in a softmax, so losses take probabilities (``from_logits=False``). The input shape and
the number of classes come from the data; the seed fixes the initial weights, so that the server
and every client agree on them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import fl_app  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)

if TYPE_CHECKING:
    import tensorflow as tf

ModelFactory = Callable[[tuple[int, ...], int, int], "tf.keras.Model"]


def _keras():
    import tensorflow as tf

    return tf.keras


def logreg(input_shape: tuple[int, ...], num_classes: int, seed: int) -> tf.keras.Model:
    """Multinomial logistic regression: softmax(W x + b)."""
    keras = _keras()
    init = keras.initializers.GlorotUniform(seed=seed)
    return keras.Sequential(
        [
            keras.layers.Input(shape=input_shape),
            keras.layers.Flatten(),
            keras.layers.Dense(num_classes, activation="softmax", kernel_initializer=init),
        ],
        name="logreg",
    )


def mlp(input_shape: tuple[int, ...], num_classes: int, seed: int) -> tf.keras.Model:
    """Two hidden ReLU layers (128, 64), then softmax."""
    keras = _keras()
    layers = [keras.layers.Input(shape=input_shape), keras.layers.Flatten()]
    for i, width in enumerate((128, 64)):
        layers.append(
            keras.layers.Dense(
                width,
                activation="relu",
                kernel_initializer=keras.initializers.GlorotUniform(seed=seed + i),
            )
        )
    layers.append(
        keras.layers.Dense(
            num_classes,
            activation="softmax",
            kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 2),
        )
    )
    return keras.Sequential(layers, name="mlp")


def cnn(input_shape: tuple[int, ...], num_classes: int, seed: int) -> tf.keras.Model:
    """A small CNN for (H, W, C) images: conv32-conv64-pool-dense128-softmax."""
    if len(input_shape) != 3:
        raise ValueError(
            f"model 'cnn' needs image data of shape (height, width, channels); the data set "
            f"gives examples of shape {input_shape} (use model='mlp', or input-shape='H,W,C')"
        )
    keras = _keras()

    def init(offset: int):
        return keras.initializers.GlorotUniform(seed=seed + offset)

    return keras.Sequential(
        [
            keras.layers.Input(shape=input_shape),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu", kernel_initializer=init(0)),
            keras.layers.Conv2D(64, 3, padding="same", activation="relu", kernel_initializer=init(1)),
            keras.layers.MaxPooling2D(2),
            keras.layers.Flatten(),
            keras.layers.Dense(128, activation="relu", kernel_initializer=init(2)),
            keras.layers.Dense(num_classes, activation="softmax", kernel_initializer=init(3)),
        ],
        name="cnn",
    )


MODELS: dict[str, ModelFactory] = {"logreg": logreg, "mlp": mlp, "cnn": cnn}


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, seed: int) -> tf.keras.Model:
    """Build the named model (uncompiled)."""
    if name not in MODELS:
        raise ValueError(f"model must be one of {', '.join(MODELS)}; got '{name}'")
    return MODELS[name](tuple(input_shape), int(num_classes), int(seed))


def make_optimizer(name: str, learning_rate: float) -> tf.keras.optimizers.Optimizer:
    """A fresh Keras optimizer by name (``sgd`` or ``adam``)."""
    keras = _keras()
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate=learning_rate)
    if name == "adam":
        return keras.optimizers.Adam(learning_rate=learning_rate)
    raise ValueError(f"optimizer must be sgd or adam; got '{name}'")
