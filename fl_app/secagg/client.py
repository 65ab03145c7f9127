"""Client side of SecAgg+: Flower's legacy ``secaggplus_mod`` around the same KerasClient.

See :mod:`fl_app.secagg.server` for the protocol and the server side.
"""

from __future__ import annotations

import functools

from flwr.app import Context, Message
from flwr.client import NumPyClient


def secure_keras_client(context: Context) -> NumPyClient:
    """Flower's legacy ``NumPyClient`` around :class:`~fl_app.task.keras_client.KerasClient`: clips (or noises)
    the update on the device and reports one example, so SecAgg+'s weighted mean is the plain mean."""
    from fl_app.client.node_client import make_client, partition_id_of, settings_from_context
    from fl_app.client.update_privacy import dp_sgd_report, maybe_fail, private_weights, released_train_metrics

    inner = make_client(context)
    settings = settings_from_context(context)
    partition_id = partition_id_of(context)

    class _Client(NumPyClient):
        def get_parameters(self, config):
            return inner.get_parameters(config)

        def fit(self, parameters, config):
            config = dict(config)
            server_round = int(config.get("server-round", 0))
            maybe_fail(settings, partition_id, server_round)
            weights, num_examples, metrics = inner.fit(parameters, config)
            metrics.update(dp_sgd_report(settings, num_examples, server_round))
            weights = private_weights(settings, parameters, weights, config)
            released = released_train_metrics(settings, metrics, 1, partition_id)
            del released["num-examples"]  # SecAgg+ sums with weight 1: its mean is the plain mean
            return weights, 1, released

        def evaluate(self, parameters, config):
            return inner.evaluate(parameters, config)

    return _Client()


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
