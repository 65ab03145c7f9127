"""Whole run and steady round of ``fl-keras-run`` in two or more checkouts, alternated, side by side.

Each side is a checkout with its own ``.venv`` (e.g. ``git worktree add /work/old <commit>`` and
``python3 -m uv sync --locked`` there), optionally with extra ``fl-keras-run`` options. The sides
run one after another, in a rotating order per repeat, on the issue's default task (digits, 10 IID
clients, 5 rounds x 1 local epoch, Adam 0.005, batch 32, centralized evaluation each round).
Printed per run: the wall time from the command to its exit, the steady round (median of rounds
2..R of the history's ``seconds``), round 1 and the final centralized accuracy; then each side's
means and its ratios to the first side.

    uv run python scripts/compare_checkouts.py --repeats 2 \\
        --side "old=/work/old" --side "new=." --side "new-ray=.:--backend ray"
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

TASK = (
    "partitioner='iid' local-epochs=1 learning-rate=0.005 batch-size=32 num-server-rounds=5 "
    "fraction-evaluate=0.01 min-evaluate-clients=0"
)


def parse_side(text: str) -> tuple[str, Path, list[str]]:
    """``NAME=PATH[:OPTIONS]`` -> (name, checkout, extra fl-keras-run options)."""
    name, _, rest = text.partition("=")
    path, _, options = rest.partition(":")
    if not name or not path:
        raise argparse.ArgumentTypeError(f"--side {text!r}: expected NAME=PATH[:OPTIONS]")
    root = Path(path).resolve()
    if not (root / ".venv" / "bin" / "fl-keras-run").exists():
        raise argparse.ArgumentTypeError(f"--side {text!r}: {root}/.venv/bin/fl-keras-run does not exist")
    return name, root, shlex.split(options)


def run_once(root: Path, options: list[str], out: Path, clients: int, task: str) -> dict:
    command = [str(root / ".venv/bin/fl-keras-run"), "--app", str(root), "--output-dir", str(out)]
    command += ["--clients", str(clients), *options, "--", "-c", task]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{command} exited {done.returncode}:\n{(done.stdout + done.stderr)[-3000:]}")
    run_dir = sorted(d for d in out.iterdir() if d.is_dir() and not d.is_symlink())[-1]
    history = json.loads((run_dir / "history.json").read_text())
    rounds = [record["seconds"] for record in history if record["round"] > 0]
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "wall": wall,
        "steady": statistics.median(rounds[1:]),
        "round1": rounds[0],
        "accuracy": summary["final centralized accuracy"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", type=parse_side, action="append", required=True, help="NAME=PATH[:OPTIONS]")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--task", default=TASK, help="the run config (flwr run -c)")
    args = parser.parse_args()
    if len(args.side) < 2:
        parser.error("give at least two --side")
    work = Path(tempfile.mkdtemp(prefix="compare-checkouts-"))
    results: dict[str, list[dict]] = {name: [] for name, _, _ in args.side}
    for repeat in range(args.repeats):
        shift = repeat % len(args.side)
        for name, root, options in args.side[shift:] + args.side[:shift]:
            result = run_once(root, options, work / f"{name}-{repeat}", args.clients, args.task)
            results[name].append(result)
            shown = ", ".join(f"{key} {value:.3f}" for key, value in result.items())
            print(f"repeat {repeat + 1} {name}: {shown}", flush=True)
    first = args.side[0][0]
    base = {key: statistics.mean(r[key] for r in results[first]) for key in ("wall", "steady")}
    print(f"\n{'side':16s} {'whole run s':>24s} {'steady round s':>24s} {'round 1 s':>10s}  vs {first}")
    for name, runs in results.items():
        wall = statistics.mean(r["wall"] for r in runs)
        steady = statistics.mean(r["steady"] for r in runs)
        each_wall = ", ".join(f"{r['wall']:.1f}" for r in runs)
        each_steady = ", ".join(f"{r['steady']:.3f}" for r in runs)
        print(
            f"{name:16s} {wall:6.1f} ({each_wall:>15s}) {steady:6.3f} ({each_steady:>15s}) "
            f"{statistics.mean(r['round1'] for r in runs):10.2f}  whole {wall / base['wall']:.2f}x, "
            f"steady {steady / base['steady']:.2f}x"
        )


if __name__ == "__main__":
    main()
