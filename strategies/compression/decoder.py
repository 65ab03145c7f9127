"""Server side of compressed uploads: one reply's payload back to a row of the update matrix."""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord

from strategies.compression.codecs import Codec, payload_from_array_record


class UpdateDecoder:
    """``decoder(record, P) -> update`` for :func:`strategies.core.update_matrix.collect_updates`.

    ``server_round`` must be set before a round's replies are decoded (random-mask rebuilds its
    mask from it); the strategy does that.
    """

    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self.server_round = 0

    def __call__(self, record: ArrayRecord, size: int) -> np.ndarray:
        payload = payload_from_array_record(record)
        return self.codec.decode(payload, size, round_seed=self.server_round)
