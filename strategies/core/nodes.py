"""Waiting for connected nodes: the one loop every server path uses before it samples a round."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from logging import INFO
from typing import Protocol

from flwr.common.logger import log


class NodeSource(Protocol):
    """What :func:`wait_for_nodes` needs of a Flower ``Grid``."""

    def get_node_ids(self) -> Iterable[int]: ...


class NodesUnavailable(RuntimeError):
    """Fewer nodes connected than a server phase needs, within the time it may wait."""


def wait_for_nodes(
    grid: NodeSource,
    needed: int,
    timeout: float | None,
    *,
    poll: float = 1.0,
    keys: str = "min-available-clients",
    advice: str = "",
) -> list[int]:
    """The sorted ids of the connected nodes, once at least ``needed`` are connected.

    Polls ``grid.get_node_ids()`` every ``poll`` seconds. ``timeout`` None waits without a limit
    (a grid may still give up itself, as :class:`fl_app.server.round_loop.PatientGrid` does at the
    round timeout); after ``timeout`` seconds it raises :class:`NodesUnavailable` naming the
    run-config ``keys`` that set ``needed`` and, when given, ``advice`` on what to change.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    last_logged = -math.inf
    while len(nodes := sorted(grid.get_node_ids())) < needed:
        if deadline is not None and time.monotonic() > deadline:
            raise NodesUnavailable(
                f"needs {needed} connected nodes ({keys}), but only {len(nodes)} connected within "
                f"{timeout:g} s" + (f": {advice}" if advice else "")
            )
        if time.monotonic() - last_logged >= 10.0:
            log(INFO, "Waiting for nodes: %d connected, %d required (%s)", len(nodes), needed, keys)
            last_logged = time.monotonic()
        time.sleep(poll)
    return nodes
