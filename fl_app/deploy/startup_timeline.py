"""``fl-keras-run --profile``: where the time of a run goes, from the command to the summary.

The launcher sees the run as one stream of lines (``flwr run --stream``, which carries the
SuperLink's, the simulation process's, the ServerApp's and every Ray actor's output). A
:class:`StartupTimeline` stamps each line on arrival (``time.perf_counter`` from the launcher's
start) and keeps the first time each :data:`MILESTONES` pattern appears, plus the launcher's own
events (:meth:`StartupTimeline.mark`); :meth:`StartupTimeline.table` prints the milestones in
order with the time each phase took since the previous one. Actors' TensorFlow start-up shows as
the first and last TensorFlow start-up line of a Ray actor (TensorFlow's absl lines, which the
noise filter hides from the display but which still reach the timeline).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

from fl_app.deploy.output_filter import ANSI

MILESTONES: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (name, re.compile(pattern))
    for name, pattern in (
        ("flwr CLI connected to the SuperLink", r"Using SuperLink: "),
        ("run submitted (FAB built and sent)", r"Successfully started run "),
        ("simulation process started", r"Starting Flower Simulation"),
        ("ServerApp ready (run directory made)", r"Run directory: "),
        ("round 0 done (initial evaluation)", r"\[round 0/\d+"),
        ("first Ray actor started", r"^\((ClientAppActor )?pid=\d+\) "),
        ("first actor imported TensorFlow", r"^\((ClientAppActor )?pid=\d+\) .*(port|cudart_stub)\.cc:\d+\]"),
        ("round 1 done (first fits, tracing; with Ray, the actors' imports)", r"\[round 1/\d+"),
        ("summary printed", r"=== Summary "),
    )
)
"""Line patterns that mark the phases of a simulation run, in the order they normally come."""


@dataclass
class StartupTimeline:
    """First arrival time of each milestone, and the launcher's own marks (seconds from start)."""

    started: float = field(default_factory=time.perf_counter)
    events: dict[str, float] = field(default_factory=dict)
    last_round: tuple[int, float] | None = None

    def mark(self, name: str) -> None:
        """Record the launcher's own event ``name`` now (the first time only)."""
        self.events.setdefault(name, time.perf_counter() - self.started)

    def observe(self, line: str) -> None:
        """Stamp ``line`` of the run's stream: the first match of each milestone, and the latest
        progress line's round."""
        plain = ANSI.sub("", line).rstrip("\n")
        now = time.perf_counter() - self.started
        for name, pattern in MILESTONES:
            if name not in self.events and pattern.search(plain):
                self.events[name] = now
        progress = re.search(r"\[round (\d+)/(\d+)", plain)
        if progress:
            self.last_round = (int(progress.group(1)), now)

    def table(self) -> str:
        """The milestones in time order: time from the start, and the phase since the previous one."""
        events = dict(self.events)
        if self.last_round is not None and self.last_round[0] > 1:
            events.setdefault(f"round {self.last_round[0]} done (last round)", self.last_round[1])
        rows = sorted(events.items(), key=lambda item: item[1])
        lines = ["", "Start-up timeline (--profile): seconds from the command", f"{'at s':>8} {'phase s':>8}  event"]
        previous = 0.0
        for name, at in rows:
            lines.append(f"{at:8.1f} {at - previous:8.1f}  {name}")
            previous = at
        return "\n".join(lines)
