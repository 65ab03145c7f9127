"""The checks every train reply passes before any strategy aggregates it (one implementation).

A reply is screened before its arrays are read (:func:`screen_replies`):

* an error reply (the client failed) is set aside: the round loop records it, and Flower's
  strategies skip such replies themselves;
* only the first reply of a source node in a round counts; a second one is rejected;
* it must hold exactly one ``ArrayRecord`` and one ``MetricRecord``;
* ``num-examples`` must be a finite, positive, integer-valued number.

Its arrays are then checked against the global model's :class:`~strategies.core.update_matrix.ModelLayout`
(names, shapes and dtypes; ``ModelLayout.views``) and for NaN or infinite values
(:func:`finite_values`). :func:`strategies.core.update_matrix.collect_updates`, the streamed mean
and :class:`strategies.aggregation.guard.GuardedStrategy` all use these functions, so every path
rejects the same replies with the same reasons, as ``"node <id>: <reason>"``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Iterator

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord

WEIGHT_KEY = "num-examples"
"""The metric every train reply reports its example count under (and FedAvg weighs by)."""


def rejection(node: int, reason: object) -> str:
    """The line that records a rejected reply: ``"node <id>: rejected: <reason>"``."""
    return f"node {node}: rejected: {reason}"


def client_error(node: int, reason: object) -> str:
    """The line that records an error reply: ``"node <id>: client error: <reason>"``."""
    return f"node {node}: client error: {reason}"


def is_client_error(line: str) -> bool:
    """Whether ``line`` records an error reply (:func:`client_error`), which the round loop
    records itself, rather than a rejected one."""
    return ": client error: " in line


def reply_records(message: Message) -> tuple[ArrayRecord, MetricRecord]:
    """The reply's only ArrayRecord and only MetricRecord; ValueError if it holds other counts."""
    records = list(message.content.values())  # one pass: Flower's array_records/metric_records build synced copies
    arrays = [record for record in records if isinstance(record, ArrayRecord)]
    metrics = [record for record in records if isinstance(record, MetricRecord)]
    if len(arrays) != 1 or len(metrics) != 1:
        raise ValueError(
            f"a reply must hold one ArrayRecord and one MetricRecord, got {len(arrays)} and {len(metrics)}"
        )
    return arrays[0], metrics[0]


def num_examples(metrics: MetricRecord) -> float:
    """The reported ``num-examples``; ValueError unless it is a finite positive whole number."""
    if WEIGHT_KEY not in metrics:
        raise ValueError(f"the MetricRecord has no '{WEIGHT_KEY}'")
    value = metrics[WEIGHT_KEY]
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
        or value != int(value)
    ):
        raise ValueError(f"{WEIGHT_KEY} must be a positive number (a whole count of examples), got {value!r}")
    return float(value)


def finite_values(values: np.ndarray) -> bool:
    """Whether every value of ``values`` is finite, in one read without a temporary array.

    A float64 sum is finite exactly when every value is, except when float64 values overflow
    it, which the element-wise check then tells apart. Integer arrays are always finite.
    """
    if values.dtype.kind not in "fc":
        return True
    if values.dtype.kind == "f":
        with np.errstate(over="ignore", invalid="ignore"):
            if math.isfinite(float(np.sum(values, dtype=np.float64))):
                return True
    return bool(np.isfinite(values).all())


@dataclasses.dataclass(frozen=True, slots=True)
class ScreenedReply:
    """A reply that passed :func:`screen_replies`, with its place among the round's replies."""

    index: int
    node: int
    message: Message
    arrays: ArrayRecord
    metrics: MetricRecord
    num_examples: float


def screen_replies(replies: Iterable[Message], rejections: list[tuple[int, str]]) -> Iterator[ScreenedReply]:
    """The replies that are not errors, come first from their node, and hold one ArrayRecord and
    one MetricRecord with a valid ``num-examples``.

    Every other reply is appended to ``rejections`` as ``(index, line)``: error replies with
    :func:`client_error`, the rest with :func:`rejection`.
    """
    seen: set[int] = set()
    for index, message in enumerate(replies):
        node = message.metadata.src_node_id
        if message.has_error():
            rejections.append((index, client_error(node, message.error.reason)))
            continue
        if node in seen:
            rejections.append((index, rejection(node, "a second reply in the same round (only the first counts)")))
            continue
        seen.add(node)
        try:
            arrays, metrics = reply_records(message)
            count = num_examples(metrics)
        except ValueError as err:
            rejections.append((index, rejection(node, err)))
            continue
        yield ScreenedReply(index, node, message, arrays, metrics, count)
