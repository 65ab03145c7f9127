"""Accuracy and upload bytes of every codec on the default federation (in-process, no Ray).

Runs the app's ClientApp handlers through :func:`fl_app.simulation.local_grid.run_local_federation` with
``strategy='robust' aggregation-rule='mean' client-weighting='num-examples'`` (FedAvg, the strategy
that decodes) and one codec per row, for the same rounds, data and seeds; writes a JSON table and
prints it (Markdown). The seed also draws the Dirichlet partition, so one seed's final accuracy
moves by about a point from round to round: every row is run for each of ``--seeds`` and the table
gives the mean final accuracy, its spread, and the change against the uncompressed row.

Sparse uploads dilute the mean (clients choose mostly different coordinates, so each kept value
is divided by K); error feedback sends what was left out later, so the model only lags. A larger
server step (``server-learning-rate``) makes up the lag: the ``server lr 2`` rows measure that
recipe, next to the uncompressed run at the default step.

    uv run python scripts/compression_experiment.py --rounds 20 --seeds 42 1 2 --out outputs/compression.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ROWS = {
    "none": {"compression": "none"},
    "float16": {"compression": "float16"},
    "int8": {"compression": "int8"},
    "top-k 1% + EF": {"compression": "top-k", "compression-topk-fraction": 0.01},
    "top-k 1% no EF": {"compression": "top-k", "compression-topk-fraction": 0.01, "compression-error-feedback": False},
    "top-k 10% + EF": {"compression": "top-k", "compression-topk-fraction": 0.1},
    "top-k 1% + EF, server lr 2": {
        "compression": "top-k",
        "compression-topk-fraction": 0.01,
        "server-learning-rate": 2.0,
    },
    "top-k 2% + EF": {"compression": "top-k", "compression-topk-fraction": 0.02},
    "random-mask 10% rescaled": {"compression": "random-mask", "compression-mask-fraction": 0.1},
    "random-mask 10% + EF": {
        "compression": "random-mask",
        "compression-mask-fraction": 0.1,
        "compression-mask-rescale": False,
    },
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2])
    parser.add_argument("--rows", nargs="*", default=list(ROWS), help=f"subset of: {', '.join(ROWS)}")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "compression.json")
    args = parser.parse_args()

    from fl_app.simulation.local_grid import run_local_federation

    base = {
        "strategy": "robust",
        "aggregation-rule": "mean",
        "client-weighting": "num-examples",
        "num-server-rounds": args.rounds,
    }
    table = json.loads(args.out.read_text()) if args.out.exists() else {}
    for name in args.rows:
        for seed in args.seeds:
            key = f"{name} | seed {seed}"
            if key in table:
                continue
            started = time.perf_counter()
            _, history = run_local_federation({**base, **ROWS[name], "seed": seed})
            trained = [r for r in history if r.round > 0]
            table[key] = {
                "row": name,
                "seed": seed,
                "config": ROWS[name],
                "final_accuracy": trained[-1].centralized_accuracy,
                "accuracy_per_round": [r.centralized_accuracy for r in trained],
                "bytes_up_per_round": sum(r.bytes_received for r in trained) / len(trained),
                "bytes_down_per_round": sum(r.bytes_sent for r in trained) / len(trained),
                "failures": sum(len(r.failures) for r in trained),
                "seconds": round(time.perf_counter() - started, 1),
            }
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(table, indent=2))
            print(key, f"accuracy {table[key]['final_accuracy']:.4f}", f"{table[key]['seconds']} s", flush=True)
    print_table(table, args.rows, args.seeds, args.rounds)


def print_table(table: dict, rows: list[str], seeds: list[int], rounds: int) -> None:
    """Markdown: mean and spread over the seeds of the final accuracy, bytes and their ratio."""

    def runs(name: str) -> list[dict]:
        return [table[f"{name} | seed {seed}"] for seed in seeds if f"{name} | seed {seed}" in table]

    reference = runs("none")
    reference_accuracy = statistics.mean(r["final_accuracy"] for r in reference) if reference else None
    reference_bytes = reference[0]["bytes_up_per_round"] if reference else None
    print(
        f"\n| codec | accuracy after {rounds} rounds, mean of {len(seeds)} seeds (min-max) | "
        "change vs none, points | bytes up / round | reduction |"
    )
    print("|---|---|---|---|---|")
    for name in rows:
        done = runs(name)
        if not done:
            continue
        accuracies = [r["final_accuracy"] for r in done]
        mean = statistics.mean(accuracies)
        change = f"{100 * (mean - reference_accuracy):+.2f}" if reference_accuracy is not None else "-"
        up = statistics.mean(r["bytes_up_per_round"] for r in done)
        ratio = f"{reference_bytes / up:.1f}x" if reference_bytes else "-"
        print(f"| {name} | {mean:.4f} ({min(accuracies):.4f}-{max(accuracies):.4f}) | {change} | {up:.0f} | {ratio} |")


if __name__ == "__main__":
    main()
