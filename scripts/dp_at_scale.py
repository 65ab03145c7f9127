"""Central DP-FedAvg at scale: 1,000 synthetic clients, Poisson sampling q = 0.1, 50 rounds.

Runs, in this process and through the app's real ClientApp handlers and strategy
(:func:`fl_app.simulation.local_grid.run_local_federation`), the same federation twice on the same data,
clients and sampling:

* **private**: ``strategy='dp-fedavg'``, ``dp-mode='central'``, Poisson sampling at rate q (about
  100 clients per round), every update clipped to C, N(0, (z C / m)^2) added to the mean, z
  calibrated so that the rounds end at ``--target-epsilon`` (RDP, at ``--delta``), or given with
  ``--noise``;
* **non-private**: the same strategy and sampling with z = 0 and C = 1e6 (no clipping), i.e. the
  equal-weight mean of the sampled clients' updates.

It also fits a centralized multinomial logistic regression (scikit-learn) on the union of the
clients' training data and scores it on the same held-out server test set: the ceiling that
shows the data are neither trivial nor impossible (synthetic Gaussian class clusters, see
:func:`fl_app.task.data.make_synthetic_arrays`; 32 features and 10 classes give about 0.80).

    uv run python scripts/dp_at_scale.py                      # 1,000 clients, q 0.1, 50 rounds, eps 5
    uv run python scripts/dp_at_scale.py --rounds 5 --clients 200   # a quick look

Writes ``<out>/results.jsonl`` and ``<out>/results.md`` (private and non-private rows, with
epsilon by RDP and PLD at delta, the calibrated z, clients per round, accuracy per round).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any


def run_config(args: argparse.Namespace, private: bool) -> dict[str, Any]:
    """The federation's run config; ``private=False`` gives the non-private counterpart."""
    config: dict[str, Any] = {
        "dataset": "synthetic",
        "partitioner": "iid",
        "num-partitions": args.clients,
        "synthetic-samples-per-client": args.samples,
        "synthetic-features": args.features,
        "synthetic-classes": args.classes,
        "test-fraction": 0.0,
        "seed": args.seed,
        "model": args.model,
        "local-epochs": args.epochs,
        "batch-size": args.batch_size,
        "optimizer": "sgd",
        "learning-rate": args.lr,
        "server-learning-rate": args.server_lr,
        "num-server-rounds": args.rounds,
        "fraction-train": args.q,
        "min-train-clients": 1,
        "min-available-clients": 1,
        "fraction-evaluate": 1e-6,
        "min-evaluate-clients": 0,
        "strategy": "dp-fedavg",
        "dp-mode": "central",
        "dp-sampling": "poisson",
        "dp-delta": args.delta,
    }
    if not private:
        config.update({"dp-noise-multiplier": 0.0, "dp-clip-norm": 1e6})
    elif args.noise > 0:
        config.update({"dp-noise-multiplier": args.noise, "dp-clip-norm": args.clip})
    else:
        config.update({"dp-noise-multiplier": 0.0, "dp-target-epsilon": args.target_epsilon, "dp-clip-norm": args.clip})
    return config


def centralized_ceiling(config: dict[str, Any]) -> float:
    """Test accuracy of a logistic regression fit on all clients' training data at once."""
    from sklearn.linear_model import LogisticRegression

    from fl_app.config.settings import Settings
    from fl_app.task.data import federated_data

    data = federated_data(Settings.from_run_config(config))
    flat = data.x.reshape(len(data.x), -1)
    model = LogisticRegression(max_iter=1000).fit(flat, data.y)
    return float(model.score(data.x_server_test.reshape(len(data.x_server_test), -1), data.y_server_test))


def run(config: dict[str, Any], label: str) -> dict[str, Any]:
    from fl_app.simulation.local_grid import run_local_federation

    started = time.perf_counter()
    _, history = run_local_federation(config)
    seconds = time.perf_counter() - started
    trained = [r for r in history if r.round > 0]
    last = history[-1]
    private = label == "private"
    return {
        "run": label,
        "rounds": len(trained),
        "accuracy": round(last.centralized_accuracy, 4),
        "mean accuracy, last 5 rounds": round(statistics.mean(r.centralized_accuracy for r in history[-5:]), 4),
        "epsilon (RDP)": round(last.extra["epsilon-rdp"], 3) if private else float("inf"),
        "epsilon (PLD)": round(last.extra["epsilon-pld"], 3) if private else float("inf"),
        "z": round(last.extra.get("noise-multiplier", 0.0), 4),
        "clip": config["dp-clip-norm"],
        "clients per round (mean)": round(statistics.mean(r.clients_replied for r in trained), 1),
        "seconds": round(seconds, 1),
        "accuracy per round": [round(r.centralized_accuracy, 4) for r in history],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/dp_at_scale")
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--q", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--target-epsilon", type=float, default=5.0)
    parser.add_argument("--noise", type=float, default=0.0, help="z; 0 calibrates z to --target-epsilon")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--samples", type=int, default=20, help="synthetic examples per client")
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--model", default="logreg")
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--server-lr", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--skip-non-private", action="store_true")
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    ceiling = centralized_ceiling(run_config(args, private=True))
    print(f"centralized logistic regression on all clients' data: {ceiling:.4f}", flush=True)
    for label in ("private",) if args.skip_non_private else ("private", "non-private"):
        config = run_config(args, private=label == "private")
        row = {**run(config, label), "centralized ceiling": round(ceiling, 4), "config": config}
        rows.append(row)
        with (out / "results.jsonl").open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        print({k: v for k, v in row.items() if k not in ("config", "accuracy per round")}, flush=True)
    keys = [k for k in rows[0] if k not in ("config", "accuracy per round")]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(row[k]) for k in keys) + " |" for row in rows]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
