"""The models a run can train: the built-in zoo, a user's factory, or a user's saved model.

The run config's ``model`` is one of

* a built-in name (``logreg``, ``mlp``, ``cnn``): ``(input_shape, units, seed, activation)``,
  ending in a softmax over the classes (a sigmoid for multi-label, linear for regression), so
  losses take probabilities (``from_logits=False``);
* ``package.module:build``: a user's factory ``build(input_shape, output_spec) -> tf.keras.Model``
  (``output_spec`` an :class:`~fl_app.task.output_spec.OutputSpec`), compiled or not, called after
  ``tf.keras.utils.set_random_seed(seed)`` so that the server and every client get the same
  initial weights;
* ``path/to/model.keras`` (or ``.h5``): a saved ``tf.keras`` model, whose weights are the initial
  global model and whose compile (loss, metrics, optimizer), if saved, is kept.

Models must be ``tf.keras`` (Keras 2, the ``tf-keras`` package) models: a standalone Keras 3 model
is refused with a message saying what to change (:func:`check_tf_keras`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fl_app  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)
from fl_app.task.output_spec import OutputSpec

if TYPE_CHECKING:
    import tensorflow as tf

ModelFactory = Callable[..., "tf.keras.Model"]
"""A built-in model: ``(input_shape, units, seed, activation="softmax") -> tf.keras.Model``."""

SAVED_MODEL_SUFFIXES = (".keras", ".h5")
KERAS3_ADVICE = (
    "build it with tf.keras (Keras 2): `import tensorflow as tf` and `tf.keras.layers...`, or "
    "`import tf_keras as keras`, instead of `import keras` (Keras 3); this app runs on tf.keras "
    "because TensorFlow Privacy's DP-SGD optimizers need it"
)


def _keras():
    import tensorflow as tf

    return tf.keras


def logreg(input_shape: tuple[int, ...], num_classes: int, seed: int, activation: str = "softmax") -> tf.keras.Model:
    """Multinomial logistic regression: softmax(W x + b) (``activation`` for other tasks)."""
    keras = _keras()
    init = keras.initializers.GlorotUniform(seed=seed)
    return keras.Sequential(
        [
            keras.layers.Input(shape=input_shape),
            keras.layers.Flatten(),
            keras.layers.Dense(num_classes, activation=activation, kernel_initializer=init),
        ],
        name="logreg",
    )


def mlp(input_shape: tuple[int, ...], num_classes: int, seed: int, activation: str = "softmax") -> tf.keras.Model:
    """Two hidden ReLU layers (128, 64), then softmax (``activation``)."""
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
            activation=activation,
            kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 2),
        )
    )
    return keras.Sequential(layers, name="mlp")


def cnn(input_shape: tuple[int, ...], num_classes: int, seed: int, activation: str = "softmax") -> tf.keras.Model:
    """A small CNN for (H, W, C) images: conv32-conv64-pool-dense128-softmax (``activation``)."""
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
            keras.layers.Dense(num_classes, activation=activation, kernel_initializer=init(3)),
        ],
        name="cnn",
    )


MODELS: dict[str, ModelFactory] = {"logreg": logreg, "mlp": mlp, "cnn": cnn}


def is_user_model(name: str) -> bool:
    """Whether ``model`` names a user's factory (``package.module:build``) or a saved model file."""
    return ":" in name or name.lower().endswith(SAVED_MODEL_SUFFIXES)


def build_model(name: str, input_shape: tuple[int, ...], output: int | OutputSpec, seed: int) -> tf.keras.Model:
    """The model that ``model`` names (see the module docstring), with its initial weights.

    ``output`` is the :class:`OutputSpec` of the data (an int: that many classes). Built-in models
    come uncompiled; a user's model as its factory or file left it (see
    :func:`fl_app.task.keras_client.compile_model`).
    """
    spec = output if isinstance(output, OutputSpec) else OutputSpec.classes(int(output))
    if name.lower().endswith(SAVED_MODEL_SUFFIXES):
        return load_saved_model(name, tuple(input_shape))
    if ":" in name:
        return build_user_model(name, tuple(input_shape), spec, int(seed))
    if name not in MODELS:
        raise ValueError(
            f"model must be one of {', '.join(MODELS)}, 'package.module:build' or a saved "
            f"'path/to/model.keras'; got '{name}'"
        )
    units, activation = _builtin_head(spec)
    return MODELS[name](tuple(input_shape), units, int(seed), activation)


def _builtin_head(spec: OutputSpec) -> tuple[int, str]:
    """A built-in model's output layer for ``spec``: softmax over the classes (two for binary, as
    before), sigmoid per label, or linear per target."""
    if spec.task == "regression":
        return spec.units, "linear"
    if spec.task == "multilabel":
        return spec.units, "sigmoid"
    return spec.num_classes, "softmax"


def build_user_model(name: str, input_shape: tuple[int, ...], spec: OutputSpec, seed: int) -> tf.keras.Model:
    """Call the user's factory ``package.module:build(input_shape, output_spec)`` after seeding."""
    import tensorflow as tf

    from strategies.core.loading import StrategyNameError, load_object

    try:
        factory = load_object(name, key="model")
    except StrategyNameError as err:
        raise ValueError(str(err)) from err
    tf.keras.utils.set_random_seed(seed)
    model = factory(tuple(input_shape), spec)
    return check_tf_keras(model, f"model '{name}'")


def load_saved_model(path: str, input_shape: tuple[int, ...]) -> tf.keras.Model:
    """A saved ``tf.keras`` model (its compile kept if saved), checked against the data's input shape."""
    import tensorflow as tf

    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"model '{path}' does not exist (a saved model must be a .keras or .h5 file)")
    try:
        model = tf.keras.models.load_model(file)
    except Exception as err:  # a Keras 3 file, a custom layer not importable here, a corrupt file
        raise ValueError(
            f"model '{path}' cannot be loaded by tf.keras ({type(err).__name__}: {err}); a model saved "
            f"by standalone Keras 3 is not readable: {KERAS3_ADVICE}; a custom layer must be importable "
            "and registered (tf.keras.saving.register_keras_serializable)"
        ) from err
    model = check_tf_keras(model, f"model '{path}'")
    expected = tuple(model.input_shape[1:]) if not isinstance(model.input_shape, list) else None
    if expected is not None and None not in expected and expected != tuple(input_shape):
        raise ValueError(
            f"model '{path}' takes inputs of shape {expected}, but the data's examples have shape {tuple(input_shape)}"
        )
    return model


def check_tf_keras(model: Any, source: str) -> tf.keras.Model:
    """``model`` if it is a ``tf.keras.Model``; a clear error for Keras 3 or anything else."""
    import tensorflow as tf

    if isinstance(model, tf.keras.Model):
        return model
    module = type(model).__module__
    if module.split(".")[0] == "keras":
        raise TypeError(f"{source} returned a Keras 3 model ({module}.{type(model).__name__}): {KERAS3_ADVICE}")
    raise TypeError(f"{source} must give a tf.keras.Model, got {type(model).__name__}")


def make_optimizer(name: str, learning_rate: float) -> tf.keras.optimizers.Optimizer:
    """A fresh Keras optimizer by name (``sgd`` or ``adam``)."""
    keras = _keras()
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate=learning_rate)
    if name == "adam":
        return keras.optimizers.Adam(learning_rate=learning_rate)
    raise ValueError(f"optimizer must be sgd or adam; got '{name}'")
