"""Speed and memory, side by side in one run: our app, a quickstart-style baseline, centralized Keras.

For each client count N, on the same data, model, clients and rounds:

(a) our app in Flower's simulation engine (``fl-keras-run``, i.e. ``flwr run`` on a private
    SuperLink): per-round seconds end to end (the differences of its history's ``finished_at``,
    so the writes between rounds count), time to the end of round 1 (start-up);
(b) ``scripts/baseline_app`` in the style of Flower's ``quickstart-tensorflow`` example (a fresh
    Keras model built and compiled per message, ``model.fit``/``model.evaluate``, Flower's FedAvg and
    ``strategy.start``) in the same engine, the same way;
(c) centralized Keras training (``model.fit``) on the pooled client training data, for the same
    number of sample-epochs (``scripts/centralized.py``).

Peak memory of (a) and (b) is the peak over time of the summed RSS and PSS of every process under
the launcher (the SuperLink and its SuperExec, the ``flwr`` CLI, the warm simulation process with
the ServerApp and, with --backend ray, Ray's GCS, raylet and actors), sampled
twice a second (:mod:`fl_app.deploy.process_tools`). Steady state is the median of rounds 2..R. Printed: a
table, the ratios (b)/(a) and (a)/(c) per sample-epoch, and a JSON file with everything.

    uv run python scripts/benchmark.py --clients 10 50 --rounds 8 --out benchmark.json
    uv run python scripts/benchmark.py --clients 200 --rounds 10 --only a \\
        -c "dataset='synthetic' fraction-train=0.1 fraction-evaluate=0.1 min-evaluate-clients=2"
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


from fl_app.deploy.process_tools import TreeMemorySampler  # noqa: E402
from fl_app.server.run_directory import latest_run  # noqa: E402

BASELINE_APP = ROOT / "scripts" / "baseline_app"


def _round_one_done(output_dir: Path, since: float) -> bool:
    """Whether our app's history in ``output_dir``, of a run made at ``since`` (epoch seconds) or
    later (not one of an earlier benchmark in the same directory), already holds round 1."""
    try:
        run_dir = latest_run(output_dir)
        if run_dir is None or run_dir.stat().st_ctime < since:
            return False
        return any(r["round"] == 1 for r in json.loads((run_dir / "history.json").read_text()))
    except (OSError, ValueError, KeyError):
        return False


class PrivateRayCluster:
    """A one-node Ray cluster of our own (``ray start --head --temp-dir <private>``), for machines so
    loaded that ``ray.init()`` inside Flower's simulation times out (Ray waits 30 s, hard-coded, for
    its raylet): ``ray start`` is retried, and the simulation joins it through ``RAY_ADDRESS``,
    exactly as on a multi-node cluster. Stopped by the PIDs of its processes (found by the private
    temp dir in their command lines), never with ``ray stop``, which would stop every Ray of the user.
    """

    def __init__(self, temp_dir: Path, num_cpus: int, attempts: int = 4) -> None:
        import os as _os

        from fl_app.deploy.launcher import free_port

        self.temp_dir = temp_dir
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        ray = str(Path(sys.executable).parent / "ray")
        for attempt in range(attempts):
            done = subprocess.run(
                [
                    ray,
                    "start",
                    "--head",
                    "--port",
                    str(self.port),
                    "--num-cpus",
                    str(num_cpus),
                    "--temp-dir",
                    str(temp_dir),
                    "--include-dashboard",
                    "false",
                    "--disable-usage-stats",
                ],
                capture_output=True,
                text=True,
                timeout=600,
            )
            if done.returncode == 0:
                break
            self.stop()
            print(f"ray start failed (attempt {attempt + 1}): {done.stderr[-300:]}", flush=True)
        else:
            raise RuntimeError("could not start a private Ray cluster")
        self.address = f"127.0.0.1:{self.port}"
        _os.environ["RAY_ADDRESS"] = self.address  # inherited by the launcher and the SuperLink

    def pids(self) -> list[int]:
        from fl_app.deploy.process_tools import pids_with_argument

        return pids_with_argument(str(self.temp_dir))

    def stop(self) -> None:
        import os as _os
        import signal as _signal

        for sig in (_signal.SIGTERM, _signal.SIGKILL):
            for pid in self.pids():
                try:
                    _os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(3)
        _os.environ.pop("RAY_ADDRESS", None)


RAY_CLUSTER: PrivateRayCluster | None = None
BACKEND = "inprocess"


def run_simulation(app: Path, clients: int, output_dir: Path, run_config: str, timeout: float) -> dict:
    """Run ``fl-keras-run --app app``; return wall times, exit code and peak memory of the tree.

    ``first_round_end_s``: seconds from the launch to the moment round 1's record appeared in our
    app's history (polled every 0.2 s; absent for the baseline, which records its own times).
    """
    command = [
        sys.executable,
        "-m",
        "fl_app.deploy.launcher",
        "--app",
        str(app),
        "--clients",
        str(clients),
        "--backend",
        BACKEND,
        "--output-dir",
        str(output_dir),
        "--",
        "-c",
        run_config,
    ]
    sampler = TreeMemorySampler(interval=0.5, extra_roots=RAY_CLUSTER.pids if RAY_CLUSTER else None).start()
    started = time.time()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler.root = process.pid  # the launcher's tree: its SuperLink and, beside it, the warm simulation process
    lines: list[str] = []

    def read() -> None:
        for line in process.stdout:
            lines.append(line)

    first_round: dict[str, float] = {}

    def watch() -> None:
        while process.poll() is None and "t" not in first_round:
            if _round_one_done(output_dir, started):
                first_round["t"] = time.time() - started
            time.sleep(0.2)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    threading.Thread(target=watch, daemon=True).start()
    try:
        code = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.terminate()  # the launcher stops its SuperLink's process group on the way out
        code = process.wait(timeout=60)
    reader.join(timeout=10)
    memory = sampler.stop()
    (output_dir / "launcher.log").parent.mkdir(parents=True, exist_ok=True)
    (output_dir / "launcher.log").write_text("".join(lines))
    result = {"exit_code": code, "started": started, "wall_s": round(time.time() - started, 2), **memory}
    if "t" in first_round:
        result["first_round_end_s"] = round(first_round["t"], 2)
    return result


def ours(clients: int, rounds: int, out: Path, extra: str, timeout: float) -> dict:
    """(a): our app; start-up = launch to end of round 1. Round seconds end to end, as (b)'s: the
    differences of the rounds' ``finished_at`` in history.json, so they include the history and
    checkpoint writes between rounds (the history's own ``seconds`` do not; kept as
    ``in_round_s``)."""
    out_dir = out / f"a-{clients}"
    result = run_simulation(ROOT, clients, out_dir, f"num-server-rounds={rounds} {extra}".strip(), timeout)
    run_dir = latest_run(out_dir)
    history = []
    if run_dir is not None:
        history = json.loads((run_dir / "history.json").read_text())
        result["final_accuracy"] = history[-1].get("centralized_accuracy")
        result["run_dir"] = str(run_dir)
    trained = [r for r in history if r["round"] > 0]
    ends = [r["finished_at"] for r in history]
    result["round_s"] = [round(b - a, 3) for a, b in itertools.pairwise(ends)]
    result["in_round_s"] = [round(r["seconds"], 3) for r in trained]
    result["bytes_up_per_round"] = [r["bytes_received"] for r in trained]
    result["bytes_down_per_round"] = [r["bytes_sent"] for r in trained]
    return result


def baseline(clients: int, rounds: int, out: Path, extra: str, timeout: float) -> dict:
    """(b): the quickstart-style app; round ends recorded by its ServerApp."""
    out_dir = out / f"b-{clients}"
    result = run_simulation(BASELINE_APP, clients, out_dir, f"num-server-rounds={rounds} {extra}".strip(), timeout)
    times_file = out_dir / "baseline-times.json"
    if times_file.exists():
        times = json.loads(times_file.read_text())
        ends = times["round_ends"]  # ends[0]: round 0 (before training); ends[i]: end of round i
        result["round_s"] = [round(b - a, 3) for a, b in itertools.pairwise(ends)]
        if len(ends) > 1:
            result["first_round_end_s"] = round(ends[1] - result["started"], 2)
    return result


def centralized(clients: int, rounds: int, local_epochs: int, extra: str) -> dict:
    """(c): model.fit on the pooled client train data for rounds x local-epochs epochs."""
    epochs = rounds * local_epochs
    command = [
        sys.executable,
        str(ROOT / "scripts" / "centralized.py"),
        "--epochs",
        str(epochs),
        "-c",
        f"num-partitions={clients} {extra}".strip(),
    ]
    sampler = TreeMemorySampler(interval=0.5)
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    sampler.root = process.pid
    sampler.start()
    stdout, _ = process.communicate(timeout=3600)
    memory = sampler.stop()
    result = json.loads(stdout[stdout.index("{") :])
    return {**result, **memory}


def steady(round_s: list[float]) -> float | None:
    """Median of rounds 2..R (round 1 pays tracing and warm-up)."""
    later = round_s[1:] or round_s
    return round(statistics.median(later), 3) if later else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--local-epochs", type=int, default=5, help="must match the run config")
    parser.add_argument("--only", default="abc", help="which of a, b, c to run (default abc)")
    parser.add_argument("-c", "--run-config", default="", help="extra run config for (a), e.g. fractions")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "benchmark")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument(
        "--ray-cluster",
        action="store_true",
        help="run (a) and (b) on a private Ray cluster started first (see PrivateRayCluster)",
    )
    parser.add_argument("--ray-cpus", type=int, default=2)
    parser.add_argument(
        "--backend",
        choices=("inprocess", "ray"),
        default="inprocess",
        help="fl-keras-run's --backend for (a) and (b) (default inprocess; --ray-cluster implies ray)",
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    global RAY_CLUSTER, BACKEND
    BACKEND = "ray" if args.ray_cluster else args.backend
    if args.ray_cluster:
        RAY_CLUSTER = PrivateRayCluster(args.out / "ray", args.ray_cpus)
    try:
        run_all(args)
    finally:
        if RAY_CLUSTER is not None:
            RAY_CLUSTER.stop()


def run_all(args) -> None:
    report: dict = {"rounds": args.rounds, "run_config": args.run_config, "clients": {}}
    for n in args.clients:
        entry: dict = {}
        if "a" in args.only:
            entry["a"] = ours(n, args.rounds, args.out, args.run_config, args.timeout)
            entry["a"]["steady_round_s"] = steady(entry["a"]["round_s"])
        if "b" in args.only:
            fractions = " ".join(p for p in args.run_config.split() if p.startswith("fraction-"))
            entry["b"] = baseline(n, args.rounds, args.out, fractions, args.timeout)
            entry["b"]["steady_round_s"] = steady(entry["b"].get("round_s", []))
        if "c" in args.only:
            entry["c"] = centralized(n, args.rounds, args.local_epochs, "")
            # seconds for the sample-epochs of one federated round (local-epochs over the pool)
            entry["c"]["round_equivalent_s"] = round(entry["c"]["seconds per epoch"] * args.local_epochs, 3)
        a, b, c = entry.get("a", {}), entry.get("b", {}), entry.get("c", {})
        if a.get("steady_round_s") and b.get("steady_round_s"):
            entry["b_over_a"] = round(b["steady_round_s"] / a["steady_round_s"], 2)
        if a.get("steady_round_s") and c.get("round_equivalent_s"):
            entry["a_over_c_per_sample_epoch"] = round(a["steady_round_s"] / c["round_equivalent_s"], 2)
        report["clients"][n] = entry
        (args.out / "benchmark.json").write_text(json.dumps(report, indent=2))
        print_entry(n, entry)
    print(f"\nwritten: {args.out / 'benchmark.json'}")


def print_entry(n: int, entry: dict) -> None:
    print(f"\n=== {n} clients " + "=" * 60)
    print(f"{'':<34}{'steady s/round':>15}{'start-up s':>12}{'peak RSS GiB':>14}{'peak PSS GiB':>14}")
    names = {"a": "(a) our app", "b": "(b) quickstart-style baseline", "c": "(c) centralized (per round-eq.)"}
    for key, label in names.items():
        r = entry.get(key)
        if not r:
            continue
        seconds = r.get("steady_round_s", r.get("round_equivalent_s"))
        startup = r.get("first_round_end_s", "-")
        print(
            f"{label:<34}{seconds!s:>15}{startup!s:>12}{r.get('peak_rss_gib', '-')!s:>14}"
            f"{r.get('peak_pss_gib', '-')!s:>14}"
        )
    for key in ("b_over_a", "a_over_c_per_sample_epoch"):
        if key in entry:
            print(f"{key}: {entry[key]}")


if __name__ == "__main__":
    main()
