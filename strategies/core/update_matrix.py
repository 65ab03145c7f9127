"""Client replies → one K x P float32 matrix of validated updates.

The server's single representation (docs/architecture.md): every reply that passes validation becomes one row
``u_k = w_k - w_global`` of a contiguous float32 matrix that is reused from round to round, decoded
straight from the received bytes (one copy per reply, no per-layer Python lists of arrays). A reply
that cannot be trusted is rejected with a reason and the node id, never raised:

* the checks of :mod:`strategies.core.replies`: an error reply (the client failed), a second
  reply of a node, not exactly one ``ArrayRecord`` and one ``MetricRecord``, or ``num-examples``
  missing or not a positive whole number;
* arrays whose names, shapes or dtypes differ from the global model's (or a compressed payload
  that does not decode);
* NaN or infinite values;
* an update norm above ``max_norm`` (when set).
"""

from __future__ import annotations

import bisect
import dataclasses
import io
import math
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.common.constant import SType
from scipy.linalg.blas import saxpy  # at import, so that BLAS thread limits (threadpoolctl) see its library

from strategies.core.blas_threads import blas_thread_limit
from strategies.core.replies import ScreenedReply, finite_values, rejection, screen_replies
from strategies.core.wire_format import payload_from_array_record


class Decoder(Protocol):
    """Turns a reply's ArrayRecord into a length-P float32 *update* (for compressed uploads);
    ``server_round`` is the round the reply answers (random masks are rebuilt from it)."""

    def __call__(self, record: ArrayRecord, size: int, *, server_round: int) -> np.ndarray: ...


@dataclasses.dataclass(frozen=True)
class ModelLayout:
    """Names, shapes and dtypes of the global model's arrays, and their place in a flat vector.

    The one flatten/unflatten of the project, on the server (``ArrayRecord``: :meth:`of`,
    :meth:`flatten`, :meth:`unflatten`) and on the client (lists of arrays as Keras gives them:
    :meth:`of_arrays`, :meth:`flatten_arrays`, :meth:`unflatten_arrays`). Array ``i`` is
    ``vector[offsets[i]:offsets[i+1]]``, in C order.
    """

    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[np.dtype, ...]
    offsets: tuple[int, ...]  # offsets[i]:offsets[i+1] is array i in the flat vector
    headers: tuple[bytes, ...] = ()  # the global arrays' .npy headers (b"" where unknown)

    @classmethod
    def of(cls, record: ArrayRecord) -> ModelLayout:
        """The layout of ``record``, with each array's ``.npy`` header for :meth:`views`."""
        keys, shapes, dtypes, offsets, headers = [], [], [], [0], []
        for key, array in record.items():
            keys.append(key)
            shapes.append(tuple(array.shape))
            dtypes.append(np.dtype(array.dtype))
            offsets.append(offsets[-1] + math.prod(array.shape))
            headers.append(_npy_header(array, key))
        return cls(tuple(keys), tuple(shapes), tuple(dtypes), tuple(offsets), tuple(headers))

    @classmethod
    def of_arrays(cls, arrays: Sequence[np.ndarray]) -> ModelLayout:
        """The layout of a list of arrays (keys ``"0"``, ``"1"``, … as ``ArrayRecord(list)`` names them)."""
        shapes = [tuple(np.shape(array)) for array in arrays]
        offsets = [0]
        for shape in shapes:
            offsets.append(offsets[-1] + math.prod(shape))
        return cls(
            tuple(str(i) for i in range(len(shapes))),
            tuple(shapes),
            tuple(np.asarray(array).dtype for array in arrays),
            tuple(offsets),
        )

    @property
    def size(self) -> int:
        return self.offsets[-1]

    def views(self, record: ArrayRecord) -> list[np.ndarray]:
        """Flat read-only views of the record's arrays on the received bytes (no copy), checked
        against the layout (names, dtypes, shapes, byte counts).

        A reply serialised like the global model (the same ``.npy`` header, byte for byte) is
        read without parsing its header; any other header is parsed and checked as untrusted.
        """
        if tuple(record.keys()) != self.keys:
            raise ValueError(
                f"arrays are named {list(record.keys())[:5]}…, expected {list(self.keys)[:5]}… "
                f"({len(record)} arrays, expected {len(self.keys)})"
            )
        views = []
        for i, (key, array) in enumerate(record.items()):
            count, dtype = self.offsets[i + 1] - self.offsets[i], self.dtypes[i]
            header = self.headers[i] if self.headers else b""
            data = array.data
            if (
                header
                and isinstance(data, bytes)
                and array.stype == SType.NUMPY
                and len(data) == len(header) + count * dtype.itemsize
                and data.startswith(header)
            ):
                views.append(np.frombuffer(data, dtype, count=count, offset=len(header)))
                continue
            values = _array_view(array, key)
            if values.shape != self.shapes[i] or values.dtype != dtype:
                raise ValueError(
                    f"array '{key}' is {values.dtype}{list(values.shape)}, expected {dtype}{list(self.shapes[i])}"
                )
            views.append(values.reshape(-1))
        return views

    def flatten(
        self, record: ArrayRecord, out: np.ndarray | None = None, minus: np.ndarray | None = None
    ) -> np.ndarray:
        """The record's arrays concatenated into one float32 vector (checked against the layout).

        With ``minus`` (a flat vector of the layout's size) it returns ``flat(record) - minus``,
        computed in the same pass over the received bytes (one read, one write per value).
        """
        return self.flatten_views(self.views(record), out, minus)

    def flatten_views(
        self, views: Sequence[np.ndarray], out: np.ndarray | None = None, minus: np.ndarray | None = None
    ) -> np.ndarray:
        """:meth:`flatten` of the arrays' flat views, as :meth:`views` gave them (already checked)."""
        vector = np.empty(self.size, np.float32) if out is None else out
        for i, values in enumerate(views):
            segment = slice(self.offsets[i], self.offsets[i + 1])
            if minus is None:
                vector[segment] = values
            else:
                np.subtract(values, minus[segment], out=vector[segment], dtype=np.float32)
        return vector

    def flatten_arrays(
        self,
        arrays: Sequence[np.ndarray],
        *,
        minus: np.ndarray | None = None,
        dtype: type[np.floating] = np.float32,
    ) -> np.ndarray:
        """The arrays concatenated into one vector of ``dtype`` (float32 unless told otherwise).

        With ``minus`` (a flat vector of the layout's size) it returns ``flat(arrays) - minus``,
        each value cast to ``dtype`` before the subtraction (``w - g`` of a client's update, as
        :meth:`flatten` computes it on the server). Raises ``ValueError`` when the arrays do not
        have the layout's count and shapes.
        """
        if len(arrays) != len(self.shapes):
            raise ValueError(f"{len(arrays)} arrays, the layout has {len(self.shapes)}")
        vector = np.empty(self.size, dtype)
        for i, array in enumerate(arrays):
            values = np.asarray(array)
            if values.shape != self.shapes[i]:
                raise ValueError(f"array {i} has shape {list(values.shape)}, expected {list(self.shapes[i])}")
            segment = slice(self.offsets[i], self.offsets[i + 1])
            if minus is None:
                vector[segment] = values.reshape(-1)
            else:
                np.subtract(values.reshape(-1), minus[segment], out=vector[segment], dtype=dtype)
        return vector

    def unflatten_arrays(self, vector: np.ndarray) -> list[np.ndarray]:
        """The inverse of :meth:`flatten_arrays`: arrays of the layout's shapes and dtypes (views
        of ``vector`` where its dtype is already theirs)."""
        return [
            vector[start:end].reshape(shape).astype(dtype, copy=False)
            for shape, dtype, start, end in zip(self.shapes, self.dtypes, self.offsets[:-1], self.offsets[1:])
        ]

    def unflatten(self, vector: np.ndarray) -> ArrayRecord:
        """The inverse of :meth:`flatten`: an ArrayRecord with the layout's names and dtypes.

        Each array's bytes are what ``Array(ndarray)`` (``np.save``) writes, a ``.npy`` header and
        the values, but joined in one copy of the values (``np.save`` into a buffer copies them
        two or three times).
        """
        arrays = {
            key: _npy_array(vector[start:end].reshape(shape).astype(dtype, copy=False))
            for key, shape, dtype, start, end in zip(
                self.keys, self.shapes, self.dtypes, self.offsets[:-1], self.offsets[1:]
            )
        }
        return ArrayRecord(array_dict=arrays)


def _npy_array(values: np.ndarray) -> Array:
    """``Array(values)`` with the same bytes (``.npy`` format 1.0, C order), the values copied once."""
    values = np.asarray(values, order="C")  # not ascontiguousarray, which makes 0-d arrays 1-d
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(values))
    data = b"".join((header.getvalue(), values.reshape(-1).view(np.uint8).data))
    return Array(dtype=str(values.dtype), shape=tuple(values.shape), stype=SType.NUMPY, data=data)


def _npy_header(array: Array, key: str) -> bytes:
    """The ``.npy`` header of a (trusted) array's bytes; b"" if it is not NumPy-serialised."""
    if array.stype != SType.NUMPY:
        return b""
    values = _array_view(array, key)
    return bytes(array.data[: len(array.data) - values.nbytes])


def _array_view(array: Array, key: str) -> np.ndarray:
    """A read-only view of a received array, its header checked against its byte count."""
    return payload_from_array_record(ArrayRecord(array_dict={key: array}))[key]


class UpdateBuffer:
    """A K x P float32 matrix reused across rounds: grown when a round needs more rows, shrunk
    when a round needs less than half of them (so one large round does not pin its memory)."""

    def __init__(self) -> None:
        self._data = np.empty((0, 0), np.float32)

    @property
    def capacity(self) -> int:
        """The rows held now."""
        return int(self._data.shape[0])

    def rows(self, k: int, p: int) -> np.ndarray:
        if self._data.shape[1] != p or self._data.shape[0] < k or self._data.shape[0] > max(2 * k, 1):
            self._data = np.empty((k, p), np.float32)
        return self._data[:k]


def default_memory_budget() -> int:
    """Bytes the update matrix may take by default: half of the machine's physical memory."""
    return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2)


@dataclasses.dataclass
class CollectedUpdates:
    """The validated updates of one round and what was rejected."""

    updates: np.ndarray | None  # K x P float32, a view into the reused buffer; None when streamed
    num_examples: np.ndarray  # K, as reported (untrusted)
    node_ids: list[int]
    metrics: list[MetricRecord]
    rejections: list[str]  # "node <id>: <reason>"
    dropped: list[str] = dataclasses.field(default_factory=list)  # valid, but over the memory budget

    @property
    def count(self) -> int:
        return len(self.node_ids)

    def matrix(self) -> np.ndarray:
        """The K x P update matrix (a round whose mean was streamed has none)."""
        if self.updates is None:
            raise RuntimeError("this round's mean was streamed from the replies: there is no update matrix")
        return self.updates


def _finite_norm(vector: np.ndarray) -> float:
    """L2 norm of a float32 vector, or a ValueError if it holds NaN or Inf.

    One BLAS dot product reads the vector once: its result is finite exactly when every value
    is finite, except when squares of huge finite values overflow float32, which the slow
    check tells apart (the norm is then taken in float64).
    """
    with np.errstate(over="ignore", invalid="ignore"):
        squares = float(np.dot(vector, vector))
    if math.isfinite(squares):
        return math.sqrt(squares)
    if not np.isfinite(vector).all():
        raise ValueError("the update holds NaN or infinite values")
    return float(np.linalg.norm(vector.astype(np.float64)))


def collect_updates(
    replies: Iterable[Message],
    layout: ModelLayout,
    global_vector: np.ndarray,
    buffer: UpdateBuffer,
    *,
    max_norm: float | None = None,
    decoder: Decoder | None = None,
    server_round: int = 0,
    max_rows: int | None = None,
) -> CollectedUpdates:
    """Validate ``replies`` and write ``w_k - w_global`` (or the decoded update) into ``buffer``.

    Row order follows the order of the valid replies. ``decoder`` (for compressed uploads) maps a
    reply's ArrayRecord of round ``server_round`` to its update directly; without it a reply
    carries full weights. The matrix is allocated only for the replies that pass the cheap checks
    (records, ``num-examples``, array names, shapes and dtypes), at most ``max_rows`` of them (the
    server's memory budget); valid replies beyond it are ``dropped``, in reply order.
    """
    replies = list(replies)
    rejections: list[tuple[int, str]] = []
    candidates: list[tuple[ScreenedReply, list[np.ndarray] | None]] = []
    for screened in screen_replies(replies, rejections):
        views = None
        if decoder is None:
            try:
                views = layout.views(screened.arrays)  # names, shapes, dtypes, byte counts: no copy
            except ValueError as err:
                rejections.append((screened.index, rejection(screened.node, err)))
                continue
        candidates.append((screened, views))
    dropped: list[str] = []
    if max_rows is not None and len(candidates) > max_rows:
        dropped = [
            rejection(
                c.node, f"dropped: {len(candidates)} valid replies exceed the server's memory budget of {max_rows}"
            )
            for c, _ in candidates[max_rows:]
        ]
        candidates = candidates[:max_rows]
    matrix = buffer.rows(len(candidates), layout.size)
    node_ids: list[int] = []
    metrics_list: list[MetricRecord] = []
    examples: list[float] = []
    for screened, views in candidates:
        row = matrix[len(node_ids)]
        try:
            if decoder is not None:
                row[:] = decoder(screened.arrays, layout.size, server_round=server_round)
            elif views is not None:  # always, without a decoder: the views checked above
                layout.flatten_views(views, out=row, minus=global_vector)
            norm = _finite_norm(row)
            if max_norm is not None and norm > max_norm:
                # not the norm itself: a private run's history releases the reasons
                raise ValueError(f"the update norm exceeds max-update-norm {max_norm:.4g}")
        except ValueError as err:
            rejections.append((screened.index, rejection(screened.node, err)))
            continue
        node_ids.append(screened.node)
        metrics_list.append(screened.metrics)
        examples.append(screened.num_examples)
    return CollectedUpdates(
        matrix[: len(node_ids)],
        np.asarray(examples, np.float64),
        node_ids,
        metrics_list,
        [line for _, line in sorted(rejections)],
        dropped,
    )


_STREAM_CHUNK = 65536  # values per chunk of the streamed sum: a few hundred kB, cache-resident


def weighted_sum(
    rows: list[list[np.ndarray]], coefficients: np.ndarray, layout: ModelLayout, out: np.ndarray
) -> np.ndarray:
    """``out = sum_k c_k x_k`` for replies given as flat per-array views (float32).

    Chunk by chunk of each array, so that the partial sum stays in cache while every reply's
    bytes are read once; each ``total += c_k x_k`` is one BLAS ``saxpy`` (a fused multiply-add,
    one pass: ~1.6x faster than NumPy's multiply then add, about the speed of reading the bytes),
    on one BLAS thread (:mod:`strategies.core.blas_threads`: waking a second thread for every
    256 KB call costs more than it reads; docs/performance.md has the figures).
    """
    with blas_thread_limit(1):
        _weighted_sum(rows, coefficients, layout, out)
    return out


def _weighted_sum(rows: list[list[np.ndarray]], coefficients: np.ndarray, layout: ModelLayout, out: np.ndarray) -> None:
    """:func:`weighted_sum`'s loop: per array, per chunk, ``total = c_0 x_0`` then ``total += c_k x_k``."""
    for i in range(len(layout.keys)):
        base, size = layout.offsets[i], layout.offsets[i + 1] - layout.offsets[i]
        for start in range(0, size, _STREAM_CHUNK):
            stop = min(start + _STREAM_CHUNK, size)
            total = out[base + start : base + stop]
            np.multiply(rows[0][i][start:stop], coefficients[0], out=total)
            for views, coefficient in zip(rows[1:], coefficients[1:]):
                saxpy(views[i][start:stop], total, a=coefficient)  # in place: total is float32, contiguous


class ReplyRows:
    """The valid replies' updates ``x_k = w_k - w`` read straight from the received bytes.

    The :class:`strategies.robust.rules.UpdateRows` of a round that needs no K x P matrix:
    :meth:`read` fills a small column block (``x_k[columns] = w_k[columns] - w[columns]``, float32,
    the same values as the matrix's rows), :meth:`row` one row, :meth:`weighted_mean` and
    :meth:`mean_of_rows` stream ``sum_k c_k x_k`` over the chosen replies (:func:`weighted_sum`).
    """

    def __init__(self, views: list[list[np.ndarray]], layout: ModelLayout, global_vector: np.ndarray) -> None:
        self.views = views  # per reply, its arrays' flat views (:meth:`ModelLayout.views`)
        self.layout = layout
        self.global_vector = global_vector

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.views), self.layout.size

    def read(self, columns: slice, out: np.ndarray, rows: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """``out[i] = w_k[columns] - w[columns]`` for the i-th reply k of ``rows`` (every reply when
        None; ``out``: one line per reply read, width columns, float32)."""
        views = self.views if rows is None else [self.views[k] for k in rows]
        offsets = self.layout.offsets
        first = bisect.bisect_right(offsets, columns.start) - 1
        for i in range(first, len(offsets) - 1):
            low, high = max(columns.start, offsets[i]), min(columns.stop, offsets[i + 1])
            if low >= high:
                break
            global_part, target = self.global_vector[low:high], out[:, low - columns.start : high - columns.start]
            for k, reply_views in enumerate(views):
                np.subtract(reply_views[i][low - offsets[i] : high - offsets[i]], global_part, out=target[k])
        return out

    def row(self, index: int) -> np.ndarray:
        """``x_index`` as a new float32 vector."""
        return self.layout.flatten_views(
            self.views[index], out=np.empty(self.layout.size, np.float32), minus=self.global_vector
        )

    def weighted_mean(
        self, coefficients: np.ndarray, out: np.ndarray, rows: Sequence[int] | np.ndarray | None = None
    ) -> np.ndarray:
        """``out = sum_k c_k w_k - (sum_k c_k) w`` over ``rows`` (all replies when None): with
        coefficients summing to 1, the weighted mean of the updates ``x_k``, in one read of each
        reply's bytes (float32 ``c``, one per row used)."""
        views = self.views if rows is None else [self.views[k] for k in rows]
        weighted_sum(views, coefficients, self.layout, out)
        saxpy(self.global_vector, out, a=-coefficients.sum(dtype=np.float64))  # in place, one pass, no temporary
        return out

    def mean_of_rows(self, rows: np.ndarray) -> np.ndarray:
        """The unweighted mean of the updates ``x_k``, k in ``rows``, as a new float32 vector."""
        coefficients = np.full(len(rows), 1.0 / len(rows), np.float32)
        return self.weighted_mean(coefficients, np.empty(self.layout.size, np.float32), rows)

    def non_finite(self) -> list[int]:
        """The replies whose values hold NaN or Inf."""
        return [k for k, views in enumerate(self.views) if not all(finite_values(view) for view in views)]


RowsResult = Callable[[ReplyRows, np.ndarray], np.ndarray]
"""``compute(rows, num_examples)``: an array that is finite whenever every row is."""


def stream_rows(
    replies: Iterable[Message], layout: ModelLayout, global_vector: np.ndarray, compute: RowsResult
) -> tuple[CollectedUpdates, ReplyRows, np.ndarray | None] | None:
    """Validate ``replies`` and return ``compute`` of their updates read straight from the bytes.

    The same validation as :func:`collect_updates` without ``max_norm`` or a decoder, and no K x P
    matrix: each accepted reply's arrays are views of its bytes (:meth:`ModelLayout.views`),
    handed to ``compute`` as :class:`ReplyRows` with the reported example counts. NaN and Inf are
    found from the result (``compute`` must make any non-finite input non-finite, as a weighted
    sum or a Gram matrix does); the replies that hold them are then rejected and ``compute``
    redone. Returns ``(collected, rows, result)`` (``collected.updates`` is None; ``result`` None
    when no reply is valid), or None if the result is not finite without any non-finite input
    (e.g. an update ``x_k - w`` beyond float32), for the caller to fall back to
    :func:`collect_updates`.
    """
    accepted: list[tuple[int, int, MetricRecord, float, list[np.ndarray]]] = []
    rejections: list[tuple[int, str]] = []
    for screened in screen_replies(replies, rejections):
        try:
            views = layout.views(screened.arrays)
        except ValueError as err:
            rejections.append((screened.index, rejection(screened.node, err)))
            continue
        accepted.append((screened.index, screened.node, screened.metrics, screened.num_examples, views))
    result: np.ndarray | None = None
    rows = ReplyRows([], layout, global_vector)
    while accepted:
        rows = ReplyRows([entry[4] for entry in accepted], layout, global_vector)
        with np.errstate(over="ignore", invalid="ignore"):  # found below, from the result
            result = compute(rows, np.asarray([entry[3] for entry in accepted], np.float64))
        if np.isfinite(result).all():
            break
        bad = set(rows.non_finite())
        if not bad:
            return None
        rejections += [
            (entry[0], rejection(entry[1], "the update holds NaN or infinite values"))
            for k, entry in enumerate(accepted)
            if k in bad
        ]
        accepted = [entry for k, entry in enumerate(accepted) if k not in bad]
        result = None
        rows = ReplyRows([], layout, global_vector)
    collected = CollectedUpdates(
        None,
        np.asarray([entry[3] for entry in accepted], np.float64),
        [entry[1] for entry in accepted],
        [entry[2] for entry in accepted],
        [line for _, line in sorted(rejections)],
    )
    return collected, rows, result


def stream_weighted_mean(
    replies: Iterable[Message],
    layout: ModelLayout,
    global_vector: np.ndarray,
    weigh: Callable[[np.ndarray], np.ndarray],
    out: np.ndarray,
) -> tuple[CollectedUpdates, np.ndarray | None] | None:
    """Validate ``replies`` and return their weighted mean update without the K x P matrix.

    ``mean = sum_k a_k x_k - (sum_k a_k) w`` with ``a = weigh(n) / sum(weigh(n))`` (float32)
    and ``x_k`` read straight from the received bytes: :func:`stream_rows` with
    :meth:`ReplyRows.weighted_mean`, one read of each reply and no per-client row. Returns
    ``(collected, mean)``, or None for the caller to fall back to :func:`collect_updates`.
    """

    def mean(rows: ReplyRows, num_examples: np.ndarray) -> np.ndarray:
        weights = np.asarray(weigh(num_examples), np.float64)
        return rows.weighted_mean((weights / weights.sum()).astype(np.float32), out)

    streamed = stream_rows(replies, layout, global_vector, mean)
    return None if streamed is None else (streamed[0], streamed[2])
