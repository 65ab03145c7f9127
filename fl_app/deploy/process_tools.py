"""Memory of a whole process tree (a run's SuperLink and everything under it), from ``/proc``.

A simulation is many processes: the SuperLink, SuperExec, the simulation process (ServerApp and the
engine), Ray's GCS server and raylet, and one Ray actor per concurrent virtual client, each with
TensorFlow loaded. :class:`TreeMemorySampler` samples, in a background thread, the resident set
(RSS) and the proportional set (PSS: each shared page divided by the number of processes that map
it, so shared libraries are counted once overall) of every process in the tree rooted at one PID,
and keeps the peak of the sums. Sum of RSS overstates what the machine needs (TensorFlow's shared
libraries are counted once per actor); sum of PSS is the honest total. Linux only (no psutil).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

PROC = Path("/proc")


def children_map() -> dict[int, list[int]]:
    """parent PID -> child PIDs, for every process visible in /proc."""
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # the command name (field 2) may hold spaces and parentheses: split after the last ')'
        fields = stat[stat.rfind(")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    return children


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants that are alive now."""
    children = children_map()
    tree, stack = [], [root]
    while stack:
        pid = stack.pop()
        tree.append(pid)
        stack.extend(children.get(pid, []))
    return tree


def memory_of(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in bytes; (0, 0) if it is gone or unreadable."""
    try:
        text = (PROC / str(pid) / "smaps_rollup").read_text()
    except OSError:
        return 0, 0
    values = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in ("Rss:", "Pss:"):
            values[parts[0]] = int(parts[1]) * 1024
    return values.get("Rss:", 0), values.get("Pss:", 0)


def tree_memory(root: int) -> dict[str, int]:
    """Sums of RSS and PSS over the tree rooted at ``root``, and its process count."""
    rss = pss = count = 0
    for pid in process_tree(root):
        r, p = memory_of(pid)
        if r or p:
            rss, pss, count = rss + r, pss + p, count + 1
    return {"rss": rss, "pss": pss, "processes": count}


class TreeMemorySampler:
    """Samples :func:`tree_memory` of ``root`` every ``interval`` seconds; keeps the peaks.

    Use as a context manager, or ``start()`` / ``stop()``. ``root`` may be set after construction
    (e.g. once a launcher has printed its SuperLink's PID).
    """

    def __init__(self, root: int | None = None, interval: float = 0.5, extra_roots=None) -> None:
        self.root = root
        self.extra_roots = extra_roots  # callable -> PIDs of other trees to add (e.g. a Ray cluster)
        self.interval = interval
        self.peak_rss = self.peak_pss = self.peak_processes = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        if self.root is None or not os.path.exists(PROC / str(self.root)):
            return
        memory = tree_memory(self.root)
        if self.extra_roots is not None:
            seen = set(process_tree(self.root))
            for root in self.extra_roots():
                for pid in process_tree(root):
                    if pid not in seen:
                        seen.add(pid)
                        r, p = memory_of(pid)
                        memory["rss"] += r
                        memory["pss"] += p
                        memory["processes"] += bool(r or p)
        self.samples += 1
        self.peak_rss = max(self.peak_rss, memory["rss"])
        self.peak_pss = max(self.peak_pss, memory["pss"])
        self.peak_processes = max(self.peak_processes, memory["processes"])

    def start(self) -> TreeMemorySampler:
        self._thread.start()
        return self

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join(timeout=10)
        return self.result()

    def result(self) -> dict[str, float]:
        gib = 1024**3
        return {
            "peak_rss_gib": round(self.peak_rss / gib, 3),
            "peak_pss_gib": round(self.peak_pss / gib, 3),
            "peak_processes": self.peak_processes,
            "samples": self.samples,
        }

    def __enter__(self) -> TreeMemorySampler:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def pids_with_argument(fragment: str) -> list[int]:
    """PIDs whose command line contains ``fragment`` (e.g. a private Ray temp dir)."""
    found = []
    for entry in PROC.iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if fragment.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found
