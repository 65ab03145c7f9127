"""Round time: simulation vs deployment (Flower's process per message) vs deployment with warm workers.

One configuration for all three: N nodes, each with its own ``node-<i>.npz`` (the digits
partitions), ``dataset='local-file'``, the MLP, 1 local epoch, FedAvg, R rounds, federated
evaluation on every node. The figure is the server's own per-round time from ``history.json``
(train + evaluate, sending and receiving included), first round and later rounds apart; for the
warm executor also how much of a later round its messages took in the node's process (pull,
fit or evaluate, push) and the rest (polls, the SuperLink and gateway hops, the ServerApp).

    uv run python scripts/bench_deploy.py --nodes 3 --rounds 4
    uv run python scripts/bench_deploy.py --nodes 2 --rounds 4 --modes warm-flower-polls,warm,executor
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fl_app.config.settings import Settings
from fl_app.deploy.operator import LoopbackDeployment, write_node_files
from fl_app.server.run_directory import latest_run

ROOT = Path(__file__).resolve().parents[1]


def config(nodes: int, rounds: int, output_dir: Path) -> str:
    return (
        f"num-server-rounds={rounds} dataset='local-file' num-classes=10 input-shape='8,8,1' "
        f"local-epochs=1 min-available-clients={nodes} min-train-clients={nodes} "
        f"min-evaluate-clients={nodes} output-dir='{output_dir}'"
    )


def round_times(output_dir: Path) -> list[float]:
    run_dir = latest_run(output_dir)
    assert run_dir is not None, f"no run directory in {output_dir}"
    history = json.loads((run_dir / "history.json").read_text())
    return [r["seconds"] for r in history if r["round"] > 0]


def simulation(work: Path, nodes: int, rounds: int) -> list[float]:
    out = work / "sim"
    template = str(work / "data" / "node-{partition-id}.npz")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fl_app.deploy.launcher",
            "--app",
            str(ROOT),
            "--clients",
            str(nodes),
            "--output-dir",
            str(out),
            "--",
            "-c",
            f"{config(nodes, rounds, out)} data-path='{template}'",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if result.returncode != 0:
        raise RuntimeError(result.stdout[-3000:] + result.stderr[-3000:])
    return round_times(out)


def deployment(
    work: Path, nodes: int, rounds: int, warm: bool, flower_polls: bool = False, executor: bool = False
) -> tuple[list[float], list[list[float]] | None]:
    """The server's round times, and with ``executor`` each node's executor message times
    (:func:`task_seconds`; None without the executor)."""
    name = ("executor" if executor else "warm" if warm else "cold") + ("-flower-polls" if flower_polls else "")
    out = work / name
    with LoopbackDeployment(work / f"deploy-{name}", ROOT, flower_polls=flower_polls) as link:
        workers = [link.start_worker(f"node-{i}", wait=False) if warm and not executor else None for i in range(nodes)]
        for i in range(nodes):
            key, _ = link.node_keys(f"node-{i}")
            worker = workers[i]
            if worker is not None:
                link.wait_worker(f"node-{i}")
            link.start_node(
                f"node-{i}",
                {"data-path": str(work / "data" / f"node-{i}.npz"), "partition-id": i},
                private_key=key,
                worker=worker,
                executor=executor,
            )
        for i in range(nodes):
            link.node_id(f"node-{i}")
        status = link.wait(link.submit(config(nodes, rounds, out)), timeout=3600)
        if status != "finished:completed":
            raise RuntimeError(f"{name} run ended {status}: {link.log('superlink')[-3000:]}")
        tasks = [task_seconds(link.log(f"node-{i}-executor")) for i in range(nodes)] if executor else None
    return round_times(out), tasks


def task_seconds(executor_log: str) -> list[float]:
    """The durations the warm executor logged ("task N done in S s"): pulling the message, the
    ClientApp (fit or evaluate) and pushing the reply, in the node's process."""
    return [float(m) for m in re.findall(r"\] task \d+ done in ([0-9.]+) s", executor_log)]


def round_breakdown(rounds: list[float], nodes_tasks: list[list[float]]) -> dict[str, float]:
    """Later rounds (2..R): the mean round, the mean of the slowest node's two messages (train and
    evaluate) in the executor, and the rest (polls, SuperLink and gateway hops, the ServerApp)."""
    later = range(1, len(rounds))
    in_executor = [max(sum(tasks[2 * r : 2 * r + 2]) for tasks in nodes_tasks) for r in later]
    mean_round = statistics.mean(rounds[1:])
    return {
        "later rounds mean s": round(mean_round, 3),
        "in the executor (slowest node, train + evaluate) s": round(statistics.mean(in_executor), 3),
        "outside it (polls, hops, ServerApp) s": round(mean_round - statistics.mean(in_executor), 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument(
        "--modes",
        default="simulation,cold,warm",
        help="comma-separated: simulation, cold (a process per message), warm (the Keras worker), "
        "executor (the warm executor, fl_app.deploy.node_executor: no process per message); "
        "cold-flower-polls / warm-flower-polls / executor-flower-polls: the same with Flower's own poll intervals "
        "(SuperNode 3 s idle / 0.5 s reply wait, SuperExec 1 s) instead of fl_app.deploy.supernode_entry's",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-deploy-") as tmp:
        work = Path(tmp)
        write_node_files(work / "data", Settings(num_partitions=args.nodes, partitioner="iid"))
        results = {}
        for mode in args.modes.split(","):
            started = time.perf_counter()
            tasks = None
            if mode == "simulation":
                times = simulation(work, args.nodes, args.rounds)
            else:
                times, tasks = deployment(
                    work,
                    args.nodes,
                    args.rounds,
                    warm=mode.startswith("warm"),
                    flower_polls=mode.endswith("flower-polls"),
                    executor=mode.startswith("executor"),
                )
            results[mode] = {
                "first round s": round(times[0], 2),
                "later rounds mean s": round(statistics.mean(times[1:]), 2) if len(times) > 1 else None,
                "all rounds": [round(t, 2) for t in times],
                "wall s (incl. start-up)": round(time.perf_counter() - started, 1),
            }
            if tasks is not None and len(times) > 1:
                results[mode]["breakdown"] = round_breakdown(times, tasks)
            print(mode, json.dumps(results[mode]), flush=True)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
