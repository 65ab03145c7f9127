"""Robustness matrix: aggregation rules x Byzantine attacks, final accuracy on digits.

Every cell is a whole federation run in this process through the real ClientApp handlers
(:func:`fl_app.simulation.local_grid.run_local_federation`, no Ray, no ``flwr run``): ``num-partitions``
IID clients (default 20), a fraction of them Byzantine, ``num-server-rounds`` 20 rounds of one
local epoch each (the same protocol for every cell; ``--rounds`` changes it for all), one aggregation rule of
:class:`strategies.aggregation.strategy.AggregationStrategy` (the ``mean`` row with ``num-examples`` weights is
FedAvg; omniscient attacks need our strategy), and the final model evaluated once on the server's
held-out test set. Rule parameters follow the number of attackers ``a = floor(fraction * n)``:

* trimmed mean: beta = a / n (trims a values at each end);
* Krum, Multi-Krum: f = a (Multi-Krum averages the n - f best);
* Bulyan: f = a, capped at (n - 3) / 4 since Bulyan needs n >= 4f + 3 (the table marks a cap
  with ``*``: with 20 clients and 6 attackers it runs with f = 4);
* geometric median: Weiszfeld, ``geometric-median-iterations`` steps at most;
* centered clipping: ``centered-clipping-tau`` (tau), 3 iterations.

Results go to a JSON file after every cell (a rerun skips the cells already there, so an
interrupted matrix resumes), then a markdown table per fraction and a heatmap PNG per fraction.

    uv run python scripts/robustness.py                       # the whole matrix (long)
    uv run python scripts/robustness.py --fractions 0.2 --rules mean,median --attacks none,sign-flip
    uv run python scripts/robustness.py --report-only          # table + heatmaps from the JSON
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RULES = ("mean", "median", "trimmed-mean", "krum", "multi-krum", "bulyan", "geometric-median", "centered-clipping")
ATTACKS = (
    "none",
    "label-flip",
    "sign-flip",
    "gaussian",
    "scaling",
    "alie",
    "ipm",
    "nan",
    "wrong-shapes",
    "min-max",
    "min-sum",
    "fang-trimmed-mean",
    "fang-krum",
    "mimic",
)
FRACTIONS = (0.1, 0.2, 0.3)

BASE_CONFIG: dict[str, Any] = {
    "dataset": "digits",
    "partitioner": "iid",
    "num-partitions": 20,
    "model": "mlp",
    "local-epochs": 1,
    "batch-size": 16,
    "learning-rate": 0.01,
    "optimizer": "adam",
    "num-server-rounds": 20,
    "fraction-train": 1.0,
    "min-train-clients": 20,
    "min-available-clients": 20,
    "fraction-evaluate": 0.01,
    "min-evaluate-clients": 0,  # no federated evaluation: final central only
    "strategy": "robust",
    "seed": 42,
    "attack-allow-excess": True,  # the matrix measures every rule, also beyond the attackers it tolerates
}


def parse_overrides(text: str) -> dict[str, Any]:
    """``"k=v k2=v2"`` in TOML value syntax, as ``flwr run -c`` takes it."""
    return tomllib.loads("\n".join(text.split())) if text else {}


def cell_config(rule: str, attack: str, fraction: float, base: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The run config of one cell, and a note on the rule's parameters (e.g. Bulyan's capped f)."""
    n = int(base["num-partitions"])
    config = dict(base)
    config["aggregation-rule"] = rule
    config["client-weighting"] = "num-examples" if rule == "mean" else "uniform"
    if attack != "none":
        config.update({"attack": attack, "attack-fraction": fraction})
    # the rule's parameters follow the attacker count of the fraction (also in the 'none' column)
    a = math.floor(fraction * n + 1e-9)
    note = ""
    if rule == "trimmed-mean":
        config["trimmed-mean-beta"] = a / n
        note = f"beta={a / n:g}"
    elif rule in ("krum", "multi-krum"):
        config["krum-f"] = a
        note = f"f={a}"
    elif rule == "bulyan":
        f = min(a, (n - 3) // 4)
        config["bulyan-f"] = f
        note = f"f={f}" + (f" (capped from {a}: n >= 4f+3)" if f < a else "")
    elif rule == "centered-clipping":
        note = f"tau={config.get('centered-clipping-tau', 1.0)}"
    return config, note


def key_of(rule: str, attack: str, fraction: float) -> str:
    return f"{fraction:g}|{rule}|{attack}"


class FinalEvaluator:
    """The server's held-out test set and one compiled model, built once per process."""

    def __init__(self, config: dict[str, Any]) -> None:
        import tensorflow as tf

        from fl_app.config.settings import Settings
        from fl_app.server.evaluation import CentralEvaluator, model_spec
        from fl_app.task.models import build_model

        settings = Settings.from_run_config(config)
        input_shape, num_classes, test_set = model_spec(settings)
        tf.keras.utils.set_random_seed(settings.seed)
        self.evaluate = CentralEvaluator(
            build_model(settings.model, input_shape, num_classes, settings.seed), *test_set
        )

    def __call__(self, arrays) -> tuple[float, float]:
        result = self.evaluate(0, arrays)
        return float(result["accuracy"]), float(result["loss"])


def run_cell(config: dict[str, Any], evaluator: FinalEvaluator) -> dict[str, Any]:
    import numpy as np

    from fl_app.simulation.local_grid import run_local_federation

    started = time.perf_counter()
    arrays, history = run_local_federation(config, evaluate_centrally=False)
    seconds = time.perf_counter() - started
    finite = all(np.isfinite(a).all() for a in arrays.to_numpy_ndarrays())
    accuracy, loss = evaluator(arrays) if finite else (float("nan"), float("nan"))
    rounds = [r for r in history if r.round > 0]
    return {
        "accuracy": accuracy,
        "loss": loss,
        "seconds": round(seconds, 1),
        "rounds": len(rounds),
        "skipped-rounds": sum(int(r.extra.get("round-skipped", 0)) for r in rounds),
        "rejected-replies": sum(int(r.extra.get("rejected-replies", 0)) for r in rounds),
        "update-norm-last": rounds[-1].extra.get("update-norm") if rounds else None,
    }


def load_results(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {"cells": {}}


def save_results(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _present(results: dict[str, Any], fraction: float, index: int) -> list[str]:
    cells = results["cells"]
    return [
        name
        for name in (RULES, ATTACKS)[index]
        if any(key.split("|")[0] == f"{fraction:g}" and key.split("|")[1 + index] == name for key in cells)
    ]


def _protocol(results: dict[str, Any]) -> str:
    """The protocol every cell shares, e.g. '20 rounds x 1 local epoch'."""
    config = results.get("config", {})
    return (
        f"{config.get('num-server-rounds', '?')} rounds x {config.get('local-epochs', '?')} local epoch(s), "
        f"final accuracy"
    )


def markdown_table(results: dict[str, Any], fraction: float) -> str:
    """Rows: rules; columns: attacks; cells: final accuracy ('…' where the cell has not run)."""
    cells = results["cells"]
    rules, attacks = _present(results, fraction, 0), _present(results, fraction, 1)
    lines = [
        f"| rule \\ attack (fraction {fraction:g}, {_protocol(results)}) | " + " | ".join(attacks) + " |",
        "|---|" + "---|" * len(attacks),
    ]
    for rule in rules:
        row = []
        for attack in attacks:
            cell = cells.get(key_of(rule, attack, fraction))
            if cell is None:
                row.append("…")
                continue
            value = "diverged" if math.isnan(cell["accuracy"]) else f"{cell['accuracy']:.3f}"
            row.append(value + ("*" if "capped" in cell.get("note", "") else ""))
        lines.append(f"| {rule} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def heatmap(results: dict[str, Any], fraction: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cells = results["cells"]
    rules, attacks = _present(results, fraction, 0), _present(results, fraction, 1)
    grid = np.full((len(rules), len(attacks)), np.nan)
    for i, rule in enumerate(rules):
        for j, attack in enumerate(attacks):
            cell = cells.get(key_of(rule, attack, fraction))
            if cell is not None:
                grid[i, j] = cell["accuracy"]
    fig, ax = plt.subplots(figsize=(1.1 * len(attacks) + 2.5, 0.55 * len(rules) + 1.8))
    image = ax.imshow(np.nan_to_num(grid, nan=0.0), vmin=0.0, vmax=1.0, cmap="RdYlGn")
    ax.set_xticks(range(len(attacks)), attacks, rotation=35, ha="right")
    ax.set_yticks(range(len(rules)), rules)
    for i in range(len(rules)):
        for j in range(len(attacks)):
            text = "–" if np.isnan(grid[i, j]) else f"{grid[i, j]:.2f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=8)
    n = results.get("num-partitions", 20)
    rounds = results.get("config", {}).get("num-server-rounds", "?")
    ax.set_title(
        f"Final accuracy, digits, {n} IID clients, {math.floor(fraction * n + 1e-9)} attackers, {rounds} rounds"
    )
    fig.colorbar(image, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(results: dict[str, Any], fractions: list[float], out_dir: Path) -> str:
    parts = []
    out_dir.mkdir(parents=True, exist_ok=True)
    for fraction in fractions:
        if not _present(results, fraction, 0):
            continue
        parts.append(markdown_table(results, fraction))
        png = out_dir / f"robustness_{fraction:g}.png"
        heatmap(results, fraction, png)
        parts.append(f"\n(heatmap: {png})\n")
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fractions", default=",".join(f"{f:g}" for f in FRACTIONS))
    parser.add_argument("--rules", default=",".join(RULES))
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument("--rounds", type=int, default=BASE_CONFIG["num-server-rounds"])
    parser.add_argument("-c", "--run-config", default="", help="overrides of the base config, as for flwr run -c")
    parser.add_argument("--out-dir", default=str(ROOT / "outputs" / "robustness"))
    parser.add_argument("--report-only", action="store_true", help="only print the table and draw heatmaps")
    parser.add_argument("--merge", default="", help="other results.json files (commas) to merge into the report")
    parser.add_argument("--threads", type=int, default=1, help="TensorFlow threads (1 on a shared machine)")
    args = parser.parse_args()

    fractions = [float(f) for f in args.fractions.split(",")]
    rules = [r.strip() for r in args.rules.split(",")]
    attacks = [a.strip() for a in args.attacks.split(",")]
    for name, allowed, kind in [(r, RULES, "rule") for r in rules] + [(a, ATTACKS, "attack") for a in attacks]:
        if name not in allowed:
            parser.error(f"unknown {kind} '{name}'; known: {', '.join(allowed)}")
    out_dir = Path(args.out_dir)
    path = out_dir / "results.json"
    results = load_results(path)
    for other in filter(None, args.merge.split(",")):  # e.g. cells run by a second process
        merged = load_results(Path(other))
        for key, cell in merged["cells"].items():
            results["cells"].setdefault(key, cell)
        for key in ("config", "num-partitions"):
            if key in merged:
                results.setdefault(key, merged[key])
    base = {**BASE_CONFIG, "num-server-rounds": args.rounds, **parse_overrides(args.run_config)}

    if not args.report_only:
        import tensorflow as tf

        import fl_app  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)

        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
        results.setdefault("config", base)
        results["num-partitions"] = base["num-partitions"]
        evaluator = FinalEvaluator(base)
        for fraction in fractions:
            for rule in rules:
                for attack in attacks:
                    key = key_of(rule, attack, fraction)
                    if key in results["cells"]:
                        continue
                    config, note = cell_config(rule, attack, fraction, base)
                    try:
                        cell = run_cell(config, evaluator)
                    except Exception as err:  # a configuration that cannot run is a result too
                        cell = {"accuracy": float("nan"), "error": f"{type(err).__name__}: {err}"}
                    cell["note"] = note
                    results["cells"][key] = cell
                    save_results(path, results)
                    print(
                        f"[robustness] {key}: acc {cell['accuracy']:.4f} ({cell.get('seconds', '-')} s) {note}",
                        flush=True,
                    )
    print(report(results, fractions, out_dir))


if __name__ == "__main__":
    main()
