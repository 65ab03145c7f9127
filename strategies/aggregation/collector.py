"""Decode and validate: a round's train replies → the K x P matrix of updates, and what was rejected.

:class:`ReplyCollector` is the first step of every strategy of ours
(:class:`~strategies.aggregation.strategy.AggregationStrategy`,
:class:`~strategies.private.dp_fedavg.DpFedAvgStrategy`). Per round it knows the global model sent
(:meth:`~ReplyCollector.start_round`), decodes each reply (full weights, or a compressed upload
through its ``decoder``), validates it (:mod:`strategies.core.replies`: one reply per node,
records, ``num-examples``, names, shapes, dtypes, finiteness, ``max_update_norm``), writes
``u_k = w_k - w`` into a reused float32 buffer, and then runs its hooks (simulation only: e.g.
omniscient attackers rewriting their rows). Rejections are logged and kept as
``"node <id>: <reason>"`` for the round's history.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from logging import WARNING

import numpy as np
from flwr.app import ArrayRecord, Message
from flwr.common.logger import log

from strategies.core.checks import positive
from strategies.core.replies import is_client_error
from strategies.core.update_matrix import (
    CollectedUpdates,
    Decoder,
    ModelLayout,
    ReplyRows,
    RowsResult,
    UpdateBuffer,
    collect_updates,
    default_memory_budget,
    stream_rows,
    stream_weighted_mean,
)

UpdateHook = Callable[[int, CollectedUpdates], None]
"""``hook(server_round, collected)``: may rewrite the rows of ``collected.updates`` in place."""


class ReplyCollector:
    """Replies → validated update matrix, for one strategy across rounds.

    Parameters
    ----------
    max_update_norm : reject (not clip) updates longer than this; None: no limit
    decoder : decodes compressed uploads (ArrayRecord, P, server_round) -> update; None: replies
        carry weights
    memory_budget_gb : GiB the K x P float32 matrix may take (None: half of the machine's physical
        memory); a round with more valid replies than fit aggregates the first that fit and drops
        the rest, with a warning (dropped replies are not counted as faults)
    """

    def __init__(
        self,
        *,
        max_update_norm: float | None = None,
        decoder: Decoder | None = None,
        memory_budget_gb: float | None = None,
    ) -> None:
        if max_update_norm is not None and max_update_norm != np.inf:
            positive("max-update-norm", max_update_norm)
        if memory_budget_gb is not None:
            positive("aggregation-memory-gb", memory_budget_gb)
        self.max_update_norm = max_update_norm
        self.decoder = decoder
        self.memory_budget = int(memory_budget_gb * 2**30) if memory_budget_gb is not None else default_memory_budget()
        """Bytes the update matrix may take."""
        self.hooks: list[UpdateHook] = []
        self._buffer = UpdateBuffer()
        self._stream_out: np.ndarray | None = None
        self._layout: ModelLayout | None = None
        self._global: np.ndarray | None = None
        self._rejections: list[str] = []

    def start_round(self, arrays: ArrayRecord) -> None:
        """Remember the global model this round's replies answer."""
        self._layout = ModelLayout.of(arrays)
        self._global = self._layout.flatten(arrays)

    @property
    def layout(self) -> ModelLayout:
        """The global model's layout (known from :meth:`start_round` on)."""
        if self._layout is None:
            raise RuntimeError("aggregate_train called before configure_train")
        return self._layout

    @property
    def global_flat(self) -> np.ndarray:
        """The global model this round started from, as one float32 vector."""
        if self._global is None:
            raise RuntimeError("aggregate_train called before configure_train")
        return self._global

    @property
    def reads_single_updates(self) -> bool:
        """Whether some part of this step looks at each update alone (a decoder, a norm limit or a
        hook), so that a mean cannot be streamed from the reply bytes."""
        return bool(self.hooks) or self.decoder is not None or self.max_update_norm is not None

    def collect(self, server_round: int, replies: Iterable[Message]) -> CollectedUpdates:
        """Validate the replies into the update matrix, then run the hooks on it."""
        collected = collect_updates(
            list(replies),
            self.layout,
            self.global_flat,
            self._buffer,
            max_norm=self.max_update_norm,
            decoder=self.decoder,
            server_round=server_round,
            max_rows=self.max_rows,
        )
        if collected.dropped:
            log(
                WARNING,
                "Round %d: %d valid replies of %d parameters would take %.1f GiB, over the memory budget of "
                "%.1f GiB (aggregation-memory-gb): the last %d are dropped",
                server_round,
                collected.count + len(collected.dropped),
                self.layout.size,
                (collected.count + len(collected.dropped)) * self.layout.size * 4 / 2**30,
                self.memory_budget / 2**30,
                len(collected.dropped),
            )
        self._record(server_round, collected)
        if collected.count:
            for hook in self.hooks:
                hook(server_round, collected)
        return collected

    def stream(
        self, server_round: int, replies: list[Message], compute: RowsResult
    ) -> tuple[CollectedUpdates, ReplyRows, np.ndarray | None] | None:
        """``compute(rows, num_examples)`` straight from the reply bytes, without the matrix
        (:func:`strategies.core.update_matrix.stream_rows`; None: fall back to :meth:`collect`).
        Only when :attr:`reads_single_updates` is False."""
        if self.reads_single_updates:
            raise RuntimeError("a decoder, norm limit or hook reads single updates: collect them instead")
        streamed = stream_rows(replies, self.layout, self.global_flat, compute)
        if streamed is not None:
            self._record(server_round, streamed[0])
        return streamed

    def stream_mean(
        self, server_round: int, replies: list[Message], weigh: Callable[[np.ndarray], np.ndarray]
    ) -> tuple[CollectedUpdates, np.ndarray | None] | None:
        """The ``weigh``-weighted mean update straight from the reply bytes, without the matrix
        (:func:`strategies.core.update_matrix.stream_weighted_mean`; None: fall back to :meth:`collect`).
        Only when :attr:`reads_single_updates` is False."""
        if self.reads_single_updates:
            raise RuntimeError("a decoder, norm limit or hook reads single updates: collect them instead")
        size = self.layout.size
        if self._stream_out is None or self._stream_out.shape != (size,):
            self._stream_out = np.empty(size, np.float32)
        streamed = stream_weighted_mean(replies, self.layout, self.global_flat, weigh, self._stream_out)
        if streamed is not None:
            self._record(server_round, streamed[0])
        return streamed

    @property
    def max_rows(self) -> int:
        """The most updates of the current model the memory budget holds (at least one)."""
        return max(1, self.memory_budget // (4 * max(self.layout.size, 1)))

    def rejections(self) -> list[str]:
        """The replies of the last round that were rejected as malformed or hostile, as
        ``"node <id>: <reason>"`` (error replies are not listed: the round loop records them)."""
        return list(self._rejections)

    @staticmethod
    def measurements(collected: CollectedUpdates) -> dict[str, float]:
        """``accepted-replies`` and ``rejected-replies`` (error replies included) of the round, and
        ``dropped-replies`` when the memory budget dropped some."""
        out: dict[str, float] = {"accepted-replies": collected.count, "rejected-replies": len(collected.rejections)}
        if collected.dropped:
            out["dropped-replies"] = len(collected.dropped)
        return out

    @staticmethod
    def faults(collected: CollectedUpdates) -> int:
        """Replies rejected as malformed or hostile (not client errors): what may lower a rule's f."""
        return sum(not is_client_error(line) for line in collected.rejections)

    def _record(self, server_round: int, collected: CollectedUpdates) -> None:
        self._rejections = [line for line in collected.rejections if not is_client_error(line)] + collected.dropped
        for line in collected.rejections:
            log(WARNING, "Round %d: %s", server_round, line)
