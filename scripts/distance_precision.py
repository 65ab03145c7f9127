"""Precision of the pairwise distances of Krum, Multi-Krum, Bulyan and NNM, with and without an attacker.

``D_ij = G_ii + G_jj - 2 G_ij`` from a float32 Gram matrix cancels when rows i and j share a
component much longer than their difference. Two measurements back the choices of
``strategies.robust.rules.distances_of_rows`` (docs/robust-aggregation.md, "Precision of the
distances"):

1. **One huge row.** 11 honest rows of 20,000 values (standard deviation 0.01) and one row at
   ``--scales`` times their scale. The largest relative error of the honest distances against
   float64 row differences, for the rows centred on their mean before the product (this code's
   method until 2026-11-29, reproduced here) and for ``distances_of_rows`` (rows as they are).
2. **Real updates.** ``--clients`` IID clients of scikit-learn's digits train the project's
   ``mlp`` (Adam, ``--learning-rate``, batch 32, one epoch) from the same global model for
   ``--rounds`` FedAvg rounds. Per round: the median and largest ``(G_ii + G_jj) / D_ij`` over the
   pairs, the ratio above which a pair is recomputed in float64 at this width, and how many rows
   ``distances_of_rows`` recomputed.

    uv run python scripts/distance_precision.py
    uv run python scripts/distance_precision.py --rounds 5 --scales 1e2,1e4,1e6,1e12
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scipy.linalg.blas import ssyrk  # noqa: E402

from strategies.robust import rules  # noqa: E402


def exact_distances(x: np.ndarray) -> np.ndarray:
    """Squared distances from the rows' differences in float64 (no cancellation)."""
    x64 = x.astype(np.float64)
    return np.array([((x64 - row) ** 2).sum(axis=1) for row in x64])


def mean_centred_distances(x: np.ndarray) -> np.ndarray:
    """The earlier computation: per column block, rows centred on the block's mean, float32
    ``ssyrk``, float64 across blocks."""
    num_rows, num_columns = x.shape
    width = rules._block_width(num_rows)
    upper = np.zeros((num_rows, num_rows))
    for start in range(0, num_columns, width):
        block = x[:, start : start + width].copy()  # never centre x itself
        block -= block.mean(axis=0, dtype=np.float32)
        upper += ssyrk(1.0, block.T, trans=1)
    gram = upper + np.triu(upper, 1).T
    norms = np.diag(gram)
    return np.maximum(norms[:, None] + norms[None, :] - 2 * gram, 0)


def honest_error(distances: np.ndarray, exact: np.ndarray) -> float:
    """Largest relative error of the distances between rows 1.. (row 0 is the huge one)."""
    off = ~np.eye(len(exact) - 1, dtype=bool)
    honest, reference = distances[1:, 1:][off], exact[1:, 1:][off]
    return float(np.max(np.abs(honest - reference) / reference))


def huge_row_table(scales: list[float]) -> None:
    rng = np.random.default_rng(11)
    print("| huge row / honest scale | mean-centred: honest rel. error | as they are (ours): honest rel. error |")
    print("|---|---|---|")
    for scale in scales:
        x = (rng.standard_normal((12, 20_000)) * 0.01).astype(np.float32)
        x[0] = np.float32(0.01 * scale)
        exact = exact_distances(x)
        centred = honest_error(mean_centred_distances(x), exact)
        ours = honest_error(rules.pairwise_squared_distances(x), exact)
        print(f"| {scale:.0e} | {centred:.1e} | {ours:.1e} |", flush=True)


def real_update_table(num_clients: int, rounds: int, learning_rate: float) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    from fl_app.task.data import load_digits_arrays
    from fl_app.task.models import mlp

    x, y, num_classes = load_digits_arrays()
    parts = np.array_split(np.random.default_rng(0).permutation(len(x)), num_clients)
    model = mlp(x.shape[1:], num_classes, seed=0)
    model.compile(tf.keras.optimizers.Adam(learning_rate), "sparse_categorical_crossentropy")
    global_weights = [w.copy() for w in model.get_weights()]
    sizes = [w.size for w in global_weights]
    num_params = sum(sizes)
    width = min(num_params, rules._block_width(num_clients))
    threshold = 0.5 * rules._DISTANCE_TOLERANCE / (rules._FLOAT32_GRAM_ERROR * math.sqrt(width))
    print(f"\n{num_clients} IID digits clients, mlp (P = {num_params}), Adam {learning_rate}, one epoch per round")
    print("| round | median (G_ii + G_jj) / D_ij | largest | float64 above | rows recomputed in float64 |")
    print("|---|---|---|---|---|")
    for round_number in range(1, rounds + 1):
        updates = []
        for part in parts:
            model.set_weights(global_weights)
            model.optimizer = tf.keras.optimizers.Adam(learning_rate)
            model.fit(x[part], y[part], epochs=1, batch_size=32, verbose=0)
            updates.append(np.concatenate([(w - g).ravel() for w, g in zip(model.get_weights(), global_weights)]))
        matrix = np.asarray(updates, np.float32)
        exact = exact_distances(matrix)
        norms = (matrix.astype(np.float64) ** 2).sum(axis=1)
        pairs = np.triu_indices(num_clients, 1)
        ratios = (norms[:, None] + norms[None, :])[pairs] / exact[pairs]
        gram = rules._gram(rules.MatrixRows(matrix), np.float32)
        recomputed = len(rules._imprecise_rows(gram, width))
        print(
            f"| {round_number} | {np.median(ratios):.1f} | {ratios.max():.1f} | {threshold:.0f} | {recomputed} |",
            flush=True,
        )
        mean = matrix.mean(axis=0)
        global_weights = [g + u.reshape(g.shape) for g, u in zip(global_weights, np.split(mean, np.cumsum(sizes)[:-1]))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", default="1e2,1e4,1e6")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--learning-rate", type=float, default=0.005)
    args = parser.parse_args()
    huge_row_table([float(s) for s in args.scales.split(",")])
    if args.rounds > 0:
        real_update_table(args.clients, args.rounds, args.learning_rate)


if __name__ == "__main__":
    main()
