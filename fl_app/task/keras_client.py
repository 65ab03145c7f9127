"""``KerasClient``: a Flower ``NumPyClient`` around any Keras model.

It works on Flower's legacy stack as it is (``client.to_client()``), and the Message-API ClientApp
in :mod:`fl_app.client_app` adapts it. A compiled model can be reused across many clients on one
worker: :meth:`KerasClient.fit` sets the global weights, resets the optimizer's state and re-seeds
TensorFlow, so nothing leaks from one client (or round) to the next and Keras never retraces.
Training and evaluation run through :mod:`fl_app.task.compiled_loop` (the model's own ``train_step`` in a
``tf.function`` traced once, called per batch), not ``model.fit``/``model.evaluate``, whose per-call
set-up costs far more than training a small client's data.

FedProx (Li et al. 2020) adds ``mu / 2 * ||w - w_global||^2`` to the local loss; ``mu`` comes from
the fit config key ``proximal-mu`` (Flower's ``FedProx`` strategy sends it).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from flwr.client import NumPyClient
from flwr.common import Scalar

import fl_app  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)
from fl_app.task.callbacks import CallbackFactory, CallbackInfo, fit_with_callbacks, make_callbacks, validation_split
from fl_app.task.compiled_loop import EpochBatches, loop_for
from fl_app.task.data import ClientData
from fl_app.task.output_spec import OutputSpec


class ProximalTerm:
    """``mu / 2 * sum_l ||w_l - g_l||^2`` attached to a model as a Keras callable loss."""

    def __init__(self, model) -> None:
        import tensorflow as tf

        self.mu = tf.Variable(0.0, trainable=False, dtype=tf.float32, name="proximal_mu")
        self.anchors = [
            tf.Variable(w, trainable=False, name=f"proximal_anchor_{i}") for i, w in enumerate(model.trainable_weights)
        ]
        weights = list(model.trainable_weights)

        def loss() -> tf.Tensor:
            squares = [tf.reduce_sum(tf.square(w - a)) for w, a in zip(weights, self.anchors)]
            return 0.5 * self.mu * tf.add_n(squares)

        model.add_loss(loss)

    def set(self, mu: float, model) -> None:
        """Anchor at the model's current (global) weights with strength ``mu``."""
        self.mu.assign(float(mu))
        if mu > 0:
            for anchor, weight in zip(self.anchors, model.trainable_weights):
                anchor.assign(weight)


def compile_model(model, optimizer=None, *, spec: OutputSpec | None = None, loss=None, with_proximal_term: bool = True):
    """Compile ``model`` for its task; return it with its :class:`ProximalTerm` (or None).

    * A model its author compiled keeps its loss, metrics and optimizer (``optimizer`` None), or
      its loss and metrics with ``optimizer`` (DP-SGD's, which then needs ``loss``: the per-example
      version of the user's loss, :func:`fl_app.task.losses.per_example_loss`).
    * An uncompiled model gets ``optimizer`` (None: Keras' default, for a model that only
      evaluates), ``loss`` or the loss the task and the model's output imply
      (:func:`fl_app.task.losses.default_loss`) and the task's metrics (``spec`` None: integer
      class labels, as the built-in models' softmax takes).

    The proximal term (FedProx) joins the model's losses; Keras adds ``model.losses`` to the
    compiled loss at every step, so a user's compiled model needs no recompiling for it.
    """
    from fl_app.task.losses import default_loss, default_metrics, output_units, user_metrics

    proximal = ProximalTerm(model) if with_proximal_term else None
    compiled = getattr(model, "compiled_loss", None) is not None
    if compiled and optimizer is not None:
        model.compile(optimizer=optimizer, loss=loss or model.loss, metrics=user_metrics(model))
    elif not compiled:
        if spec is None:  # integer class labels, one per output unit
            spec = OutputSpec.classes(max(output_units(model), 2))
        model.compile(
            optimizer=optimizer or "rmsprop",
            loss=loss or default_loss(model, spec),
            metrics=default_metrics(model, spec),
        )
    return model, proximal


def reset_optimizer(optimizer) -> None:
    """Zero every slot (moments, iteration count) so that a reused optimizer starts afresh."""
    import tensorflow as tf

    variables = optimizer.variables() if callable(optimizer.variables) else optimizer.variables  # Keras 2 (DP-SGD)
    for variable in variables:
        variable.assign(tf.zeros_like(variable))


class KerasClient(NumPyClient):
    """Train and evaluate a compiled Keras model on one client's local data.

    Parameters
    ----------
    model : a compiled ``tf.keras.Model`` (see :func:`compile_model`)
    data : the client's train and test split
    local_epochs, batch_size : defaults, overridable per round by the fit config keys
        ``local-epochs`` and ``batch-size``
    seed : base seed; each fit shuffles its batches with NumPy's PCG64 seeded ``seed + server-round``
        (unless ``epoch_batches`` draws them).
        TensorFlow's global seed is deliberately not reset per fit: ``tf.random.set_seed`` clears
        the eager context's function cache, which cost ~190 ms of re-instantiation on the next call
        (the whole 5-epoch fit of a digits client takes ~15 ms), and reseeding would make DP-SGD's
        Gaussian noise predictable from the round number
    proximal : the model's :class:`ProximalTerm`, needed for FedProx
    proximal_mu : default ``mu`` when the fit config carries no ``proximal-mu``
    epoch_batches : draws each epoch's batches instead of the seeded shuffle (DP-SGD's Poisson
        sampler, :meth:`fl_app.task.dp_sgd.make_dp_optimizer`'s ``poisson_batches``)
    callbacks : a factory of Keras callbacks (:mod:`fl_app.task.callbacks`, run config
        ``callbacks``): each fit then runs ``model.fit`` with the callbacks it makes, and replies
        ``local-epochs-run`` (fewer than ``local-epochs`` when a callback stopped training);
        None: the compiled fast loop
    callbacks_name : the factory's ``package.module:make``, for error messages
    validation_fraction : with ``callbacks``, the share of the training split held out as
        ``model.fit``'s validation data (``val_*`` logs, replied as ``train-val_<name>``)
    partition_id : the client's partition id, passed to the callback factory
    """

    def __init__(
        self,
        model,
        data: ClientData,
        *,
        local_epochs: int = 1,
        batch_size: int = 32,
        seed: int = 0,
        proximal: ProximalTerm | None = None,
        proximal_mu: float = 0.0,
        epoch_batches: EpochBatches | None = None,
        callbacks: CallbackFactory | None = None,
        callbacks_name: str = "callbacks",
        validation_fraction: float = 0.0,
        partition_id: int = 0,
    ) -> None:
        if callbacks is not None and epoch_batches is not None:
            raise ValueError(
                "Keras callbacks run in model.fit, which cannot draw DP-SGD's batches (epoch_batches): "
                "use callbacks without DP-SGD"
            )
        self.model = model
        self.data = data
        self.local_epochs = local_epochs
        self.batch_size = batch_size
        self.seed = seed
        self.proximal = proximal
        self.proximal_mu = proximal_mu
        self.epoch_batches = epoch_batches
        self.callbacks = callbacks
        self.callbacks_name = callbacks_name
        self.validation_fraction = validation_fraction
        self.partition_id = partition_id

    def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
        return self.model.get_weights()

    def fit(
        self, parameters: list[np.ndarray], config: dict[str, Any]
    ) -> tuple[list[np.ndarray], int, dict[str, Scalar]]:
        started = time.perf_counter()
        self.model.set_weights(parameters)
        mu = float(config.get("proximal-mu", self.proximal_mu))
        if mu > 0 and self.proximal is None:
            raise ValueError("proximal-mu > 0 needs a model compiled with a ProximalTerm")
        if self.proximal is not None:
            self.proximal.set(mu, self.model)
        reset_optimizer(self.model.optimizer)
        server_round = int(config.get("server-round", 0))
        seed = self.seed + server_round
        epochs = int(config.get("local-epochs", self.local_epochs))
        batch_size = int(config.get("batch-size", self.batch_size))
        metrics: dict[str, Scalar] = {}
        if self.callbacks is None:
            logs = loop_for(self.model).fit(
                self.data.x_train,
                self.data.y_train,
                epochs=epochs,
                batch_size=batch_size,
                seed=seed,
                epoch_batches=self.epoch_batches,
            )
            num_examples = len(self.data.y_train)
        else:
            x, y, validation = validation_split(self.data.x_train, self.data.y_train, self.validation_fraction, seed)
            info = CallbackInfo(
                server_round=server_round,
                partition_id=self.partition_id,
                local_epochs=epochs,
                batch_size=batch_size,
                num_train_examples=len(y),
                num_validation_examples=0 if validation is None else len(validation[1]),
            )
            callbacks = make_callbacks(self.callbacks, info, self.callbacks_name)
            logs, ran = fit_with_callbacks(
                self.model, x, y, epochs=epochs, batch_size=batch_size, callbacks=callbacks, validation=validation
            )
            metrics["local-epochs-run"] = ran
            num_examples = len(y)
        metrics.update({f"train-{name}": value for name, value in logs.items()})
        metrics["fit-seconds"] = time.perf_counter() - started
        return self.model.get_weights(), num_examples, metrics

    def evaluate(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[float, int, dict[str, Scalar]]:
        if len(self.data.y_test) == 0:
            raise ValueError("this client has no test examples (raise its data or test-fraction)")
        self.model.set_weights(parameters)
        if self.proximal is not None:
            self.proximal.set(0.0, self.model)
        results = loop_for(self.model).evaluate(self.data.x_test, self.data.y_test)
        loss = results.pop("loss")
        return float(loss), len(self.data.y_test), {name: float(value) for name, value in results.items()}
