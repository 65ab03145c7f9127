"""Accuracy and upload bytes of every codec on the default federation (in-process, no Ray).

Runs the app's ClientApp handlers through :func:`fl_app.local_grid.run_local_federation` with
``strategy='robust' aggregation-rule='mean' client-weighting='num-examples'`` (FedAvg, the strategy
that decodes) and one codec per row, for the same rounds, data and seed; writes a JSON table and
prints it (Markdown).

    uv run python scripts/compression_experiment.py --rounds 20 --out outputs/compression.json
"""

from __future__ import annotations

import argparse
import json
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
    "top-k 1% no EF": {"compression": "top-k", "compression-topk-fraction": 0.01,
                       "compression-error-feedback": False},
    "top-k 10% + EF": {"compression": "top-k", "compression-topk-fraction": 0.1},
    "top-k 1% + EF, server lr 2": {"compression": "top-k", "compression-topk-fraction": 0.01,
                                    "server-learning-rate": 2.0},
    "top-k 2% + EF": {"compression": "top-k", "compression-topk-fraction": 0.02},
    "random-mask 10% rescaled": {"compression": "random-mask", "compression-mask-fraction": 0.1},
    "random-mask 10% + EF": {"compression": "random-mask", "compression-mask-fraction": 0.1,
                             "compression-mask-rescale": False},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--rows", nargs="*", default=list(ROWS), help=f"subset of: {', '.join(ROWS)}")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "compression.json")
    args = parser.parse_args()

    from fl_app.local_grid import run_local_federation

    base = {"strategy": "robust", "aggregation-rule": "mean", "client-weighting": "num-examples",
            "num-server-rounds": args.rounds}
    table = json.loads(args.out.read_text()) if args.out.exists() else {}
    for name in args.rows:
        started = time.perf_counter()
        _, history = run_local_federation({**base, **ROWS[name]})
        trained = [r for r in history if r.round > 0]
        table[name] = {
            "config": ROWS[name],
            "final_accuracy": trained[-1].centralized_accuracy,
            "best_accuracy": max(r.centralized_accuracy for r in trained),
            "bytes_up_per_round": sum(r.bytes_received for r in trained) / len(trained),
            "bytes_down_per_round": sum(r.bytes_sent for r in trained) / len(trained),
            "failures": sum(len(r.failures) for r in trained),
            "seconds": round(time.perf_counter() - started, 1),
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(table, indent=2))
        print(name, table[name], flush=True)
    reference = table.get("none", {}).get("bytes_up_per_round")
    print("\n| codec | accuracy after %d rounds | bytes up / round | reduction | bytes down / round |" % args.rounds)
    print("|---|---|---|---|---|")
    for name, row in table.items():
        ratio = f"{reference / row['bytes_up_per_round']:.1f}x" if reference else "-"
        print(f"| {name} | {row['final_accuracy']:.4f} | {row['bytes_up_per_round']:.0f} | {ratio} | "
              f"{row['bytes_down_per_round']:.0f} |")


if __name__ == "__main__":
    main()
