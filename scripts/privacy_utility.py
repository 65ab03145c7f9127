"""Privacy against utility: accuracy against epsilon for central DP-FedAvg and for DP-SGD.

Every federation runs in this process through :func:`fl_app.simulation.local_grid.run_local_federation` (the
app's real ClientApp handlers and strategies, no Ray). Each finished run is appended to
``<out>/results.jsonl`` as soon as it ends, and the table (``results.md``) and the plot
(``privacy_utility.png``) are rewritten after every run, so a long sweep can be watched and
interrupted.

    # central DP-FedAvg: synthetic data, 1,000 clients, Poisson q = 0.1, 50 rounds, targets 1, 2, 5
    uv run python scripts/privacy_utility.py central --clients 1000 --q 0.1 --rounds 50 --targets 1,2,5
    # DP-SGD on digits, 10 clients: noise multipliers 0 (non-private), 0.7, 1.1, 2.0
    uv run python scripts/privacy_utility.py dpsgd --noise 0,0.7,1.1,2.0

A target epsilon of 0 (``--targets 0,…``) is the non-private reference (FedAvg with equal weights).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any


def central_config(args: argparse.Namespace, target: float) -> dict[str, Any]:
    config: dict[str, Any] = {
        "dataset": "synthetic",
        "partitioner": "iid",
        "num-partitions": args.clients,
        "synthetic-samples-per-client": args.samples,
        "synthetic-features": 32,
        "synthetic-classes": 10,
        "model": args.model,
        "local-epochs": 1,
        "batch-size": args.batch_size,
        "optimizer": "sgd",
        "learning-rate": args.lr,
        "num-server-rounds": args.rounds,
        "fraction-train": args.q,
        "min-train-clients": 1,
        "min-available-clients": 1,
        "fraction-evaluate": 1e-6,
        "min-evaluate-clients": 0,
        "test-fraction": 0.0,
        "server-learning-rate": args.server_lr,
        "strategy": "dp-fedavg",
        "dp-clip-norm": args.clip,
        "dp-delta": args.delta,
    }
    if target > 0:
        config.update({"dp-noise-multiplier": 0.0, "dp-target-epsilon": target})
    else:
        config.update({"dp-noise-multiplier": 0.0, "dp-clip-norm": 1e6})  # plain mean of all updates
    return config


def dpsgd_config(args: argparse.Namespace, noise: float) -> dict[str, Any]:
    return {
        "num-partitions": 10,
        "partitioner": "iid",
        "num-server-rounds": args.rounds,
        "local-epochs": args.epochs,
        "min-train-clients": 10,
        "min-available-clients": 10,
        "min-evaluate-clients": 0,
        "fraction-evaluate": 1e-6,
        "learning-rate": args.lr,
        "optimizer": args.optimizer,
        "batch-size": args.batch_size,
        "dp-sgd-noise-multiplier": noise,
        "dp-sgd-l2-clip": args.clip,
        "dp-delta": args.delta,
    }


def run_one(kind: str, config: dict[str, Any], label: float) -> dict[str, Any]:
    from fl_app.simulation.local_grid import run_local_federation

    started = time.perf_counter()
    _, history = run_local_federation(config)
    seconds = time.perf_counter() - started
    trained = [r for r in history if r.round > 0]
    last = history[-1]
    row: dict[str, Any] = {
        "kind": kind,
        "setting": label,
        "rounds": len(trained),
        "accuracy": last.centralized_accuracy,
        "seconds": round(seconds, 1),
    }
    if kind == "central":
        row["epsilon"] = last.extra.get("epsilon", float("inf")) if label > 0 else float("inf")
        row["noise-multiplier"] = last.extra.get("noise-multiplier", 0.0)
        row["mean clients per round"] = round(statistics.mean(r.clients_replied for r in trained), 1)
    else:
        row["epsilon"] = last.extra.get("dp-sgd-epsilon-max", float("inf"))
        per_epoch = [r.extra["fit-seconds"] / config["local-epochs"] for r in trained[1:] if "fit-seconds" in r.extra]
        row["seconds per local epoch"] = round(statistics.median(per_epoch), 4) if per_epoch else None
    row["accuracy per round"] = [
        round(r.centralized_accuracy, 4) for r in history if r.centralized_accuracy is not None
    ]
    return row


def write_outputs(out: Path, rows: list[dict[str, Any]]) -> None:
    keys = [k for k in rows[0] if k != "accuracy per round"]
    for row in rows[1:]:
        keys += [k for k in row if k not in keys and k != "accuracy per round"]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(k)) for k in keys) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, kind, title in (
        (axes[0], "central", "central DP-FedAvg (user level)"),
        (axes[1], "dpsgd", "DP-SGD (example level)"),
    ):
        points = sorted((r["epsilon"], r["accuracy"]) for r in rows if r["kind"] == kind and r["accuracy"] is not None)
        private = [(e, a) for e, a in points if e != float("inf")]
        if private:
            ax.plot([e for e, _ in private], [a for _, a in private], "o-", label="private")
        for e, a in points:
            if e == float("inf"):
                ax.axhline(a, color="gray", linestyle="--", label="non-private")
        ax.set_xlabel("epsilon")
        ax.set_ylabel("centralized test accuracy")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if points:
            ax.legend()
    fig.tight_layout()
    fig.savefig(out / "privacy_utility.png", dpi=120)
    plt.close(fig)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "inf" if value == float("inf") else f"{value:.4g}"
    return "" if value is None else str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=("central", "dpsgd"))
    parser.add_argument("--out", default="outputs/privacy_utility")
    parser.add_argument("--targets", default="0,1,2,5", help="central: target epsilons (0: non-private)")
    parser.add_argument("--noise", default="0,0.7,1.1,2.0", help="dpsgd: noise multipliers (0: non-private)")
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--q", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--samples", type=int, default=20, help="central: synthetic examples per client")
    parser.add_argument("--model", default="logreg")
    parser.add_argument("--clip", type=float, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--server-lr", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=5, help="dpsgd: local epochs per round")
    parser.add_argument("--optimizer", default="adam")
    parser.add_argument("--delta", type=float, default=1e-5)
    args = parser.parse_args()
    central = args.kind == "central"
    args.rounds = args.rounds or (50 if central else 10)
    args.clip = args.clip or (0.5 if central else 1.0)
    args.lr = args.lr or (0.1 if central else 0.01)
    args.batch_size = args.batch_size or (10 if central else 32)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    settings = [float(v) for v in (args.targets if central else args.noise).split(",")]
    for value in settings:
        config = central_config(args, value) if central else dpsgd_config(args, value)
        row = run_one(args.kind, config, value)
        row["config"] = config
        rows.append(row)
        with results.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        write_outputs(out, rows)
        print({k: v for k, v in row.items() if k not in ("config", "accuracy per round")}, flush=True)


if __name__ == "__main__":
    main()
