"""What the round loop, the checkpoints and the run summary read from a strategy, as typed protocols.

Flower's :class:`~flwr.serverapp.strategy.Strategy` says how to configure and aggregate a round;
the server needs a little more, and reads it only through :class:`RoundReporting`:

* ``rejections()``: the train replies the last ``aggregate_train`` rejected, and why
  (``"node <id>: <reason>"``), for the round's history;
* ``stop_reason``: why the strategy ended training early (e.g. the privacy budget), or None;
* ``min_train_replies``: a lower bound of its own on the replies a round needs (DP-FedAvg: 0,
  its mechanism runs and is accounted on any sample), or None to leave the run config's;
* ``validates_replies``: True when ``aggregate_train`` screens its replies itself with
  :mod:`strategies.core.replies` (so that a guard need not screen them again);
* ``dp_mode``: the strategy's ``dp-mode`` when it is differentially private (its rounds are
  accounted), else None (:class:`Private`; a checkpoint records it, and refuses to resume across it);
* ``state_dict()`` / ``load_state_dict()``: the state a checkpoint saves and a resumed run restores.

:class:`strategies.aggregation.guard.GuardedStrategy` implements it around any strategy; our own
strategies implement it too, and the guard then delegates to them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Stateful(Protocol):
    """A strategy whose resumable state is ``state_dict()`` (JSON values and NumPy arrays, nested
    in dicts and lists), restored by ``load_state_dict(state)``."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


@runtime_checkable
class Private(Protocol):
    """A strategy that says whether it is differentially private: ``dp_mode`` (None: it is not)."""

    @property
    def dp_mode(self) -> str | None: ...


@runtime_checkable
class RoundReporting(Stateful, Private, Protocol):
    """A strategy that tells the server what it rejected, whether it stops, and its state."""

    @property
    def validates_replies(self) -> bool: ...

    @property
    def stop_reason(self) -> str | None: ...

    @property
    def min_train_replies(self) -> int | None: ...

    def rejections(self) -> list[str]: ...
