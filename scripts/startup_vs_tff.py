"""The app's whole default run against TensorFlow Federated's, side by side (issue 17's acceptance).

Both run the issue's task (digits, 10 IID clients, 5 rounds x 1 local epoch, Adam 0.005, batch 32,
centralized evaluation each round): the app as

    fl-keras-run --profile --output-dir <work>/app-<i> --clients 10 -- -c "partitioner='iid'
        local-epochs=1 learning-rate=0.005 batch-size=32 num-server-rounds=5 fraction-evaluate=0.01
        min-evaluate-clients=0"

(this venv's entry point; ``--output-dir`` only keeps its run directories out of ``outputs/``),
and TFF as ``scripts/tff_peer.py`` in TFF's own virtualenv (its docstring says what matches and what
differs). The two alternate, app first in even repeats and TFF first in odd ones; each is timed from
the command's start to its exit. Memory is the peak over time of the RSS (and PSS: shared pages
counted once) summed over every process this script started and their descendants, sampled every
0.2 s from ``/proc``; this script is the child subreaper of them all, so a process that outlives its
parent is still counted, and after each run any process left is reported and stopped by PID.

    python3 -m uv venv --python 3.11 /work/tff-venv
    echo "jaxlib==0.4.13" > /tmp/tff-overrides.txt
    python3 -m uv pip install --python /work/tff-venv/bin/python --override /tmp/tff-overrides.txt \\
        tensorflow-federated==0.87.0 scikit-learn numpy
    uv run python scripts/startup_vs_tff.py --tff-python /work/tff-venv/bin/python --repeats 2

Prints one line per run, then a table (whole-run seconds of each repeat and their mean, steady
round, peak memory, final centralized accuracy, the ratio app/TFF), the acceptance line
``within 1.5x: yes/no`` (the mean whole runs), and the app's ``--profile`` timeline of each repeat.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fl_app.deploy.launcher import become_subreaper, descendants  # noqa: E402
from fl_app.deploy.process_tools import memory_of  # noqa: E402
from fl_app.deploy.services import stop_tree  # noqa: E402
from fl_app.server.run_directory import latest_run  # noqa: E402

CLIENTS = 10
ROUNDS = 5
APP_CONFIG = (
    "partitioner='iid' local-epochs=1 learning-rate=0.005 batch-size=32 "
    f"num-server-rounds={ROUNDS} fraction-evaluate=0.01 min-evaluate-clients=0"
)
ACCEPTANCE = 1.5
"""The app's whole run may take at most this many times TFF's."""
PEER = ROOT / "scripts" / "tff_peer.py"
INSTALL = """TFF's side needs its own virtualenv (keep TFF out of this project's dependencies):

    python3 -m uv venv --python 3.11 /work/tff-venv
    echo "jaxlib==0.4.13" > /tmp/tff-overrides.txt
    python3 -m uv pip install --python /work/tff-venv/bin/python --override /tmp/tff-overrides.txt \\
        tensorflow-federated==0.87.0 scikit-learn numpy

then pass --tff-python /work/tff-venv/bin/python"""
GIB = 1024**3


# --------------------------------------------------------------------------- pure parts


def peer_result(stdout: str) -> dict | None:
    """The TFF peer's JSON line: the last line of ``stdout`` that parses as a JSON object."""
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                return value
    return None


def timeline_of(log: str) -> str:
    """The app's ``--profile`` timeline, from its output (empty if it printed none)."""
    start = log.find("Start-up timeline (--profile)")
    return "" if start < 0 else log[start:].rstrip()


def steady_round(round_s: list[float]) -> float | None:
    """Median of rounds 2..R (round 1 pays tracing and the first fits)."""
    return round(statistics.median(round_s[1:]), 3) if len(round_s) > 1 else None


def ratio(app: float | None, tff: float | None) -> float | None:
    """``app / tff``, or None when either is missing (or TFF's is 0)."""
    if app is None or tff is None or tff == 0:
        return None
    return app / tff


def within(value: float | None, bound: float = ACCEPTANCE) -> str:
    """The acceptance line for the whole-run ratio."""
    verdict = "no (not measured)" if value is None else ("yes" if value <= bound else "no")
    return f"within {bound:g}x: {verdict}"


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _ratio_cell(app: float | None, tff: float | None) -> str:
    value = ratio(app, tff)
    return "-" if value is None else f"{value:.2f}x"


def summarize(runs: list[dict]) -> dict:
    """Per side (``app``, ``tff``): whole-run seconds of each completed run, their mean, the median
    steady round, the largest peak memory, the final accuracies; and the whole-run ratio."""
    sides: dict[str, Any] = {}
    for side in ("app", "tff"):
        mine = [r for r in runs if r["side"] == side]
        done = [r for r in mine if r["exit_code"] == 0]
        steadies = [r["steady_round_s"] for r in done if r.get("steady_round_s") is not None]
        accuracies = [r["accuracy"] for r in done if r.get("accuracy") is not None]
        sides[side] = {
            "wall_s": [r["wall_s"] for r in done],
            "mean_wall_s": _mean([r["wall_s"] for r in done]),
            "steady_round_s": statistics.median(steadies) if steadies else None,
            "peak_rss_gib": max((r["peak_rss_gib"] for r in mine), default=None),
            "peak_pss_gib": max((r["peak_pss_gib"] for r in mine), default=None),
            "accuracy": accuracies,
            "failed": len(mine) - len(done),
        }
    sides["ratio"] = ratio(sides["app"]["mean_wall_s"], sides["tff"]["mean_wall_s"])
    return sides


def table(summary: dict) -> str:
    """The side-by-side table and the acceptance line."""
    app, tff = summary["app"], summary["tff"]

    def each(values: list[float]) -> str:
        return ", ".join(f"{v:.1f}" for v in values) or "-"

    rows = [
        ("whole run s (each repeat)", each(app["wall_s"]), each(tff["wall_s"]), ""),
        (
            "whole run s (mean)",
            _fmt(app["mean_wall_s"], 1),
            _fmt(tff["mean_wall_s"], 1),
            _ratio_cell(app["mean_wall_s"], tff["mean_wall_s"]),
        ),
        (
            "steady round s (median, rounds 2-5)",
            _fmt(app["steady_round_s"], 3),
            _fmt(tff["steady_round_s"], 3),
            _ratio_cell(app["steady_round_s"], tff["steady_round_s"]),
        ),
        (
            "peak memory GiB (sum of RSS)",
            _fmt(app["peak_rss_gib"]),
            _fmt(tff["peak_rss_gib"]),
            _ratio_cell(app["peak_rss_gib"], tff["peak_rss_gib"]),
        ),
        (
            "peak memory GiB (sum of PSS)",
            _fmt(app["peak_pss_gib"]),
            _fmt(tff["peak_pss_gib"]),
            _ratio_cell(app["peak_pss_gib"], tff["peak_pss_gib"]),
        ),
        (
            "final centralized accuracy",
            ", ".join(f"{a:.4f}" for a in app["accuracy"]) or "-",
            ", ".join(f"{a:.4f}" for a in tff["accuracy"]) or "-",
            "",
        ),
    ]
    if app["failed"] or tff["failed"]:
        rows.append(("failed runs (not in the means)", str(app["failed"]), str(tff["failed"]), ""))
    widths = [max(len(row[i]) for row in [("", "app", "TFF", "app/TFF"), *rows]) for i in range(4)]
    lines = [
        "  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row)).rstrip()
        for row in [("", "app", "TFF", "app/TFF"), *rows]
    ]
    lines.append(within(summary["ratio"]) + (f" (app/TFF {summary['ratio']:.2f})" if summary["ratio"] else ""))
    return "\n".join(lines)


def order(repeat: int) -> tuple[str, str]:
    """Which side runs first in ``repeat``: they alternate, so that drift in the machine's load
    falls on both."""
    return ("app", "tff") if repeat % 2 == 0 else ("tff", "app")


# --------------------------------------------------------------------------- running


def _state(pid: int) -> str:
    try:
        stat = (Path("/proc") / str(pid) / "stat").read_text()
    except OSError:
        return ""
    return stat[stat.rfind(")") + 2 :].split()[0]


def _reap() -> None:
    """Collect exited children (orphans re-parented to this subreaper become zombies here)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def live_descendants() -> list[int]:
    """Every process under this one that is alive (zombies are not)."""
    return [pid for pid in descendants(os.getpid()) if _state(pid) not in ("", "Z", "X")]


class TreeSampler(threading.Thread):
    """Peak sums of RSS and PSS over every descendant of this process, every ``interval`` s."""

    def __init__(self, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.peak_rss = self.peak_pss = self.peak_processes = self.samples = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            rss = pss = count = 0
            for pid in descendants(os.getpid()):
                r, p = memory_of(pid)
                if r or p:
                    rss, pss, count = rss + r, pss + p, count + 1
            self.samples += 1
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            self.peak_processes = max(self.peak_processes, count)
            self._stop_event.wait(self.interval)

    def stop(self) -> dict:
        self._stop_event.set()
        self.join(timeout=10)
        return {
            "peak_rss_gib": round(self.peak_rss / GIB, 3),
            "peak_pss_gib": round(self.peak_pss / GIB, 3),
            "peak_processes": self.peak_processes,
            "samples": self.samples,
        }


def measure(command: list[str], log_dir: Path, name: str, timeout: float) -> dict:
    """Run ``command`` from this repository, timed from its start to its exit, with the tree's peak
    memory; stdout and stderr go to ``log_dir/name.{out,err}``. Whatever it leaves behind is
    reported (``leftovers``) and stopped by PID."""
    out, err = log_dir / f"{name}.out", log_dir / f"{name}.err"
    sampler = TreeSampler()
    timed_out = False
    with out.open("w") as stdout, err.open("w") as stderr:
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=ROOT, stdout=stdout, stderr=stderr, env=dict(os.environ))
        sampler.start()
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            process.terminate()  # fl-keras-run stops its SuperLink's tree on SIGTERM
            try:
                code = process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                code = process.wait()
        except BaseException:
            process.terminate()
            process.wait(timeout=60)
            stop_tree(live_descendants())
            raise
        wall = time.perf_counter() - started
    memory = sampler.stop()
    _reap()
    leftovers = live_descendants()
    deadline = time.monotonic() + 5.0
    while leftovers and time.monotonic() < deadline:  # a process may be on its way out
        time.sleep(0.2)
        _reap()
        leftovers = live_descendants()
    if leftovers:
        stop_tree(leftovers)
        _reap()
    return {
        "exit_code": code,
        "timed_out": timed_out,
        "wall_s": round(wall, 2),
        **memory,
        "leftovers": leftovers,
        "stdout": out.read_text(errors="replace"),
        "log": str(out),
    }


def run_app(work: Path, repeat: int, timeout: float) -> dict:
    output_dir = work / f"app-{repeat}"
    entry = Path(sys.executable).with_name("fl-keras-run")
    launcher = [str(entry)] if entry.exists() else [sys.executable, "-m", "fl_app.deploy.launcher"]
    command = [
        *launcher,
        "--profile",
        "--output-dir",
        str(output_dir),
        "--clients",
        str(CLIENTS),
        "--",
        "-c",
        APP_CONFIG,
    ]
    result = {"side": "app", "repeat": repeat, **measure(command, work, f"app-{repeat}", timeout)}
    result["timeline"] = timeline_of(result.pop("stdout"))
    run_dir = latest_run(output_dir)
    if run_dir is not None and (run_dir / "summary.json").exists():
        summary = json.loads((run_dir / "summary.json").read_text())
        history = json.loads((run_dir / "history.json").read_text())
        result["accuracy"] = summary.get("final centralized accuracy")
        result["loss"] = summary.get("final centralized loss")
        result["round_s"] = [round(r["seconds"], 3) for r in history if r["round"] > 0]
        result["steady_round_s"] = steady_round(result["round_s"])
        result["run_dir"] = str(run_dir)
    return result


def run_tff(work: Path, repeat: int, timeout: float, tff_python: str) -> dict:
    command = [tff_python, str(PEER), "--clients", str(CLIENTS), "--rounds", str(ROUNDS)]
    result = {"side": "tff", "repeat": repeat, **measure(command, work, f"tff-{repeat}", timeout)}
    peer = peer_result(result.pop("stdout"))
    if peer is not None:
        result["accuracy"] = peer["final_accuracy"]
        result["loss"] = peer["final_loss"]
        result["round_s"] = peer["round_s"]
        result["steady_round_s"] = steady_round(peer["round_s"])
        result["peer"] = {k: v for k, v in peer.items() if k not in ("history",)}
    elif result["exit_code"] == 0:
        result["exit_code"] = -1  # exited 0 without its result line
    return result


def _line(result: dict) -> str:
    extra = f", leftovers stopped: {result['leftovers']}" if result["leftovers"] else ""
    accuracy = result.get("accuracy")
    return (
        f"[{result['side']} {result['repeat'] + 1}] exit {result['exit_code']}"
        f"{' (timed out)' if result['timed_out'] else ''}, {result['wall_s']:.1f} s, "
        f"peak RSS {result['peak_rss_gib']:.2f} GiB (PSS {result['peak_pss_gib']:.2f}, "
        f"{result['peak_processes']} processes), accuracy {_fmt(accuracy, 4)}, "
        f"load {result['load_before']:.2f}{extra}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="whole runs of each side (default 2)")
    parser.add_argument(
        "--tff-python", default=None, help="the Python of TFF's virtualenv (e.g. /work/tff-venv/bin/python)"
    )
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds one whole run may take (default 1200)")
    parser.add_argument(
        "--work", type=Path, default=None, help="where logs and run directories go (default: a temp dir)"
    )
    parser.add_argument("--out", type=Path, default=None, help="write every figure here as JSON")
    args = parser.parse_args(argv)

    if not args.tff_python or not os.access(args.tff_python, os.X_OK):
        given = f" ({args.tff_python!r} is not an executable)" if args.tff_python else ""
        print(f"startup_vs_tff: no --tff-python{given}.\n{INSTALL}", file=sys.stderr)
        return 2
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")

    become_subreaper()
    work = args.work or Path(tempfile.mkdtemp(prefix="startup-vs-tff-"))
    work.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()
    print(f"load average at start: {' '.join(f'{v:.2f}' for v in load_start)}; logs in {work}", flush=True)
    runs = []
    for repeat in range(args.repeats):
        for side in order(repeat):
            load = os.getloadavg()[0]
            if side == "app":
                result = run_app(work, repeat, args.timeout)
            else:
                result = run_tff(work, repeat, args.timeout, args.tff_python)
            result["load_before"] = load
            runs.append(result)
            print(_line(result), flush=True)
    load_end = os.getloadavg()
    summary = summarize(runs)
    print()
    print(table(summary))
    print(f"load average at start {load_start[0]:.2f}, at end {' '.join(f'{v:.2f}' for v in load_end)}")
    for result in runs:
        if result["side"] == "app" and result.get("timeline"):
            print(f"\napp repeat {result['repeat'] + 1}: {result['timeline']}")
    if args.out:
        args.out.write_text(
            json.dumps({"runs": runs, "summary": summary, "load": [load_start, load_end]}, indent=2) + "\n"
        )
    return 0 if all(r["exit_code"] == 0 and not r["leftovers"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
