"""The ``ClientApp``: serves :class:`~fl_app.task.keras_client.KerasClient` to Message-API strategies.

Every ``flwr.serverapp.strategy`` strategy, and ours, sends a train message with the global model in
an ``ArrayRecord`` (key ``arrays``) and a ``ConfigRecord`` (key ``config``); the reply carries the
new weights and a ``MetricRecord`` with ``num-examples``. An evaluate message is answered with the
loss, the model's metrics (their Keras names) and ``num-examples`` of the client's test split.

The node's client is built once per process (:mod:`fl_app.client.node_client`); what it sends is
shaped by the client-side transforms in :mod:`fl_app.client.upload`.

Users of Flower's legacy stack can take :func:`client_fn` instead (``ClientApp(client_fn=…)``).
"""

from __future__ import annotations

from typing import Any

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fl_app.attacks.poisoning import poison_weights
from fl_app.client.encryption import answer_verification, capped_examples, is_verification, reply_metrics
from fl_app.client.encryption import global_weights as received_global_weights
from fl_app.client.node_client import client_fn, make_client, partition_id_of, settings_from_context
from fl_app.client.upload import upload
from fl_app.delivery.shipping import answer_export_check, is_export_check
from fl_app.deploy.node_worker import keras_worker_mod

__all__ = ["app", "client_fn"]

# keras_worker_mod: in deployment, a SuperNode whose node config names a warm worker
# (keras-worker='SOCKET') runs messages there instead of importing TensorFlow per message.
app = ClientApp(mods=[keras_worker_mod])


def _is_legacy(msg: Message) -> bool:
    """Whether ``msg`` comes from Flower's legacy workflows (SecAgg+ stages, fitins/evaluateins)."""
    if not msg.has_content():
        return False
    names = set(msg.content.config_records) | set(msg.content.array_records)
    return any(name.startswith(("secaggplus", "fitins", "evaluateins", "getparametersins")) for name in names)


def _config_of(msg: Message) -> dict[str, Any]:
    """The message's train or evaluate config (empty when it carries none)."""
    records = msg.content.config_records
    return dict(records["config"]) if "config" in records else {}


def _server_round(config: dict[str, Any]) -> int:
    value = config.get("server-round", 0)
    return int(value) if isinstance(value, (int, float)) else 0


def _numeric(metrics: dict[str, Any]) -> dict[str, int | float]:
    """The metrics a ``MetricRecord`` can carry (numbers); KerasClient reports only numbers."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Fit on local data, starting from the global weights in ``msg``."""
    from fl_app.client.update_privacy import dp_sgd_report, maybe_fail, released_train_metrics

    if _is_legacy(msg):  # Flower's legacy workflows (SecAgg+): see fl_app.secagg.client
        from fl_app.secagg.client import legacy_client_app

        return legacy_client_app(msg, context)
    client = make_client(context)
    settings = settings_from_context(context)
    partition_id = partition_id_of(context)
    config = _config_of(msg)
    server_round = _server_round(config)
    maybe_fail(settings, partition_id, server_round)
    global_weights = received_global_weights(settings, context, msg)
    weights, num_examples, metrics = client.fit(global_weights, config)
    num_examples = capped_examples(settings, num_examples)
    metrics.update(dp_sgd_report(settings, num_examples, server_round))
    weights = poison_weights(settings, partition_id, global_weights, weights, server_round)
    content = RecordDict(
        {
            "arrays": upload(settings, context, global_weights, weights, {**config, "num-examples": num_examples}),
            "metrics": MetricRecord(
                {
                    **released_train_metrics(settings, _numeric(metrics), num_examples, partition_id),
                    **reply_metrics(settings, context),
                }
            ),
        }
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global weights in ``msg`` on the local test split."""
    if _is_legacy(msg):
        from fl_app.secagg.client import legacy_client_app

        return legacy_client_app(msg, context)
    client = make_client(context)
    if is_export_check(msg):  # the exported TFLite model, checked before it ships
        return answer_export_check(msg, client, settings_from_context(context).client_threads)
    config = _config_of(msg)
    global_weights = received_global_weights(settings_from_context(context), context, msg)
    loss, num_examples, metrics = client.evaluate(global_weights, config)
    content = RecordDict({"metrics": MetricRecord({"loss": loss, **_numeric(metrics), "num-examples": num_examples})})
    return Message(content=content, reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """``initial-weights``: the seeded initial model, so a server without TensorFlow can start;
    ``he-verify``: a key holder's verdicts on a round's encrypted sums."""
    from fl_app.client.initial_weights import initial_weights_reply

    if is_verification(msg):
        return answer_verification(settings_from_context(context), context, msg)
    return initial_weights_reply(msg, context)
