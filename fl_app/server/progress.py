"""The server's progress line: one plain log line per finished round.

``[round 3/10 30%] ETA 0:42 | central accuracy 0.9512 loss 0.1827 | federated accuracy 0.9470 |
train loss 0.0338 | 3 replied, 0 failed | 209.0 kB up | 0.78 s``

Rounds done and the total, the share done, the estimated time to the last round (the mean
wall-clock time of the rounds this process has run so far, times the rounds left; ``-`` before the
first trained round), and the headline metric (``accuracy``, or the model's first metric such as
``mae``) of the centralized and federated evaluation, the training loss, the replies and the bytes.
Failures follow as one warning line each. Plain :mod:`logging` through Flower's logger: one line per
round, no carriage returns or bars, so that it reads the same in a terminal, ``--stream`` and a log file.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from logging import INFO, WARNING

from flwr.common.logger import log

from fl_app.server.run_directory import RoundRecord, headline


def format_duration(seconds: float) -> str:
    """``0:42``, ``12:05``, ``1:02:03``: hours only when there are any."""
    total = max(0, round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


class RoundProgress:
    """Reports each finished round of a run of ``num_rounds`` that starts at ``first_round``
    (later when resumed), timing the ETA from its own creation (``clock``: seconds, monotonic)."""

    def __init__(self, num_rounds: int, first_round: int = 1, clock: Callable[[], float] = time.monotonic) -> None:
        self.num_rounds = num_rounds
        self.first_round = first_round
        self.clock = clock
        self.started = clock()

    def eta(self, record: RoundRecord) -> float | None:
        """Seconds to the last round, from the rounds this process has run; None before any."""
        done = record.round - self.first_round + 1
        if record.round < 1 or done < 1:
            return None
        return (self.clock() - self.started) / done * max(0, self.num_rounds - record.round)

    def line(self, record: RoundRecord) -> str:
        """The progress line of ``record`` (see the module docstring)."""
        name = headline([record]) or "loss"
        share = 100 * record.round / self.num_rounds if self.num_rounds else 100.0
        eta = self.eta(record)
        return (
            f"[round {record.round}/{self.num_rounds} {share:.0f}%] ETA {'-' if eta is None else format_duration(eta)}"
            f" | central {name} {_fmt(record.value('centralized', name))} loss {_fmt(record.centralized_loss)}"
            f" | federated {name} {_fmt(record.value('federated', name))} | train loss {_fmt(record.train_loss)}"
            f" | {record.clients_replied} replied, {record.clients_failed} failed"
            f" | {record.bytes_received / 1e3:.1f} kB up | {record.seconds:.2f} s"
        )

    def report(self, record: RoundRecord) -> None:
        """Log the progress line, then one warning per failure of the round."""
        log(INFO, "%s", self.line(record))
        for failure in record.failures:
            log(WARNING, "[round %d] failure: %s", record.round, failure)
