"""Empirical privacy audit: a lower bound on epsilon from one run with canaries, beside the claim.

One-run auditing (Steinke, Nasr, Jagielski 2023, "Privacy Auditing with One (1) Training Run"):
``m`` canaries, each included with probability 1/2, one run of the mechanism as the app runs it,
an auditor who guesses from the released output which canaries were in, and the paper's bound
(:mod:`strategies.private.auditing`) turned into an empirical epsilon that holds with 95%
confidence. How each setting inserts and scores its canaries is in
:mod:`fl_app.simulation.privacy_audit`:

* ``central-fixed``, ``central-adaptive``, ``local-gaussian``: user-level DP-FedAvg
  (``strategy='dp-fedavg'``) built by ``build_dp_strategy`` and run in process by the app's round
  loop, on ``--clients`` ordinary digits clients (the real ClientApp, Keras training) plus
  ``--canaries`` canary clients whose Dirac updates sit on first-layer weights of pixels that are
  0 in every digit. The server step is scaled by (population / ordinary clients) so that the
  canaries, who count in the DP mean's fixed denominator, do not shrink the ordinary clients'
  step (post-processing: epsilon is unchanged);
* ``dp-sgd``: one DP-SGD client (the app's TF Privacy optimizer, Poisson batches) on the digits
  train split plus ``--canaries`` Dirac example canaries, on a logistic regression with one
  extra input feature per canary (the model is purpose-built; the optimizer and the client are
  the app's).

The claimed epsilon is the app's own accountant's (the history's ``epsilon``; the DP-SGD
client's ``dp-sgd-epsilon``); the accuracy is the centralised test accuracy of the model that
the audited run itself trained (canaries included).

    # the four settings at their defaults (4 minutes here, on 2 cores shared with other jobs)
    uv run python scripts/privacy_audit.py --json outputs/privacy_audit.json
    # one setting, fewer canaries and rounds
    uv run python scripts/privacy_audit.py --settings central-fixed --canaries 128 --rounds 5

A lower bound far below the claim is expected (one run with a few hundred canaries cannot
certify a large epsilon: with m canaries, r guesses all correct give at most about
log(r / log(1 / 0.05)) at delta -> 0); a lower bound *above* the claim means the claim is wrong.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

FEDERATED = ("central-fixed", "central-adaptive", "local-gaussian")
SETTINGS = (*FEDERATED, "dp-sgd")

BASE_CONFIG: dict[str, Any] = {
    "dataset": "digits",
    "partitioner": "iid",
    "model": "mlp",
    "local-epochs": 1,
    "batch-size": 32,
    "optimizer": "sgd",
    "learning-rate": 0.1,
    "min-train-clients": 1,
    "min-available-clients": 1,
    "fraction-evaluate": 1e-6,
    "min-evaluate-clients": 0,
    "test-fraction": 0.0,
    "strategy": "dp-fedavg",
    "dp-clip-norm": 1.0,
    "dp-delta": 1e-5,
}
"""Run-config keys common to the federated settings (``flwr run -c`` names)."""

DP_CONFIG: dict[str, dict[str, Any]] = {
    "central-fixed": {"dp-mode": "central", "fraction-train": 0.5, "dp-noise-multiplier": 1.5},
    "central-adaptive": {
        "dp-mode": "central",
        "fraction-train": 0.5,
        "dp-noise-multiplier": 1.5,
        "dp-clip-quantile": 0.5,
        "dp-clip-count-noise": 10.0,
    },
    "local-gaussian": {"dp-mode": "local-gaussian", "fraction-train": 1.0, "dp-noise-multiplier": 6.0},
}
"""Each federated setting's DP keys."""

DP_SGD_CONFIG: dict[str, Any] = {
    "dataset": "digits",
    "num-partitions": 1,
    "min-train-clients": 1,
    "min-available-clients": 1,
    "min-evaluate-clients": 0,
    "test-fraction": 0.0,
    "optimizer": "sgd",
    "learning-rate": 0.5,
    "batch-size": 256,
    "dp-sgd-noise-multiplier": 1.0,
    "dp-sgd-l2-clip": 1.0,
    "dp-sgd-sampling": "poisson",
    "dp-delta": 1e-5,
}
"""The DP-SGD client's run-config keys (``local-epochs`` is ``--dp-sgd-epochs``)."""

CANARY_SCALE = 10.0
"""A canary's update (or input) norm, in clip norms: far past the clip."""


@dataclasses.dataclass
class Row:
    """One line of the table."""

    setting: str
    claimed_epsilon: float
    epsilon_lower: float
    accuracy: float
    canaries: int
    guesses: int
    correct: int
    rounds: str
    seconds: float
    config: dict[str, Any]


def federated_row(name: str, args: argparse.Namespace) -> Row:
    """Audit one user-level setting on ``args.clients`` digits clients plus canary clients."""
    import tensorflow as tf

    from fl_app.config.settings import Settings
    from fl_app.server.evaluation import CentralEvaluator, model_spec
    from fl_app.simulation.local_grid import LocalGrid
    from fl_app.simulation.privacy_audit import Canaries, audit_federation, dead_input_coordinates
    from fl_app.task.data import load_digits_arrays
    from fl_app.task.models import build_model

    started = time.perf_counter()
    ordinary_config = {
        **BASE_CONFIG,
        **DP_CONFIG[name],
        "num-partitions": args.clients,
        "num-server-rounds": args.rounds,
        "seed": args.seed,
    }
    ordinary = Settings.from_run_config(ordinary_config)
    input_shape, num_classes, test_set = model_spec(ordinary)
    if test_set is None:
        raise ValueError("the digits data set has no server test split")
    tf.keras.utils.set_random_seed(args.seed)
    model = build_model(ordinary.model, input_shape, num_classes, args.seed)
    initial = model.get_weights()
    coordinates = dead_input_coordinates(load_digits_arrays()[0], initial[0].shape)
    if args.canaries > coordinates.size:
        raise SystemExit(
            f"--canaries {args.canaries}: the digits MLP has only {coordinates.size} weights of dead pixels"
        )
    rng = np.random.default_rng(args.seed)  # which canaries are in: the auditor's secret, not the DP noise
    canaries = Canaries.draw(rng.permutation(coordinates)[: args.canaries], CANARY_SCALE * ordinary.dp_clip_norm, rng)
    population = args.clients + args.canaries
    config = {**ordinary_config, "num-partitions": population, "server-learning-rate": population / args.clients}
    audit = audit_federation(
        Settings.from_run_config(config),
        LocalGrid(ordinary.to_run_config(), args.clients),
        initial,
        canaries,
        evaluate_fn=CentralEvaluator(model, *test_set),
    )
    accuracy = audit.history[-1].centralized_accuracy
    result = audit.result
    return Row(
        name,
        audit.claimed_epsilon,
        result.epsilon_lower,
        math.nan if accuracy is None else float(accuracy),
        result.canaries,
        result.guesses,
        result.correct,
        f"{sum(r.round > 0 for r in audit.history)} rounds",
        round(time.perf_counter() - started, 1),
        config,
    )


def dp_sgd_row(args: argparse.Namespace) -> Row:
    """Audit one DP-SGD client's fit with Dirac example canaries."""
    from fl_app.config.settings import Settings
    from fl_app.server.evaluation import model_spec
    from fl_app.simulation.privacy_audit import Canaries, audit_dp_sgd
    from fl_app.task.data import client_data

    started = time.perf_counter()
    config = {**DP_SGD_CONFIG, "local-epochs": args.dp_sgd_epochs, "seed": args.seed}
    settings = Settings.from_run_config(config)
    _, spec, test_set = model_spec(settings)
    num_classes = spec.num_classes
    if test_set is None:
        raise ValueError("the digits data set has no server test split")
    data = client_data(settings, 0)
    rng = np.random.default_rng(args.seed)
    canaries = Canaries.draw(np.arange(args.dp_sgd_canaries), CANARY_SCALE * settings.dp_sgd_l2_clip, rng)
    labels = rng.integers(0, num_classes, canaries.count)
    audit = audit_dp_sgd(settings, data.x_train, data.y_train, *test_set, canaries, labels, num_classes=num_classes)
    result = audit.result
    return Row(
        "dp-sgd",
        audit.claimed_epsilon,
        result.epsilon_lower,
        audit.accuracy,
        result.canaries,
        result.guesses,
        result.correct,
        f"{args.dp_sgd_epochs} epochs, {audit.examples} examples",
        round(time.perf_counter() - started, 1),
        config,
    )


def format_table(rows: Sequence[Row]) -> str:
    """The Markdown table: setting | claimed epsilon | empirical lower bound | accuracy, and the guesses."""
    lines = [
        "| setting | claimed ε (accountant) | empirical lower bound (95%) | accuracy | canaries | correct / guesses | run |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.setting} | {row.claimed_epsilon:.3g} | {row.epsilon_lower:.3g} | {row.accuracy:.3f} | "
            f"{row.canaries} | {row.correct} / {row.guesses} | {row.rounds}, {row.seconds:g} s |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--settings", default=",".join(SETTINGS), help=f"comma-separated, of {', '.join(SETTINGS)} (default: all)"
    )
    parser.add_argument("--canaries", type=int, default=256, help="canary clients per federated setting (<= 384)")
    parser.add_argument("--dp-sgd-canaries", type=int, default=500, help="canary examples of the DP-SGD client")
    parser.add_argument("--clients", type=int, default=200, help="ordinary digits clients per federated setting")
    parser.add_argument("--rounds", type=int, default=20, help="rounds per federated setting")
    parser.add_argument("--dp-sgd-epochs", type=int, default=10, help="local epochs of the DP-SGD client")
    parser.add_argument("--seed", type=int, default=0, help="data, model and canary seed (the DP noise stays secret)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows (with their run configs) here")
    args = parser.parse_args(argv)
    args.settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = sorted(set(args.settings) - set(SETTINGS))
    if unknown or not args.settings:
        parser.error(f"--settings: unknown {unknown or 'none given'}; choose from {', '.join(SETTINGS)}")
    for key in ("canaries", "dp_sgd_canaries", "clients", "rounds", "dp_sgd_epochs"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    rows = []
    for name in args.settings:
        row = dp_sgd_row(args) if name == "dp-sgd" else federated_row(name, args)
        rows.append(row)
        print(f"{name}: claimed {row.claimed_epsilon:.3g}, lower bound {row.epsilon_lower:.3g}", file=sys.stderr)
    print(format_table(rows))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([dataclasses.asdict(row) for row in rows], indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
