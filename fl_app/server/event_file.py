"""TensorBoard event files, written without TensorFlow.

TensorBoard reads ``events.out.tfevents.*`` files: TFRecord-framed ``Event`` protocol buffers.
TensorBoard's own ``EventFileWriter`` imports TensorFlow when it is installed (through
``tensorboard.compat.tf``), which costs a server without centralized evaluation 20 to 50 s and
hundreds of MB. :class:`EventFile` writes the same records with TensorBoard's ``RecordWriter``
(TFRecord framing and CRC, from TensorBoard's TensorFlow stub) and its generated protos only, so
the server imports no TensorFlow to log a run (tested in a subprocess).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.record_writer import RecordWriter

HISTOGRAM_BUCKETS = 30
"""Buckets of a histogram (fewer when it has fewer values)."""


class EventFile:
    """One TensorBoard event file in ``directory``, appended to with scalars and histograms.

    The file is named as TensorBoard's writers name theirs
    (``events.out.tfevents.<seconds>.<host>.<pid>.<n>``), starts with the ``brain.Event:2`` version
    record, and is flushed by :meth:`flush` (the server calls it after every round), so a crashed
    run keeps every finished round.
    """

    def __init__(self, directory: str | Path) -> None:
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        stamp, host, pid = int(time.time()), socket.gethostname(), os.getpid()
        n = 0
        while (folder / f"events.out.tfevents.{stamp:010d}.{host}.{pid}.{n}").exists():
            n += 1
        self.path = folder / f"events.out.tfevents.{stamp:010d}.{host}.{pid}.{n}"
        self._writer = RecordWriter(self.path.open("wb"))
        self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))
        self.flush()

    def scalar(self, tag: str, value: float, step: int) -> None:
        """``value`` of the series ``tag`` at ``step`` (TensorBoard's Scalars tab)."""
        self._summary(step, summary_pb2.Summary.Value(tag=tag, simple_value=float(value)))

    def histogram(self, tag: str, values: Sequence[float], step: int) -> None:
        """The distribution of ``values`` (at least one) at ``step`` (the Histograms and
        Distributions tabs), in :data:`HISTOGRAM_BUCKETS` equal-width buckets at most."""
        data = np.asarray(values, dtype=np.float64).ravel()
        if data.size == 0:
            raise ValueError(f"histogram '{tag}' needs at least one value")
        counts, edges = np.histogram(data, bins=min(HISTOGRAM_BUCKETS, data.size))
        proto = summary_pb2.HistogramProto(
            min=float(data.min()),
            max=float(data.max()),
            num=float(data.size),
            sum=float(data.sum()),
            sum_squares=float(np.dot(data, data)),
            bucket_limit=[float(edge) for edge in edges[1:]],
            bucket=[float(count) for count in counts],
        )
        self._summary(step, summary_pb2.Summary.Value(tag=tag, histo=proto))

    def flush(self) -> None:
        """Write what is buffered to the file."""
        self._writer.flush()

    def close(self) -> None:
        """Flush and close the file (idempotent)."""
        if not self._writer.closed:
            self._writer.close()

    def _summary(self, step: int, value: summary_pb2.Summary.Value) -> None:
        self._write(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=[value])))

    def _write(self, event: event_pb2.Event) -> None:
        self._writer.write(event.SerializeToString())
