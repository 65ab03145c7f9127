"""Server side of compressed uploads: one reply's payload back to a row of the update matrix."""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord

from strategies.compression.codecs import Codec, payload_from_array_record


class UpdateDecoder:
    """``decoder(record, P, server_round=r) -> update``, the
    :class:`~strategies.core.update_matrix.Decoder` of :func:`strategies.core.update_matrix.collect_updates`.

    The aggregation strategy passes the round its replies answer (random-mask rebuilds its mask
    from it); the decoder keeps no state between rounds.
    """

    def __init__(self, codec: Codec) -> None:
        self.codec = codec

    def __call__(self, record: ArrayRecord, size: int, *, server_round: int) -> np.ndarray:
        payload = payload_from_array_record(record)
        return self.codec.decode(payload, size, round_seed=server_round)
