"""The initial global model, with or without TensorFlow on the server.

With ``centralized-evaluation = true`` (the default) the server imports TensorFlow anyway, to
evaluate every round's global model on its held-out test set: it builds the seeded initial model
itself (:func:`server_model`). With ``centralized-evaluation = false`` the server needs no
TensorFlow at all (about 0.5 GB of memory and ~8 s of import saved on the server): it asks one
client for the seeded initial weights with a Flower ``query`` message (:func:`query_initial_arrays`,
answered by :func:`initial_weights_reply`), as Flower's legacy server asked a random client for its
parameters. Both sides build ``build_model(model, input_shape, output_spec, seed)`` after
``set_random_seed(seed)``, so the weights are the same either way.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from fl_app.config.settings import Settings
from fl_app.task.protocol import INITIAL_WEIGHTS_QUERY as QUERY
from strategies.core.nodes import wait_for_nodes


def server_model(settings: Settings):
    """(Keras model with the seeded initial weights, server test set or None) -- imports TF."""
    import tensorflow as tf

    from fl_app.server.evaluation import model_spec
    from fl_app.task.models import build_model

    input_shape, spec, test_set = model_spec(settings)
    tf.keras.utils.set_random_seed(settings.seed)
    return build_model(settings.model, input_shape, spec, settings.seed), test_set


def query_initial_arrays(grid, settings: Settings, *, timeout: float | None = None) -> ArrayRecord:
    """Ask one connected node for the seeded initial weights (no TensorFlow on the server)."""
    from fl_app.server.polling import send_and_receive

    timeout = settings.round_timeout if timeout is None else timeout
    nodes = wait_for_nodes(
        grid,
        1,
        timeout,
        poll=0.2,
        keys="one node sends the initial weights when centralized-evaluation=false",
        advice="start a SuperNode, or raise round-timeout",
    )
    message = Message(
        content=RecordDict({"config": ConfigRecord({"query": QUERY})}),
        dst_node_id=min(nodes),
        message_type=MessageType.QUERY,
    )
    replies = send_and_receive(grid, [message], timeout=timeout)
    if not replies:
        raise RuntimeError(f"node {min(nodes)} did not send the initial weights within {timeout:.0f} s")
    reply = replies[0]
    if reply.has_error():
        raise RuntimeError(f"node {min(nodes)} failed to send the initial weights: {reply.error.reason}")
    return reply.content.array_records["arrays"]
