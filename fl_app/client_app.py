"""The ``ClientApp``: serves :class:`~fl_app.client.KerasClient` to Message-API strategies.

Every ``flwr.serverapp.strategy`` strategy, and ours, sends a train message with the global model in
an ``ArrayRecord`` (key ``arrays``) and a ``ConfigRecord`` (key ``config``); the reply carries the
new weights and a ``MetricRecord`` with ``num-examples``. An evaluate message is answered with the
loss, accuracy and ``num-examples`` of the client's test split.

One compiled Keras model per worker process serves every virtual client that the worker runs:
TensorFlow is imported once, the model is built and compiled once, and each client only sets
weights and resets the optimizer (see :class:`~fl_app.client.KerasClient`).

Users of Flower's legacy stack can take :func:`client_fn` instead (``ClientApp(client_fn=…)``).
"""

from __future__ import annotations

import dataclasses
import functools

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fl_app.byzantine import poison_labels, poison_weights
from fl_app.client import KerasClient, compile_model
from fl_app.data import ClientData, client_data
from fl_app.delivery import answer_export_check, is_export_check
from fl_app.node_worker import keras_worker_mod
from fl_app.encrypted_client import encrypted_upload, reply_metrics
from fl_app.encrypted_client import global_weights as received_global_weights
from fl_app.settings import Settings

# keras_worker_mod: in deployment, a SuperNode whose node config names a warm worker
# (keras-worker='SOCKET') runs messages there instead of importing TensorFlow per message.
app = ClientApp(mods=[keras_worker_mod])


@functools.lru_cache(maxsize=4)
def _settings(items: tuple) -> Settings:
    return Settings.from_run_config(dict(items))


def settings_from_context(context: Context) -> Settings:
    """The run's settings, parsed once per process and run config."""
    return _settings(tuple(sorted(context.run_config.items())))


@functools.lru_cache(maxsize=64)
def _client_data(settings: Settings, partition_id: int, data_path: str) -> ClientData:
    data = client_data(settings, partition_id, data_path)
    y_train = poison_labels(settings, partition_id, data.y_train, data.num_classes)
    return dataclasses.replace(data, y_train=y_train) if y_train is not data.y_train else data


@functools.lru_cache(maxsize=4)
def _compiled_model(model_name: str, input_shape: tuple[int, ...], num_classes: int,
                    optimizer: str, learning_rate: float, seed: int, threads: int,
                    dp_sgd: tuple[float, float, int, bool] | None = None):
    """The worker's compiled model; ``dp_sgd = (noise multiplier, l2 clip, microbatches (0: per
    example), vectorized)`` compiles it with TF Privacy's DP-SGD optimizer and per-example loss."""
    import tensorflow as tf

    from fl_app.models import build_model, make_optimizer

    _set_threads(threads)
    tf.keras.utils.set_random_seed(seed)
    model = build_model(model_name, input_shape, num_classes, seed)
    if dp_sgd is not None:
        from fl_app.privacy import dp_loss, make_dp_optimizer

        noise, clip, microbatches, vectorized = dp_sgd
        dp_optimizer = make_dp_optimizer(optimizer, learning_rate, clip, noise, microbatches or None, vectorized)
        return compile_model(model, dp_optimizer, loss=dp_loss(), with_proximal_term=False)
    return compile_model(model, make_optimizer(optimizer, learning_rate))


def _dp_sgd_key(settings: Settings) -> tuple[float, float, int, bool] | None:
    if settings.dp_sgd_noise_multiplier <= 0:
        return None
    return (settings.dp_sgd_noise_multiplier, settings.dp_sgd_l2_clip, settings.dp_sgd_microbatches,
            settings.dp_sgd_vectorized)


@functools.cache
def _set_threads(threads: int) -> None:
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
    data_path = str(context.node_config.get("data-path", ""))
    data = _client_data(settings, partition_id, data_path)
    model, proximal = _compiled_model(
        settings.model, tuple(data.x_train.shape[1:]), data.num_classes,
        settings.optimizer, settings.learning_rate, settings.seed, settings.client_threads,
        _dp_sgd_key(settings),
    )
    return KerasClient(
        model, data,
        local_epochs=settings.local_epochs, batch_size=settings.batch_size,
        seed=settings.seed + 7919 * partition_id,
        proximal=proximal, proximal_mu=settings.proximal_mu,
    )


def client_fn(context: Context):
    """Legacy-stack entry point: ``flwr.clientapp.ClientApp(client_fn=client_fn)``."""
    return make_client(context).to_client()


def partition_id_of(context: Context) -> int:
    return int(context.node_config.get("partition-id", 0))


def upload(
    settings: Settings, context: Context, global_weights: list, weights: list, config: dict
) -> ArrayRecord:
    """What a client sends back after training: its new weights (client-side transforms of the
    update, such as clipping, compression or encryption, replace them here).

    Order: clipping and DP noise act on the plaintext update first; compression or encryption
    (never both) last."""
    from fl_app.client_privacy import private_weights

    weights = private_weights(settings, global_weights, weights, config)  # dp-mode client-clipping / local DP
    if settings.homomorphic_encryption != "none":
        return encrypted_upload(settings, context, global_weights, weights, config)
    if settings.compression != "none":  # compression is post-processing of what precedes it
        from fl_app.compression import encode_upload

        return encode_upload(settings, context, global_weights, weights, config)
    return ArrayRecord(weights)


def _is_legacy(msg: Message) -> bool:
    """Whether ``msg`` comes from Flower's legacy workflows (SecAgg+ stages, fitins/evaluateins)."""
    if not msg.has_content():
        return False
    names = set(msg.content.config_records) | set(msg.content.array_records)
    return any(name.startswith(("secaggplus", "fitins", "evaluateins", "getparametersins")) for name in names)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Fit on local data, starting from the global weights in ``msg``."""
    from fl_app.client_privacy import dp_sgd_report, maybe_fail

    if _is_legacy(msg):  # Flower's legacy workflows (SecAgg+): see fl_app.secure_aggregation
        from fl_app.secure_aggregation import legacy_client_app

        return legacy_client_app(msg, context)
    client = make_client(context)
    settings = settings_from_context(context)
    partition_id = partition_id_of(context)
    config = dict(msg.content["config"]) if "config" in msg.content else {}
    maybe_fail(settings, partition_id, int(config.get("server-round", 0)))
    global_weights = received_global_weights(settings, context, msg)
    weights, num_examples, metrics = client.fit(global_weights, config)
    metrics.update(dp_sgd_report(settings, num_examples, int(config.get("server-round", 0))))
    weights = poison_weights(settings, partition_id, global_weights, weights, int(config.get("server-round", 0)))
    content = RecordDict(
        {
            "arrays": upload(settings, context, global_weights, weights, {**config, "num-examples": num_examples}),
            "metrics": MetricRecord({**metrics, **reply_metrics(settings, context),
                                     "partition-id": partition_id, "num-examples": num_examples}),
        }
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global weights in ``msg`` on the local test split."""
    if _is_legacy(msg):
        from fl_app.secure_aggregation import legacy_client_app

        return legacy_client_app(msg, context)
    client = make_client(context)
    if is_export_check(msg):  # the exported TFLite model, checked before it ships
        return answer_export_check(msg, client, settings_from_context(context).client_threads)
    config = dict(msg.content["config"]) if "config" in msg.content else {}
    global_weights = received_global_weights(settings_from_context(context), context, msg)
    loss, num_examples, metrics = client.evaluate(global_weights, config)
    content = RecordDict(
        {"metrics": MetricRecord({"loss": loss, **metrics, "num-examples": num_examples})}
    )
    return Message(content=content, reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """``initial-weights``: the seeded initial model, so a server without TensorFlow can start."""
    from fl_app.initial import initial_weights_reply

    return initial_weights_reply(msg, context)
