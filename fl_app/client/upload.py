"""What a client sends back after training: the client-side transforms of its update, in order."""

from __future__ import annotations

from flwr.app import ArrayRecord, Context

from fl_app.client.encryption import encrypted_upload
from fl_app.config.settings import Settings


def upload(settings: Settings, context: Context, global_weights: list, weights: list, config: dict) -> ArrayRecord:
    """What a client sends back after training: its new weights (client-side transforms of the
    update, such as clipping, compression or encryption, replace them here).

    Order: clipping and DP noise act on the plaintext update first; compression or encryption
    (never both) last."""
    from fl_app.client.update_privacy import private_weights

    weights = private_weights(settings, global_weights, weights, config)  # dp-mode client-clipping / local DP
    if settings.homomorphic_encryption != "none":
        return encrypted_upload(settings, context, global_weights, weights, config)
    if settings.compression != "none":  # compression is post-processing of what precedes it
        from fl_app.client.compression import encode_upload

        return encode_upload(settings, context, global_weights, weights, config)
    return ArrayRecord(weights)
