"""The processes that ``scripts/edge.py`` starts, recorded so that ``edge.py stop`` and
``edge.py status`` find them, and everything they started, by PID.

Started in the background (``edge.py superlink ... &``), the PID a shell records is that of a
wrapper (``uv run``): killing it leaves the real SuperLink, a SuperNode, its Keras worker, and the
SuperExec and ServerApp that Flower starts in sessions of their own, running. So each long-running
``edge.py`` command records itself in ``<state dir>/processes/<name>.json``: its own PID (the
SuperLink's, after ``exec``), that process's start time (so that a recycled PID is never
signalled) and what it serves. :func:`stop` collects each recorded process's whole tree from
``/proc`` before it signals anything (orphans would be re-parented away from it), sends SIGTERM,
and SIGKILL to whatever is left after a bounded wait.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from fl_app.deploy.process_tools import PROC, process_tree

STATE_FOLDER = "processes"
STOP_TIMEOUT_S = 20.0


def start_ticks(pid: int) -> int | None:
    """When ``pid`` started (clock ticks after boot, ``/proc/<pid>/stat`` field 22); ``None`` when
    there is no such process or it is a zombie (it has exited, its parent has not reaped it)."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()  # the command name may hold spaces and ')'
    return None if fields[0] == "Z" else int(fields[19])


@dataclass(frozen=True)
class Service:
    """One recorded process: ``name`` (e.g. ``superlink-9092``), its PID and start time, its
    command, and what ``status`` shows about it (address, connection, worker socket)."""

    name: str
    pid: int
    started: int
    command: list[str]
    details: dict[str, str] = field(default_factory=dict)

    def running(self) -> bool:
        """Whether the recorded process is still the one alive under its PID."""
        return start_ticks(self.pid) == self.started


def _folder(state_dir: str | Path) -> Path:
    return Path(state_dir) / STATE_FOLDER


def record(state_dir: str | Path, name: str, command: Iterable[str], details: Mapping[str, str] | None = None) -> Path:
    """Record the calling process as service ``name`` (call it right before ``exec``, or at the
    start of a command that runs its children in the foreground)."""
    pid = os.getpid()
    started = start_ticks(pid)
    if started is None:
        raise RuntimeError(f"cannot read /proc/{pid}/stat: process records need Linux's /proc")
    folder = _folder(state_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    text = json.dumps(
        {"name": name, "pid": pid, "started": started, "command": list(command), "details": dict(details or {})},
        indent=2,
    )
    fd, temporary = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(temporary, path)
    return path


def forget(state_dir: str | Path, name: str) -> None:
    """Remove service ``name``'s record (it has stopped)."""
    (_folder(state_dir) / f"{name}.json").unlink(missing_ok=True)


def recorded(state_dir: str | Path) -> list[Service]:
    """Every service recorded in ``state_dir``, by name."""
    services = []
    for path in sorted(_folder(state_dir).glob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        services.append(
            Service(
                name=str(data["name"]),
                pid=int(data["pid"]),
                started=int(data["started"]),
                command=[str(part) for part in data["command"]],
                details={str(k): str(v) for k, v in data.get("details", {}).items()},
            )
        )
    return services


def command_line(pid: int) -> str:
    """``pid``'s command line, or ``""`` once it is gone."""
    try:
        return (PROC / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def tree(service: Service) -> list[int]:
    """The service's process and all its live descendants (empty when it is not running)."""
    if not service.running():
        return []
    return [pid for pid in process_tree(service.pid) if start_ticks(pid) is not None]


def signal_pids(pids: Iterable[int], sig: int) -> None:
    """Send ``sig`` to each of ``pids`` (those already gone are skipped)."""
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def stop_tree(pids: list[int], timeout: float = STOP_TIMEOUT_S) -> list[int]:
    """SIGTERM every process in ``pids`` (a tree collected beforehand), wait up to ``timeout``
    seconds for them to exit, then SIGKILL the rest and whatever they started meanwhile. Returns
    the PIDs that needed SIGKILL."""
    tickets = {pid: start_ticks(pid) for pid in pids}
    tickets = {pid: ticks for pid, ticks in tickets.items() if ticks is not None}

    def alive() -> list[int]:
        return [pid for pid, ticks in tickets.items() if start_ticks(pid) == ticks]

    signal_pids(tickets, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    left = alive()
    for pid in list(left):  # children started while shutting down
        for child in process_tree(pid)[1:]:
            ticks = start_ticks(child)
            if ticks is not None and child not in tickets:
                tickets[child] = ticks
                left.append(child)
    signal_pids(left, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


@dataclass(frozen=True)
class Stopped:
    """What :func:`stop` did to one service: the processes of its tree, and those it had to kill."""

    service: Service
    pids: list[int]
    killed: list[int]


def stop(state_dir: str | Path, names: Iterable[str] = (), timeout: float = STOP_TIMEOUT_S) -> list[Stopped]:
    """Stop the recorded services ``names`` (all when empty), SuperNodes before SuperLinks, each
    with its whole process tree; their records are removed. Raises ``KeyError`` for a name that
    is not recorded."""
    services = {service.name: service for service in recorded(state_dir)}
    wanted = list(names) or list(services)
    unknown = [name for name in wanted if name not in services]
    if unknown:
        raise KeyError(f"no such service recorded in {_folder(state_dir)}: {', '.join(unknown)}")
    order = sorted(wanted, key=lambda name: name.startswith("superlink"))
    results = []
    for name in order:
        service = services[name]
        pids = tree(service)
        killed = stop_tree(pids, timeout) if pids else []
        forget(state_dir, name)
        results.append(Stopped(service, pids, killed))
    return results
