"""The node's KerasClient: settings, data and compiled model, built once per process and cached.

One compiled Keras model per worker process serves every virtual client that the worker runs:
TensorFlow is imported once, the model is built and compiled once, and each client only sets
weights and resets the optimizer (see :class:`~fl_app.task.keras_client.KerasClient`).
"""

from __future__ import annotations

import dataclasses
import functools
import os

from flwr.app import Context

from fl_app.attacks.poisoning import poison_data
from fl_app.config.settings import Settings
from fl_app.task.callbacks import CallbackFactory, load_callback_factory
from fl_app.task.data import ClientData, client_data, node_data_path
from fl_app.task.keras_client import KerasClient, compile_model
from fl_app.task.output_spec import OutputSpec
from fl_app.task.targets import check_output_names

DpSgdKey = tuple[float, float, int, bool, str]
"""DP-SGD's compile settings: noise multiplier, clip, microbatches, vectorized, sampling."""


@functools.lru_cache(maxsize=4)
def _parse_settings(items: tuple) -> Settings:
    return Settings.client_from_run_config(dict(items))


def settings_from_context(context: Context) -> Settings:
    """The run's settings, parsed once per process and run config; validated as far as the client
    uses them (the server validates the rest and builds the strategy, a client never does)."""
    return _parse_settings(tuple(sorted(context.run_config.items())))


@functools.lru_cache(maxsize=64)
def client_data_of(settings: Settings, partition_id: int, data_path: str) -> ClientData:
    data = client_data(settings, partition_id, data_path)
    x_train, y_train = poison_data(settings, partition_id, data.x_train, data.y_train, data.num_classes)
    if x_train is data.x_train and y_train is data.y_train:
        return data
    return dataclasses.replace(data, x_train=x_train, y_train=y_train)


@functools.lru_cache(maxsize=4)
def compiled_model(
    model_name: str,
    input_shape: tuple[int, ...],
    spec: OutputSpec | int,
    optimizer: str,
    learning_rate: float,
    seed: int,
    threads: int,
    dp_sgd: DpSgdKey | None = None,
):
    """The worker's compiled model (:func:`~fl_app.task.keras_client.compile_model`: a user's own
    compile is kept; an uncompiled model gets ``optimizer``, ``learning_rate`` and its task's loss).

    ``dp_sgd = (noise multiplier, l2 clip, microbatches (0: per example), vectorized, sampling)``
    compiles it with TF Privacy's DP-SGD optimizer (``optimizer``, ``learning_rate``: a user's
    optimizer is replaced) and the per-example version of its loss, or refuses a loss that has none.
    ``spec`` as an int: that many integer classes.
    """
    import tensorflow as tf

    from fl_app.task.models import build_model, make_optimizer

    set_tf_threads(threads)
    spec = spec if isinstance(spec, OutputSpec) else OutputSpec.classes(spec)
    tf.keras.utils.set_random_seed(seed)
    model = build_model(model_name, input_shape, spec, seed)
    if dp_sgd is not None:
        from fl_app.task.dp_sgd import make_dp_optimizer
        from fl_app.task.losses import default_loss, per_example_loss

        noise, clip, microbatches, vectorized, sampling = dp_sgd
        dp_optimizer = make_dp_optimizer(
            optimizer, learning_rate, clip, noise, microbatches or None, vectorized, sampling=sampling
        )
        user_loss = model.loss if getattr(model, "compiled_loss", None) is not None else default_loss(model, spec)
        loss = per_example_loss(user_loss, model, input_shape, spec)
        return compile_model(model, dp_optimizer, spec=spec, loss=loss, with_proximal_term=False)
    compiled = getattr(model, "compiled_loss", None) is not None
    return compile_model(model, None if compiled else make_optimizer(optimizer, learning_rate), spec=spec)


def dp_sgd_key(settings: Settings) -> DpSgdKey | None:
    if settings.dp_sgd_noise_multiplier <= 0:
        return None
    return (
        settings.dp_sgd_noise_multiplier,
        settings.dp_sgd_l2_clip,
        settings.dp_sgd_microbatches,
        settings.dp_sgd_vectorized,
        settings.dp_sgd_sampling,
    )


SHARED_PROCESS_ENV = "FL_KERAS_CLIENTS_IN_SHARED_PROCESS"
"""Set (to ``1``) where ClientApps run inside a process they share with others, e.g. the server's
(:class:`fl_app.deploy.inprocess_backend.InProcessBackend`): ``client-threads`` is then not theirs
to set for the whole process."""


@functools.cache
def set_tf_threads(threads: int) -> None:
    if os.environ.get(SHARED_PROCESS_ENV) == "1":
        return
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:  # TensorFlow already initialised in this process: keep its pools
        pass


def make_client(context: Context) -> KerasClient:
    """The KerasClient of the node that ``context`` describes (node config: partition-id, data-path)."""
    settings = settings_from_context(context)
    partition_id = partition_id_of(context)
    data = client_data_of(settings, partition_id, node_data_path(settings, context.node_config, partition_id))
    dp_sgd = dp_sgd_key(settings)
    model, proximal = compiled_model(
        settings.model,
        tuple(data.x_train.shape[1:]),
        data.spec,
        settings.optimizer,
        settings.learning_rate,
        settings.seed,
        settings.client_threads,
        dp_sgd,
    )
    check_output_names(model, data.y_train)  # several targets: one per output, by name
    # DP-SGD's Poisson batches come from the optimizer's secretly seeded sampler, never the seed
    poisson = dp_sgd is not None and settings.dp_sgd_sampling == "poisson"
    return KerasClient(
        model,
        data,
        local_epochs=settings.local_epochs,
        batch_size=settings.batch_size,
        seed=settings.seed + 7919 * partition_id,
        proximal=proximal,
        proximal_mu=settings.proximal_mu,
        epoch_batches=model.optimizer.poisson_batches if poisson else None,
        callbacks=callback_factory(settings.callbacks) if settings.callbacks else None,
        callbacks_name=settings.callbacks,
        validation_fraction=settings.callbacks_validation_fraction,
        partition_id=partition_id,
    )


@functools.lru_cache(maxsize=4)
def callback_factory(path: str) -> CallbackFactory:
    """The run config's ``callbacks`` factory, imported once per process."""
    return load_callback_factory(path)


def client_fn(context: Context):
    """Legacy-stack entry point: ``flwr.clientapp.ClientApp(client_fn=client_fn)``."""
    return make_client(context).to_client()


def partition_id_of(context: Context) -> int:
    return int(context.node_config.get("partition-id", 0))
