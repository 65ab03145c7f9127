"""Worst-case robustness benchmark: configurations x Byzantine attacks x partitions x fractions x seeds.

Every cell is a whole federation run in this process through the real ClientApp handlers
(:func:`fl_app.simulation.local_grid.run_local_federation`, no Ray, no ``flwr run``): ``num-partitions``
digits clients (default 20) split IID or Dirichlet(0.3), a fraction of them Byzantine,
``num-server-rounds`` 20 rounds of one local epoch each (the same protocol for every cell; ``--rounds``
changes it for all), one configuration of :class:`strategies.aggregation.strategy.AggregationStrategy`
and the final model evaluated once on the server's held-out test set (which the seed draws).

A *configuration* is a rule, optionally after pre-aggregation steps: ``median``, ``median+nnm``,
``centered-clipping+bucketing``, ``trimmed-mean+arc,nnm`` (the steps after ``+``, in order, as the
``pre-aggregation`` key takes them). The ``mean`` rule weighs clients by ``num-examples`` (FedAvg);
the robust rules weigh them uniformly. The rules' parameters are the project's own: the script sets
``byzantine-fraction`` to the attacker fraction and leaves ``trimmed-mean-beta``, ``krum-f``,
``bulyan-f``, ``dnc-f`` and ``pre-aggregation-f`` at -1, so that they are derived as for any user
(:func:`strategies.robust.tolerance.derived_params`; with 20 clients and 0.2: f = 4, beta = 0.2).

The attacks are those of :data:`fl_app.attacks.catalogue.ATTACKS` plus ``none`` (clean). The
``backdoor`` attack boosts its update (model replacement) in the last round
(``backdoor-boost-rounds``, gamma = n / (eta c)) and its cells also report the backdoor success
on the triggered test set.

Results go to a JSON file after every cell (a rerun skips the cells already there, so an
interrupted matrix resumes; ``--merge`` adds the cells of other processes' files to the report).
The report gives, per partition and fraction, a table of each cell as mean ± std over seeds
(min–max), each configuration's worst case over attacks (the lowest seed-mean, as ByzFL's
benchmark reports it, and the lowest single run), the backdoor success next to the main-task
accuracy, and a heatmap PNG.

    uv run python scripts/robustness.py --partitions dir0.3 --fractions 0.2 --configs median+nnm --seeds 0,1,2
    uv run python scripts/robustness.py --report-only --merge other/results.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fl_app.attacks.catalogue import ATTACKS as CATALOGUE  # noqa: E402  (pure NumPy, no TensorFlow)
from strategies.robust.rules import RULES as RULE_FUNCTIONS  # noqa: E402
from strategies.robust.tolerance import derived_params  # noqa: E402

RULES = tuple(RULE_FUNCTIONS)  # every aggregation rule the project has, in its registry's order
PRE_AGGREGATIONS = ("", "nnm", "bucketing")
"""The pre-aggregation variants of every rule in the full matrix ('' is none)."""
NOT_MEANINGFUL = frozenset({("krum", "bucketing"), ("multi-krum", "bucketing"), ("bulyan", "bucketing")})
"""Bucketing (s = 2) leaves n / 2 = 10 rows, fewer than Krum's 2f + 3 and Bulyan's 4f + 3 with the f
that 0.1 or 0.2 of 20 clients derive: the project refuses these configurations at start-up."""
ATTACKS: tuple[str, ...] = ("none", *CATALOGUE)
"""``none`` (clean) and every attack of the catalogue, in its order."""
PARTITIONS: dict[str, dict[str, Any]] = {
    "iid": {"partitioner": "iid"},
    "dir0.3": {"partitioner": "dirichlet", "dirichlet-alpha": 0.3},
}
FRACTIONS = (0.1, 0.2)
SEEDS = (0, 1, 2)

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


def all_configs(rules: Iterable[str] = RULES, steps: Iterable[str] = PRE_AGGREGATIONS) -> list[str]:
    """Every rule with every pre-aggregation variant (``rule`` or ``rule+steps``) but those of
    :data:`NOT_MEANINGFUL`."""
    return [
        rule + (f"+{step}" if step else "") for rule in rules for step in steps if (rule, step) not in NOT_MEANINGFUL
    ]


def split_config(name: str) -> tuple[str, str]:
    """``'median+nnm'`` -> ``('median', 'nnm')``; ``'median'`` -> ``('median', '')``."""
    rule, _, steps = name.partition("+")
    return rule, steps


def parse_overrides(text: str) -> dict[str, Any]:
    """``"k=v k2=v2"`` in TOML value syntax, as ``flwr run -c`` takes it."""
    return tomllib.loads("\n".join(text.split())) if text else {}


def cell_config(
    name: str,
    attack: str,
    fraction: float,
    base: Mapping[str, Any],
    *,
    partition: str = "iid",
    seed: int | None = None,
) -> tuple[dict[str, Any], str]:
    """The run config of one cell, and a note on the parameters the project derives for its rule.

    The rule's parameters come from ``byzantine-fraction`` = ``fraction`` (also in the ``none``
    column), as the project derives them for a user who names the rule.
    """
    rule, steps = split_config(name)
    n = int(base["num-partitions"])
    config = {**base, **PARTITIONS[partition]}
    if seed is not None:
        config["seed"] = seed
    config["aggregation-rule"] = rule
    config["client-weighting"] = "num-examples" if rule == "mean" else "uniform"
    config["byzantine-fraction"] = fraction
    for key in ("trimmed-mean-beta", "krum-f", "bulyan-f", "dnc-f", "pre-aggregation-f"):
        config.pop(key, None)  # -1: derived from byzantine-fraction
    if steps:
        config["pre-aggregation"] = steps
    if attack != "none":
        config.update({"attack": attack, "attack-fraction": fraction})
    if attack == "backdoor":
        config["backdoor-boost-rounds"] = str(config["num-server-rounds"])
    derived = derived_params(n, fraction)
    notes = {
        "trimmed-mean": f"beta={derived.trimmed_mean_beta:g}",
        "krum": f"f={derived.krum_f}",
        "multi-krum": f"f={derived.krum_f}",
        "bulyan": f"f={derived.bulyan_f}"
        + (f" (capped from {derived.count})" if derived.bulyan_f < derived.count else ""),
        "dnc": f"f={derived.majority_f}",
    }
    note = notes.get(rule, "")
    if any(step in ("nnm", "arc") for step in steps.split(",")):
        note = (note + " " if note else "") + f"pre-f={derived.majority_f}"
    return config, note


def key_of(partition: str, fraction: float, name: str, attack: str, seed: int) -> str:
    """The results JSON key of one cell."""
    return f"{partition}|{fraction:g}|{name}|{attack}|{seed}"


def parse_key(key: str) -> tuple[str, float, str, str, int]:
    """The inverse of :func:`key_of`."""
    partition, fraction, name, attack, seed = key.split("|")
    return partition, float(fraction), name, attack, int(seed)


@dataclass(frozen=True)
class Summary:
    """One cell over its seeds: mean, std (0 for one seed), min, max of a metric, and the seeds run."""

    mean: float
    std: float
    low: float
    high: float
    seeds: int

    def text(self, digits: int = 3) -> str:
        """``'0.912 ± 0.010 (0.900–0.925)'``, ``'diverged'`` if every seed diverged."""
        if math.isnan(self.mean):
            return "diverged"
        if self.seeds == 1:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f} ({self.low:.{digits}f}–{self.high:.{digits}f})"


def summarize(values: Sequence[float]) -> Summary:
    """Mean, sample std, min and max of ``values``; a diverged run (NaN) counts as accuracy 0."""
    clean = [0.0 if math.isnan(v) else v for v in values]
    if not clean:
        return Summary(math.nan, math.nan, math.nan, math.nan, 0)
    std = statistics.stdev(clean) if len(clean) > 1 else 0.0
    return Summary(statistics.fmean(clean), std, min(clean), max(clean), len(clean))


def collect(
    results: Mapping[str, Any], partition: str, fraction: float, metric: str = "accuracy"
) -> dict[tuple[str, str], list[float]]:
    """``(configuration, attack) -> [metric per seed]`` of one partition and fraction."""
    grid: dict[tuple[str, str], list[float]] = {}
    for key, cell in sorted(results["cells"].items()):
        p, f, name, attack, _ = parse_key(key)
        if p == partition and math.isclose(f, fraction) and metric in cell:
            grid.setdefault((name, attack), []).append(float(cell[metric]))
    return grid


def _ordered(names: Iterable[str], order: Sequence[str]) -> list[str]:
    rank = {name: i for i, name in enumerate(order)}
    return sorted(set(names), key=lambda name: (rank.get(name, len(order)), name))


def _config_order() -> list[str]:
    return all_configs(RULES, (*PRE_AGGREGATIONS, "arc", "arc,nnm", "nnm,bucketing"))


@dataclass(frozen=True)
class WorstCase:
    """A configuration's clean accuracy and its worst case over the attacks run.

    ``worst`` is the attack with the lowest seed-mean accuracy (ByzFL's worst case);
    ``worst_run`` the lowest accuracy of any single run (attack, seed) under attack.
    """

    name: str
    clean: Summary | None
    worst_attack: str
    worst: Summary
    worst_run: float
    attacks: int


def worst_cases(results: Mapping[str, Any], partition: str, fraction: float) -> list[WorstCase]:
    """Per configuration, its worst case over the attacks it ran (backdoor excluded: its failure is
    the backdoor success, reported apart), sorted from the best worst case down."""
    grid = collect(results, partition, fraction)
    out = []
    for name in {n for n, _ in grid}:
        attacked = {a: summarize(v) for (n, a), v in grid.items() if n == name and a not in ("none", "backdoor")}
        if not attacked:
            continue
        attack, worst = min(attacked.items(), key=lambda item: item[1].mean)
        runs = [0.0 if math.isnan(v) else v for (n, a), vs in grid.items() if n == name and a in attacked for v in vs]
        clean = summarize(grid[(name, "none")]) if (name, "none") in grid else None
        out.append(WorstCase(name, clean, attack, worst, min(runs), len(attacked)))
    return sorted(out, key=lambda w: -w.worst.mean)


def worst_case_table(results: Mapping[str, Any], partition: str, fraction: float) -> str:
    """Markdown: per configuration, clean accuracy, worst attack, its accuracy, the drop and the lowest run."""
    lines = [
        f"| configuration ({partition}, fraction {fraction:g}, {_protocol(results)}) | clean | worst attack "
        "| worst-case accuracy | drop from clean | lowest single run | attacks run |",
        "|---|---|---|---|---|---|---|",
    ]
    for w in worst_cases(results, partition, fraction):
        clean = w.clean.text() if w.clean else "…"
        drop = f"{w.clean.mean - w.worst.mean:+.3f}" if w.clean else "…"
        lines.append(
            f"| {w.name} | {clean} | {w.worst_attack} | {w.worst.text()} | {drop} | {w.worst_run:.3f} | {w.attacks} |"
        )
    return "\n".join(lines)


def markdown_table(results: Mapping[str, Any], partition: str, fraction: float) -> str:
    """Rows: configurations; columns: attacks; cells: final accuracy, mean ± std (min–max) over seeds."""
    grid = collect(results, partition, fraction)
    names = _ordered((n for n, _ in grid), _config_order())
    attacks = _ordered((a for _, a in grid), ATTACKS)
    lines = [
        f"| configuration \\ attack ({partition}, fraction {fraction:g}) | " + " | ".join(attacks) + " |",
        "|---|" + "---|" * len(attacks),
    ]
    for name in names:
        row = [summarize(grid[(name, a)]).text() if (name, a) in grid else "…" for a in attacks]
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def backdoor_table(results: Mapping[str, Any], partition: str, fraction: float) -> str:
    """Markdown: backdoor success next to main-task accuracy under the boosted backdoor, and clean accuracy."""
    accuracy = collect(results, partition, fraction)
    success = collect(results, partition, fraction, "backdoor-success")
    lines = [
        f"| configuration ({partition}, fraction {fraction:g}, boosted backdoor) | clean accuracy "
        "| accuracy under backdoor | backdoor success | backdoor success of the clean model |",
        "|---|---|---|---|---|",
    ]
    names = _ordered((n for n, a in success if a == "backdoor"), _config_order())
    for name in names:
        clean = summarize(accuracy[(name, "none")]).text() if (name, "none") in accuracy else "…"
        main = summarize(accuracy.get((name, "backdoor"), [])).text()
        base = summarize(success[(name, "none")]).text() if (name, "none") in success else "…"
        lines.append(f"| {name} | {clean} | {main} | {summarize(success[(name, 'backdoor')]).text()} | {base} |")
    return "\n".join(lines) if names else ""


def _protocol(results: Mapping[str, Any]) -> str:
    """The protocol every cell shares, e.g. '20 rounds x 1 local epoch(s)'."""
    config = results.get("config", {})
    return f"{config.get('num-server-rounds', '?')} rounds x {config.get('local-epochs', '?')} local epoch(s)"


def heatmap(results: Mapping[str, Any], partition: str, fraction: float, path: Path) -> None:
    """Seed-mean accuracy per configuration and attack, with the worst case as the last column."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    grid = collect(results, partition, fraction)
    names = _ordered((n for n, _ in grid), _config_order())
    attacks = _ordered((a for _, a in grid), ATTACKS)
    worst = {w.name: w.worst.mean for w in worst_cases(results, partition, fraction)}
    columns = [*attacks, "worst case"]
    values = np.full((len(names), len(columns)), np.nan)
    for i, name in enumerate(names):
        for j, attack in enumerate(attacks):
            if (name, attack) in grid:
                values[i, j] = summarize(grid[(name, attack)]).mean
        values[i, -1] = worst.get(name, np.nan)
    fig, ax = plt.subplots(figsize=(0.95 * len(columns) + 3.0, 0.5 * len(names) + 1.8))
    cmap = plt.get_cmap("RdYlGn").copy()
    cmap.set_bad("lightgrey")  # cells not run
    image = ax.imshow(np.ma.masked_invalid(values), vmin=0.0, vmax=1.0, cmap=cmap, aspect="auto")
    ax.set_xticks(range(len(columns)), columns, rotation=40, ha="right")
    ax.set_yticks(range(len(names)), names)
    for i in range(len(names)):
        for j in range(len(columns)):
            text = "–" if np.isnan(values[i, j]) else f"{values[i, j]:.2f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=7)
    n = int(results.get("config", {}).get("num-partitions", 20))
    ax.set_title(
        f"Final accuracy (seed mean), digits, {n} clients {partition}, "
        f"{math.floor(fraction * n + 1e-9)} attackers, {_protocol(results)}",
        fontsize=9,
    )
    fig.colorbar(image, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(results: Mapping[str, Any], out_dir: Path, *, draw: bool = True) -> str:
    """Every table of every (partition, fraction) present, and their heatmaps under ``out_dir``."""
    present = sorted({parse_key(k)[:2] for k in results["cells"]})
    parts = []
    for partition, fraction in present:
        parts.append(f"### {partition}, attacker fraction {fraction:g}\n")
        if worst_cases(results, partition, fraction):
            parts += [worst_case_table(results, partition, fraction), ""]
        parts += [markdown_table(results, partition, fraction), ""]
        backdoor = backdoor_table(results, partition, fraction)
        if backdoor:
            parts += [backdoor, ""]
        if draw:
            out_dir.mkdir(parents=True, exist_ok=True)
            png = out_dir / f"robustness_{partition}_{fraction:g}.png"
            heatmap(results, partition, fraction, png)
            parts.append(f"(heatmap: {png})\n")
    return "\n".join(parts)


class FinalEvaluator:
    """The server's held-out test set (drawn with the seed) and one compiled model, built once per
    (seed, backdoor) and process; with a backdoor also the triggered test set."""

    def __init__(self) -> None:
        self._cache: dict[tuple[Any, ...], Callable[..., Any]] = {}

    def __call__(self, config: Mapping[str, Any], arrays: Any) -> dict[str, float]:
        """Accuracy and loss (and ``backdoor-success`` under a backdoor) of ``arrays``."""
        import tensorflow as tf

        from fl_app.config.settings import Settings
        from fl_app.server.evaluation import CentralEvaluator, model_spec
        from fl_app.task.models import build_model

        # every cell measures the backdoor success, the clean ones too (the rate at which a model
        # without a backdoor already classifies triggered images as the target: the baseline)
        settings = Settings.from_run_config({**config, "attack": "backdoor", "attack-fraction": 0.0})
        key = (settings.seed, settings.partitioner, settings.dirichlet_alpha)
        if key not in self._cache:
            input_shape, spec, test_set = model_spec(settings)
            tf.keras.utils.set_random_seed(settings.seed)
            model = build_model(settings.model, input_shape, spec, settings.seed)
            if test_set is None:
                raise ValueError(f"dataset {settings.dataset!r} has no server test set to evaluate on")
            x, y = test_set
            self._cache[key] = CentralEvaluator.from_settings(settings, model, x, y, spec)
        result = self._cache[key](0, arrays)
        return {name: float(value) for name, value in result.items() if isinstance(value, int | float)}


def run_cell(config: Mapping[str, Any], evaluator: FinalEvaluator) -> dict[str, Any]:
    """One federation run and its final evaluation."""
    import numpy as np

    from fl_app.simulation.local_grid import run_local_federation

    started = time.perf_counter()
    arrays, history = run_local_federation(config, evaluate_centrally=False)
    seconds = time.perf_counter() - started
    finite = all(np.isfinite(a).all() for a in arrays.to_numpy_ndarrays())
    metrics = evaluator(config, arrays) if finite else {"accuracy": float("nan"), "loss": float("nan")}
    rounds = [r for r in history if r.round > 0]
    return {
        **metrics,
        "seconds": round(seconds, 1),
        "rounds": len(rounds),
        "skipped-rounds": sum(int(r.extra.get("round-skipped", 0)) for r in rounds),
        "rejected-replies": sum(int(r.extra.get("rejected-replies", 0)) for r in rounds),
        "update-norm-last": rounds[-1].extra.get("update-norm") if rounds else None,
    }


def load_results(path: Path) -> dict[str, Any]:
    """The results JSON, or an empty one."""
    return json.loads(path.read_text()) if path.exists() else {"cells": {}}


def save_results(path: Path, results: Mapping[str, Any]) -> None:
    """Write atomically (a rename), so an interrupted run never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(";" if ";" in text else ",") if name.strip()] if text else []


def main() -> None:
    """Run the cells not yet in the results JSON, then print the report."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--partitions", default=",".join(PARTITIONS))
    parser.add_argument("--fractions", default=",".join(f"{f:g}" for f in FRACTIONS))
    parser.add_argument(
        "--configs",
        default=";".join(all_configs()),
        help="configurations, separated by ';' (or ',' when none has several steps): rule or rule+steps",
    )
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    parser.add_argument("--rounds", type=int, default=BASE_CONFIG["num-server-rounds"])
    parser.add_argument("-c", "--run-config", default="", help="overrides of the base config, as for flwr run -c")
    parser.add_argument("--out-dir", default=str(ROOT / "outputs" / "robustness"))
    parser.add_argument("--report-only", action="store_true", help="only print the tables and draw heatmaps")
    parser.add_argument("--no-heatmaps", action="store_true")
    parser.add_argument("--merge", default="", help="other results.json files (commas) to merge into the report")
    parser.add_argument("--threads", type=int, default=1, help="TensorFlow threads (1 on a shared machine)")
    args = parser.parse_args()

    partitions, attacks = _names(args.partitions), _names(args.attacks)
    fractions = [float(f) for f in _names(args.fractions)]
    configs, seeds = _names(args.configs), [int(s) for s in _names(args.seeds)]
    for name, allowed, kind in (
        [(p, tuple(PARTITIONS), "partition") for p in partitions]
        + [(split_config(c)[0], RULES, "rule") for c in configs]
        + [(a, ATTACKS, "attack") for a in attacks]
    ):
        if name not in allowed:
            parser.error(f"unknown {kind} '{name}'; known: {', '.join(allowed)}")
    out_dir = Path(args.out_dir)
    path = out_dir / "results.json"
    results = load_results(path)
    report_results: dict[str, Any] = {**results, "cells": dict(results["cells"])}
    for other in _names(args.merge):  # e.g. cells run by a second process
        merged = load_results(Path(other))
        for key, cell in merged["cells"].items():
            report_results["cells"].setdefault(key, cell)
        report_results.setdefault("config", merged.get("config", {}))
    base = {**BASE_CONFIG, "num-server-rounds": args.rounds, **parse_overrides(args.run_config)}

    if not args.report_only:
        import tensorflow as tf

        import fl_app  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)

        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
        results.setdefault("config", base)
        evaluator = FinalEvaluator()
        for seed in seeds:  # seeds outermost: a partial run has every cell at some seed
            for partition in partitions:
                for fraction in fractions:
                    for name in configs:
                        for attack in attacks:
                            key = key_of(partition, fraction, name, attack, seed)
                            if key in results["cells"]:
                                continue
                            config, note = cell_config(name, attack, fraction, base, partition=partition, seed=seed)
                            try:
                                cell = run_cell(config, evaluator)
                            except Exception as err:  # a configuration that cannot run is a result too
                                cell = {"accuracy": float("nan"), "error": f"{type(err).__name__}: {err}"}
                            cell["note"] = note
                            results["cells"][key] = report_results["cells"][key] = cell
                            save_results(path, results)
                            extra = f" backdoor {cell['backdoor-success']:.3f}" if "backdoor-success" in cell else ""
                            print(
                                f"[robustness] {key}: acc {cell['accuracy']:.4f}{extra} "
                                f"({cell.get('seconds', '-')} s) {note} {cell.get('error', '')}",
                                flush=True,
                            )
        report_results.setdefault("config", base)
    print(report(report_results, out_dir, draw=not args.no_heatmaps))


if __name__ == "__main__":
    main()
