"""Client side of SecAgg+: Flower's legacy ``secaggplus_mod`` around the same KerasClient.

See :mod:`fl_app.secagg.server` for the protocol and the server side.
"""

from __future__ import annotations

import functools

import numpy as np
from flwr.app import Context, Message
from flwr.client import NumPyClient

from fl_app.config.settings import Settings
from strategies.core.update_matrix import ModelLayout


def secure_keras_client(context: Context) -> NumPyClient:
    """Flower's legacy ``NumPyClient`` around :class:`~fl_app.task.keras_client.KerasClient`: clips (or noises)
    the update on the device and reports one example, so SecAgg+'s weighted mean is the plain mean."""
    from fl_app.client.node_client import make_client, partition_id_of, settings_from_context
    from fl_app.client.update_privacy import dp_sgd_report, maybe_fail, private_weights, released_train_metrics

    inner = make_client(context)
    settings = settings_from_context(context)
    partition_id = partition_id_of(context)
    distributed = settings.strategy == "dp-fedavg" and settings.secagg_dp == "distributed"

    class _Client(NumPyClient):
        def get_parameters(self, config):
            return inner.get_parameters(config)

        def fit(self, parameters, config):
            config = dict(config)
            server_round = int(config.get("server-round", 0))
            maybe_fail(settings, partition_id, server_round)
            weights, num_examples, metrics = inner.fit(parameters, config)
            metrics.update(dp_sgd_report(settings, num_examples, server_round))
            if distributed:
                weights = distributed_noise_share(settings, parameters, weights, config)
            else:
                weights = private_weights(settings, parameters, weights, config)
            released = released_train_metrics(settings, metrics, 1, partition_id)
            del released["num-examples"]  # SecAgg+ sums with weight 1: its mean is the plain mean
            return weights, 1, released

        def evaluate(self, parameters, config):
            return inner.evaluate(parameters, config)

    return _Client()


def distributed_noise_share(
    settings: Settings,
    global_weights: list[np.ndarray],
    weights: list[np.ndarray],
    config: dict,
    rng: np.random.Generator | None = None,
) -> list[np.ndarray]:
    """What a client hands SecAgg+ under ``secagg-dp='distributed'``: its update ``u = w - g`` clipped
    to ``C`` (float64), rounded onto SecAgg+'s grid and noised with its discrete Gaussian share
    (:func:`strategies.private.secure_sum.client_noise_share`, std
    ``s = z C / (h sqrt(m_min))`` grid steps), as float64 arrays of the model's shapes.

    The server therefore unmasks only ``sum_i (u_i + noise_i)``, never an un-noised sum. ``C``
    is the round's ``dp-clip-norm``; ``z``, ``m_min`` and SecAgg+'s range and levels come from the
    client's own run config, so the server cannot lower the noise. Noise comes from
    :func:`strategies.private.mechanisms.secure_generator` unless a test passes ``rng``.
    """
    from strategies.private.mechanisms import secure_generator
    from strategies.private.secure_sum import client_noise_share, client_noise_std

    clip = float(config.get("dp-clip-norm", settings.dp_clip_norm))
    layout = ModelLayout.of_arrays(global_weights)
    update = layout.flatten_arrays(weights, dtype=np.float64) - layout.flatten_arrays(global_weights, dtype=np.float64)
    norm = float(np.linalg.norm(update))
    if norm > clip:
        update *= clip / norm * (1.0 - 2.0**-40)  # float64 rounding can never leave it above C
    min_clients = settings.secagg_dp_min_clients or settings.sampling_params().clients_per_round()
    share = client_noise_share(
        update,
        clipping_range=settings.secagg_clipping_range,
        quantization_range=settings.secagg_quantization_range,
        local_std=client_noise_std(
            settings.dp_noise_multiplier,
            clip,
            settings.secagg_clipping_range,
            settings.secagg_quantization_range,
            min_clients,
        ),
        rng=rng or secure_generator(),
    )
    return [
        share[start:end].reshape(shape) for shape, start, end in zip(layout.shapes, layout.offsets, layout.offsets[1:])
    ]


def _client_fn(context: Context):
    return secure_keras_client(context).to_client()


@functools.cache
def _legacy_apps():
    from flwr.client.mod import secaggplus_mod
    from flwr.clientapp import ClientApp

    return ClientApp(client_fn=_client_fn, mods=[secaggplus_mod]), ClientApp(client_fn=_client_fn)


def legacy_client_app(msg: Message, context: Context) -> Message:
    """Answer a message of Flower's legacy workflows: SecAgg+ train stages through
    ``secaggplus_mod``, plain legacy fit/evaluate directly."""
    secure, plain = _legacy_apps()
    if any(name.startswith("secaggplus") for name in msg.content.config_records):
        return secure(msg, context)
    return plain(msg, context)
