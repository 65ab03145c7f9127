"""DP-SGD on digits with 10 clients: accuracy, example-level epsilon and epoch time per setting.

The noise multiplier and the clip norm stay fixed (z = 1.1, C = 1.0 by default); everything else
that decides utility and privacy spend is swept: model, optimizer, learning rate, batch size,
local epochs, rounds, partitioner and each client's local test share. Every setting runs
twice in this process through :func:`fl_app.simulation.local_grid.run_local_federation` (the app's real
ClientApp handlers and FedAvg): with DP-SGD and without it (same data, clients, seeds), so each
row shows the price of privacy next to its non-private counterpart.

Epsilon is the example-level epsilon at ``--delta`` of the client that spent the most (the smallest
client: largest sampling rate q = B / n), for ``--sampling`` (``dp-sgd-sampling``): with ``poisson``
(the default) ``rounds * local-epochs * ceil(n / B)`` Poisson-sampled Gaussian steps with rate
``q = B / n`` and multiplier z, add/remove-one; with ``shuffle`` one Gaussian of multiplier z / 2
per epoch, replace-one (:func:`fl_app.task.dp_sgd.example_level_epsilon`), by RDP (what the history
reports as ``dp-sgd-epsilon-max``) and by PLD. More steps spend more.

Time per local epoch is measured side by side in one process: the same client's data, the same
model compiled with the DP optimizer drawing Poisson batches, with the DP optimizer on shuffled
fixed-size batches, and with the plain optimizer, epochs alternated, median over
``--timing-epochs`` epochs each (after a warm-up epoch that traces the graph).

    # the grid behind the README's table (44 settings, about 25 minutes on 2 busy cores)
    uv run python scripts/dp_sgd_sweep.py --models logreg --optimizers adam,sgd \
        --lrs adam:0.05,0.1 sgd:1.0,2.0 --batch-sizes 32,64 --epochs 1,5 --rounds 10,20
    uv run python scripts/dp_sgd_sweep.py --models logreg --lrs adam:0.1,0.2 --batch-sizes 16,32 \
        --epochs 1 --rounds 5,10
    uv run python scripts/dp_sgd_sweep.py --models mlp --lrs adam:0.01,0.1 --batch-sizes 32 \
        --epochs 1,5 --rounds 10
    # the documented recipe alone
    uv run python scripts/dp_sgd_sweep.py --models logreg --lrs adam:0.2 --batch-sizes 16 \
        --epochs 1 --rounds 10

Writes ``<out>/results.jsonl`` (one row per setting, appended as soon as it is measured) and
``<out>/results.md`` (the table, rewritten after every row).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path
from typing import Any


def federation_config(args: argparse.Namespace, setting: dict[str, Any], noise: float) -> dict[str, Any]:
    """Run config of one federation: every one of 10 clients trains in every round."""
    return {
        "dataset": "digits",
        "num-partitions": args.clients,
        "partitioner": args.partitioner,
        "test-fraction": args.test_fraction,
        "num-server-rounds": setting["rounds"],
        "local-epochs": setting["epochs"],
        "batch-size": setting["batch"],
        "model": setting["model"],
        "optimizer": setting["optimizer"],
        "learning-rate": setting["lr"],
        "min-train-clients": args.clients,
        "min-available-clients": args.clients,
        "min-evaluate-clients": 0,
        "fraction-evaluate": 1e-6,
        "seed": args.seed,
        "dp-sgd-noise-multiplier": noise,
        "dp-sgd-l2-clip": args.clip,
        "dp-sgd-microbatches": args.microbatches,
        "dp-sgd-sampling": args.sampling,
        "dp-delta": args.delta,
    }


def largest_epsilon(config: dict[str, Any], method: str) -> tuple[float, int]:
    """(epsilon, n) of the client whose DP-SGD spends the most example-level privacy."""
    from fl_app.config.settings import Settings
    from fl_app.task.data import client_data
    from fl_app.task.dp_sgd import example_level_epsilon

    settings = Settings.from_run_config(config)
    sizes = [len(client_data(settings, i).y_train) for i in range(settings.num_partitions)]
    epsilons = [
        (
            example_level_epsilon(
                n,
                settings.batch_size,
                settings.dp_sgd_noise_multiplier,
                settings.local_epochs * settings.num_server_rounds,
                settings.dp_delta,
                num_microbatches=settings.dp_sgd_microbatches or None,
                method=method,
                sampling=settings.dp_sgd_sampling,
            ),
            n,
        )
        for n in sizes
    ]
    return max(epsilons)


def epoch_seconds(config: dict[str, Any], repeats: int) -> dict[str, float]:
    """Median seconds of one local epoch on client 0: DP-SGD (TF Privacy's vectorised optimizer)
    on Poisson batches and on shuffled fixed-size batches, and without DP-SGD, alternated epoch
    by epoch."""
    import dataclasses

    from fl_app.client import node_client
    from fl_app.config.settings import Settings
    from fl_app.task.compiled_loop import loop_for
    from fl_app.task.data import client_data
    from fl_app.task.keras_client import reset_optimizer

    settings = Settings.from_run_config(config)
    data = client_data(settings, 0)
    models = {}
    dp_key = node_client.dp_sgd_key(dataclasses.replace(settings, dp_sgd_vectorized=True, dp_sgd_microbatches=0))
    keys = {"dp poisson": (*dp_key[:4], "poisson"), "dp shuffle": (*dp_key[:4], "shuffle"), "plain": None}
    for label, key in keys.items():
        model, _ = node_client.compiled_model(
            settings.model,
            tuple(data.x_train.shape[1:]),
            data.num_classes,
            settings.optimizer,
            settings.learning_rate,
            settings.seed,
            settings.client_threads,
            key,
        )
        models[label] = model
    seconds: dict[str, list[float]] = {label: [] for label in models}
    for i in range(repeats + 1):
        for label, model in models.items():
            reset_optimizer(model.optimizer)
            batches = model.optimizer.poisson_batches if label == "dp poisson" else None
            started = time.perf_counter()
            loop_for(model).fit(
                data.x_train, data.y_train, epochs=1, batch_size=settings.batch_size, seed=i, epoch_batches=batches
            )
            if i > 0:  # the first epoch traces the graph
                seconds[label].append(time.perf_counter() - started)
    return {label: statistics.median(values) for label, values in seconds.items()}


def final_accuracy(config: dict[str, Any]) -> tuple[float, float, float | None]:
    """(final centralized accuracy, wall seconds, the history's dp-sgd-epsilon-max)."""
    from fl_app.simulation.local_grid import run_local_federation

    started = time.perf_counter()
    _, history = run_local_federation(config)
    return (
        history[-1].centralized_accuracy,
        time.perf_counter() - started,
        history[-1].extra.get("dp-sgd-epsilon-max"),
    )


def measure(args: argparse.Namespace, setting: dict[str, Any]) -> dict[str, Any]:
    private = federation_config(args, setting, args.noise)
    accuracy, seconds, reported = final_accuracy(private)
    plain_accuracy, plain_seconds, _ = final_accuracy(federation_config(args, setting, 0.0))
    epsilon_rdp, n = largest_epsilon(private, "rdp")
    epsilon_pld, _ = largest_epsilon(private, "pld")
    times = epoch_seconds(private, args.timing_epochs)
    return {
        **setting,
        "partitioner": args.partitioner,
        "test-fraction": args.test_fraction,
        "sampling": args.sampling,
        "z": args.noise,
        "clip": args.clip,
        "accuracy": round(accuracy, 4),
        "non-private accuracy": round(plain_accuracy, 4),
        "epsilon (RDP)": round(epsilon_rdp, 3),
        "epsilon (PLD)": round(epsilon_pld, 3),
        "history epsilon": round(reported, 3) if reported is not None else None,
        "smallest client n": n,
        "steps": setting["rounds"] * setting["epochs"] * -(-n // setting["batch"]),
        "epoch s (DP poisson)": round(times["dp poisson"], 5),
        "epoch s (DP shuffle)": round(times["dp shuffle"], 5),
        "epoch s (plain)": round(times["plain"], 5),
        "epoch ratio": round(times[f"dp {args.sampling}"] / times["plain"], 2),
        "run s (DP)": round(seconds, 1),
        "run s (plain)": round(plain_seconds, 1),
    }


def settings_grid(args: argparse.Namespace) -> list[dict[str, Any]]:
    lrs: dict[str, list[float]] = {}
    for item in args.lrs:
        name, values = item.split(":")
        lrs[name] = [float(v) for v in values.split(",")]
    grid = []
    for model, optimizer, batch, epochs, rounds in itertools.product(
        args.models.split(","),
        args.optimizers.split(","),
        _ints(args.batch_sizes),
        _ints(args.epochs),
        _ints(args.rounds),
    ):
        for lr in lrs.get(optimizer, []):
            grid.append(
                {"model": model, "optimizer": optimizer, "lr": lr, "batch": batch, "epochs": epochs, "rounds": rounds}
            )
    return grid


def write_table(out: Path, rows: list[dict[str, Any]]) -> None:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join("" if row.get(k) is None else str(row.get(k)) for k in keys) + " |" for row in rows]
    (out / "results.md").write_text("\n".join(lines) + "\n")


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/dp_sgd_sweep")
    parser.add_argument("--models", default="logreg")
    parser.add_argument("--optimizers", default="adam")
    parser.add_argument("--lrs", nargs="+", default=["adam:0.2"], help="optimizer:lr1,lr2 ...")
    parser.add_argument("--batch-sizes", default="16")
    parser.add_argument("--epochs", default="1")
    parser.add_argument("--rounds", default="10")
    parser.add_argument("--partitioner", default="iid")
    parser.add_argument(
        "--test-fraction",
        type=float,
        default=0.0,
        help="each client's local test share (0: the server's held-out set evaluates)",
    )
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--noise", type=float, default=1.1)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--microbatches", type=int, default=0, help="> 0 needs --sampling shuffle")
    parser.add_argument("--sampling", choices=("poisson", "shuffle"), default="poisson", help="dp-sgd-sampling")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--timing-epochs", type=int, default=20)
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    for setting in settings_grid(args):
        row = measure(args, setting)
        rows.append(row)
        with results.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        write_table(out, rows)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
