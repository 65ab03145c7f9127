"""Compressed uploads: the client encodes its update, the server decodes it before the rule.

Client (:func:`encode_upload`, called from :func:`fl_app.client.upload.upload`)::

    u = flatten(w_client - w_global)                     # float32, length P
    payload = C(u + e)  ;  e <- u + e - decode(C(u + e))  # error feedback for biased codecs
    reply ArrayRecord = payload (e.g. top-k: indices int32 + values float32)

The residual ``e`` lives in the node's ``context.state`` (an ``ArrayRecord`` under
:data:`STATE_KEY`), which Flower keeps per node across rounds. Seeds: ``round_seed`` is the server
round (sent in the train config as ``server-round``), ``client_seed`` the Flower node id.

Server (:class:`strategies.compression.decoder.UpdateDecoder`, set up by
:mod:`fl_app.server.strategy_setup`): our :class:`~strategies.aggregation.strategy.AggregationStrategy` gets an
:class:`UpdateDecoder` as its ``decoder``; :func:`strategies.core.update_matrix.collect_updates` then turns
each reply's payload into a row of the K x P update matrix (malformed payloads are rejected with the
node id, never raised) before validation, norm bounds, the rule and DP noise. Flower's built-in
strategies average full weights and cannot decode, so compression requires one of ours.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Context

from fl_app.config.settings import Settings, codec_from_settings
from strategies.compression.codecs import (
    Codec,
    ErrorFeedback,
    payload_to_array_record,
)
from strategies.core.update_matrix import ModelLayout

STATE_KEY = "compression-error-feedback"


def uses_error_feedback(settings: Settings, codec: Codec) -> bool:
    """Error feedback wraps biased codecs (top-k; random-mask without rescaling) when enabled."""
    return codec.biased and settings.compression_error_feedback


def encode_upload(
    settings: Settings,
    context: Context,
    global_weights: list[np.ndarray],
    weights: list[np.ndarray],
    config: dict[str, Any],
) -> ArrayRecord:
    """The compressed update of one client, as the ArrayRecord of its reply."""
    codec = codec_from_settings(settings)
    layout = ModelLayout.of_arrays(global_weights)
    update = layout.flatten_arrays(weights, minus=layout.flatten_arrays(global_weights))
    seeds = dict(round_seed=int(config.get("server-round", 0)), client_seed=int(context.node_id))
    if not uses_error_feedback(settings, codec):
        return payload_to_array_record(codec.encode(update, **seeds))
    feedback = ErrorFeedback(codec)
    if STATE_KEY in context.state.array_records:
        state = context.state.array_records[STATE_KEY].to_numpy_ndarrays()
        if state and state[0].size == update.size:  # a changed model starts a fresh residual
            feedback.load_state_dict({"residual": state[0]})
    payload = feedback.encode(update, **seeds)
    context.state.array_records[STATE_KEY] = ArrayRecord([feedback.state_dict()["residual"]])
    return payload_to_array_record(payload)
