"""``flower-supernode`` with short, growing polls instead of Flower's fixed 3 s and 0.5 s sleeps.

Flower 1.41's SuperNode (``flwr/supernode/start_client_internal.py``) loops: pull a message from
the SuperLink; when there is none, ``time.sleep(3)``; when there is one, wait for the ClientApp's
reply with ``time.sleep(0.5)`` between looks at its own state, then push it. So every message
that reaches an idle node waits 1.5 s on average (3 s at worst) before it is even pulled, and
every reply 0.25 s on average before it is pushed: a train and an evaluate message per round cost
about 3.5 s per round on these sleeps alone, whatever the ClientApp does.

This module runs the unchanged ``flower-supernode`` entry point after giving that module a
``time`` whose ``sleep`` is :class:`NodeSleeps`: the idle wait (Flower's 3 s) starts at
``IDLE_INITIAL_S`` after activity and grows by ``IDLE_GROWTH`` per empty pull up to Flower's own 3 s,
so a node that has just answered pulls the next message of the round within tens of
milliseconds, and a node idle for a while pulls every 3 s as before (the SuperLink sees about a
dozen more pulls per message, not a steady load); the reply wait (Flower's 0.5 s) becomes
``REPLY_WAIT_S``, and it marks activity. Everything else of ``time`` is the real module.

The SuperExec the node starts is set with Flower's own setting for its task poll
(``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``, default 1 s) in :func:`fl_app.deploy.operator.deployment_env`.

``FL_KERAS_NODE_HEARTBEAT_S`` (optional) sets the heartbeat interval the node announces and keeps:
the SuperLink declares a node offline after ``HEARTBEAT_PATIENCE`` (2) intervals without one, so
Flower's 30 s means a node that dies or loses its link is noticed after 60 s; 10 s (the least
Flower's SuperLink accepts) after 20 s, for 3 small heartbeat requests a minute instead of 1.
"""

from __future__ import annotations

import os
import sys
import time
from types import ModuleType

from fl_app.server.object_pulls import shorten_object_pulls

IDLE_INITIAL_S = 0.02
IDLE_GROWTH = 1.5
IDLE_MAXIMUM_S = 3.0  # Flower's own idle sleep
REPLY_WAIT_S = 0.02
FLOWER_IDLE_S = 3
FLOWER_REPLY_WAIT_S = 0.5


class NodeSleeps:
    """Stands in for Flower's fixed sleeps of the SuperNode loop (see the module docstring).

    ``sleep(3)`` (no message pulled) sleeps ``initial, initial g, initial g^2, …`` capped at
    ``maximum`` seconds, the sequence starting again after any ``sleep(0.5)`` (a reply awaited:
    the node just received a message); ``sleep(0.5)`` sleeps ``reply_wait``; any other duration
    is slept as asked.
    """

    def __init__(
        self,
        initial: float = IDLE_INITIAL_S,
        growth: float = IDLE_GROWTH,
        maximum: float = IDLE_MAXIMUM_S,
        reply_wait: float = REPLY_WAIT_S,
        sleep=time.sleep,
    ) -> None:
        if not 0 < initial <= maximum or growth < 1 or reply_wait <= 0:
            raise ValueError(
                f"need 0 < initial <= maximum, growth >= 1 and reply_wait > 0, got initial={initial}, "
                f"growth={growth}, maximum={maximum}, reply_wait={reply_wait}"
            )
        self.initial, self.growth, self.maximum, self.reply_wait = initial, growth, maximum, reply_wait
        self._sleep = sleep
        self._next_idle = initial

    def duration(self, seconds: float) -> float:
        """The time this stand-in sleeps where Flower asked for ``seconds`` (and its state moves on)."""
        if seconds == FLOWER_IDLE_S:
            delay = self._next_idle
            self._next_idle = min(self.maximum, self._next_idle * self.growth)
            return delay
        if seconds == FLOWER_REPLY_WAIT_S:
            self._next_idle = self.initial
            return self.reply_wait
        return seconds

    def sleep(self, seconds: float) -> None:
        self._sleep(self.duration(seconds))


class _TimeWithNodeSleeps(ModuleType):
    """The ``time`` module with ``sleep`` replaced by a :class:`NodeSleeps`."""

    def __init__(self, sleeps: NodeSleeps) -> None:
        super().__init__("time")
        self._sleeps = sleeps

    def __getattr__(self, name: str):
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        self._sleeps.sleep(seconds)


def install(module: ModuleType, sleeps: NodeSleeps | None = None) -> NodeSleeps:
    """Give ``module`` (Flower's ``start_client_internal``) a ``time`` that sleeps with ``sleeps``.

    Raises ``RuntimeError`` when the module has no ``time`` of its own, i.e. Flower's loop changed
    and this shortcut no longer applies (the pinned ``flwr`` is 1.41.0).
    """
    if getattr(module, "time", None) is not time:
        raise RuntimeError(f"{module.__name__} does not use the time module any more; update {__name__}")
    sleeps = sleeps or NodeSleeps()
    module.time = _TimeWithNodeSleeps(sleeps)  # type: ignore[attr-defined]
    return sleeps


HEARTBEAT_ENV = "FL_KERAS_NODE_HEARTBEAT_S"
FLOWER_HEARTBEAT_S = 30


def set_node_heartbeat(seconds: float) -> None:
    """Make this SuperNode announce, and send, heartbeats every ``seconds`` (module docstring).

    Raises ``ValueError`` outside the interval Flower's SuperLink accepts, and ``RuntimeError``
    when Flower no longer reads the interval from the constants this sets (``flwr`` 1.41.0)."""
    from flwr.common.constant import HEARTBEAT_MAX_INTERVAL, HEARTBEAT_MIN_INTERVAL
    from flwr.supercore import heartbeat
    from flwr.supernode import fleet_http_connection

    if not HEARTBEAT_MIN_INTERVAL <= seconds <= HEARTBEAT_MAX_INTERVAL:
        raise ValueError(
            f"{HEARTBEAT_ENV}={seconds:g} is outside the heartbeat intervals Flower's SuperLink accepts, "
            f"[{HEARTBEAT_MIN_INTERVAL}, {HEARTBEAT_MAX_INTERVAL}] s"
        )
    for module in (fleet_http_connection, heartbeat):
        if getattr(module, "HEARTBEAT_DEFAULT_INTERVAL", None) not in (FLOWER_HEARTBEAT_S, seconds):
            raise RuntimeError(f"{module.__name__} no longer reads HEARTBEAT_DEFAULT_INTERVAL; update {__name__}")
        module.HEARTBEAT_DEFAULT_INTERVAL = seconds  # type: ignore[attr-defined]


def main() -> None:
    import flwr.supernode.start_client_internal as loop
    from flwr.supernode.cli import flower_supernode

    if os.environ.get(HEARTBEAT_ENV):
        set_node_heartbeat(float(os.environ[HEARTBEAT_ENV]))
    install(loop)
    shorten_object_pulls()
    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()
