"""Client side of the initial-weights query (see :mod:`fl_app.server.initial_weights`)."""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, RecordDict

from fl_app.task.protocol import INITIAL_WEIGHTS_QUERY as QUERY


def initial_weights_reply(msg: Message, context: Context) -> Message:
    """Client side of :func:`query_initial_arrays`: build the seeded model, send its weights."""
    import tensorflow as tf

    from fl_app.client.node_client import client_data_of, partition_id_of, settings_from_context
    from fl_app.task.models import build_model

    config = dict(msg.content["config"]) if "config" in msg.content else {}
    if config.get("query") != QUERY:
        raise ValueError(f"unknown query {config.get('query')!r}; this ClientApp answers '{QUERY}'")
    settings = settings_from_context(context)
    data = client_data_of(settings, partition_id_of(context), str(context.node_config.get("data-path", "")))
    input_shape = settings.parsed_input_shape() or tuple(data.x_train.shape[1:])
    tf.keras.utils.set_random_seed(settings.seed)
    model = build_model(settings.model, input_shape, data.spec, settings.seed)
    return Message(content=RecordDict({"arrays": ArrayRecord(model.get_weights())}), reply_to=msg)
