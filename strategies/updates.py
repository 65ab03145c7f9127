"""Client replies → one K x P float32 matrix of validated updates.

The server's single representation (DESIGN.md): every reply that passes validation becomes one row
``u_k = w_k - w_global`` of a contiguous float32 matrix that is reused from round to round, decoded
straight from the received bytes (one copy per reply, no per-layer Python lists of arrays). A reply
that cannot be trusted is rejected with a reason and the node id, never raised:

* an error reply (the client failed);
* not exactly one ``ArrayRecord`` and one ``MetricRecord``, or ``num-examples`` missing, not a
  positive finite number;
* arrays whose names, shapes or dtypes differ from the global model's (or a compressed payload
  that does not decode);
* NaN or infinite values;
* an update norm above ``max_norm`` (when set).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord

from strategies.codecs import payload_from_array_record

Decoder = Callable[[ArrayRecord, int], np.ndarray]
"""Turns a reply's ArrayRecord into a length-P float32 *update* (for compressed uploads)."""


@dataclasses.dataclass(frozen=True)
class ModelLayout:
    """Names, shapes and dtypes of the global model's arrays, and their place in a flat vector."""

    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[np.dtype, ...]
    offsets: tuple[int, ...]  # offsets[i]:offsets[i+1] is array i in the flat vector

    @classmethod
    def of(cls, record: ArrayRecord) -> ModelLayout:
        keys, shapes, dtypes, offsets = [], [], [], [0]
        for key, array in record.items():
            keys.append(key)
            shapes.append(tuple(array.shape))
            dtypes.append(np.dtype(array.dtype))
            offsets.append(offsets[-1] + math.prod(array.shape))
        return cls(tuple(keys), tuple(shapes), tuple(dtypes), tuple(offsets))

    @property
    def size(self) -> int:
        return self.offsets[-1]

    def flatten(
        self, record: ArrayRecord, out: np.ndarray | None = None, minus: np.ndarray | None = None
    ) -> np.ndarray:
        """The record's arrays concatenated into one float32 vector (checked against the layout).

        With ``minus`` (a flat vector of the layout's size) it returns ``flat(record) - minus``,
        computed in the same pass over the received bytes (one read, one write per value).
        """
        vector = np.empty(self.size, np.float32) if out is None else out
        if tuple(record.keys()) != self.keys:
            raise ValueError(
                f"arrays are named {list(record.keys())[:5]}…, expected {list(self.keys)[:5]}… "
                f"({len(record)} arrays, expected {len(self.keys)})"
            )
        for i, (key, array) in enumerate(record.items()):
            values = _array_view(array, key)
            if values.shape != self.shapes[i] or values.dtype != self.dtypes[i]:
                raise ValueError(
                    f"array '{key}' is {values.dtype}{list(values.shape)}, "
                    f"expected {self.dtypes[i]}{list(self.shapes[i])}"
                )
            segment = slice(self.offsets[i], self.offsets[i + 1])
            if minus is None:
                vector[segment] = values.reshape(-1)
            else:
                np.subtract(values.reshape(-1), minus[segment], out=vector[segment], dtype=np.float32)
        return vector

    def unflatten(self, vector: np.ndarray) -> ArrayRecord:
        """The inverse of :meth:`flatten`: an ArrayRecord with the layout's names and dtypes."""
        arrays = {
            key: Array(vector[start:end].reshape(shape).astype(dtype, copy=False))
            for key, shape, dtype, start, end in zip(
                self.keys, self.shapes, self.dtypes, self.offsets[:-1], self.offsets[1:]
            )
        }
        return ArrayRecord(array_dict=arrays)


def _array_view(array: Array, key: str) -> np.ndarray:
    """A read-only view of a received array, its header checked against its byte count."""
    return payload_from_array_record(ArrayRecord(array_dict={key: array}))[key]


class UpdateBuffer:
    """A K x P float32 matrix reused across rounds (grown, never shrunk)."""

    def __init__(self) -> None:
        self._data = np.empty((0, 0), np.float32)

    def rows(self, k: int, p: int) -> np.ndarray:
        if self._data.shape[1] != p or self._data.shape[0] < k:
            self._data = np.empty((k, p), np.float32)
        return self._data[:k]


@dataclasses.dataclass
class CollectedUpdates:
    """The validated updates of one round and what was rejected."""

    updates: np.ndarray  # K x P float32, a view into the reused buffer
    num_examples: np.ndarray  # K, as reported (untrusted)
    node_ids: list[int]
    metrics: list[MetricRecord]
    rejections: list[str]  # "node <id>: <reason>"

    @property
    def count(self) -> int:
        return len(self.node_ids)


def _reply_records(message: Message) -> tuple[ArrayRecord, MetricRecord]:
    content = message.content
    arrays, metrics = list(content.array_records.values()), list(content.metric_records.values())
    if len(arrays) != 1 or len(metrics) != 1:
        raise ValueError(
            f"a reply must hold one ArrayRecord and one MetricRecord, got {len(arrays)} and {len(metrics)}"
        )
    return arrays[0], metrics[0]


def _num_examples(metrics: MetricRecord) -> float:
    if "num-examples" not in metrics:
        raise ValueError("the MetricRecord has no 'num-examples'")
    value = metrics["num-examples"]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"num-examples must be a positive number, got {value!r}")
    return float(value)


def collect_updates(
    replies: Iterable[Message],
    layout: ModelLayout,
    global_vector: np.ndarray,
    buffer: UpdateBuffer,
    *,
    max_norm: float | None = None,
    decoder: Decoder | None = None,
) -> CollectedUpdates:
    """Validate ``replies`` and write ``w_k - w_global`` (or the decoded update) into ``buffer``.

    Row order follows the order of the valid replies. ``decoder`` (for compressed uploads) maps a
    reply's ArrayRecord to its update directly; without it a reply carries full weights.
    """
    replies = list(replies)
    matrix = buffer.rows(len(replies), layout.size)
    node_ids: list[int] = []
    metrics_list: list[MetricRecord] = []
    examples: list[float] = []
    rejections: list[str] = []
    for message in replies:
        node = message.metadata.src_node_id
        if message.has_error():
            rejections.append(f"node {node}: client error: {message.error.reason}")
            continue
        row = matrix[len(node_ids)]
        try:
            record, metrics = _reply_records(message)
            count = _num_examples(metrics)
            if decoder is None:
                layout.flatten(record, out=row, minus=global_vector)
            else:
                row[:] = decoder(record, layout.size)
            if not np.isfinite(row).all():
                raise ValueError("the update holds NaN or infinite values")
            if max_norm is not None:
                norm = float(np.linalg.norm(row))
                if norm > max_norm:
                    raise ValueError(f"update norm {norm:.4g} exceeds max-update-norm {max_norm:.4g}")
        except ValueError as err:
            rejections.append(f"node {node}: rejected: {err}")
            continue
        node_ids.append(node)
        metrics_list.append(metrics)
        examples.append(count)
    return CollectedUpdates(
        matrix[: len(node_ids)], np.asarray(examples, np.float64), node_ids, metrics_list, rejections
    )
