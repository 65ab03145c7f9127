"""Accuracy of encrypted aggregation against plaintext FedAvg on the same federation.

Runs the default federation (digits, 10 clients, Dirichlet alpha 0.5, MLP, 5 local epochs, FedAvg
weights) twice in this process through the real ClientApp handlers (:mod:`fl_app.simulation.local_grid`):
once in plaintext, once with ``homomorphic-encryption`` (fresh keys in a temporary directory).
The encrypted run's final model is reconstructed with the secret key (as
``scripts/decrypt_model.py`` does) and both final models are evaluated on the server's held-out
test set; the last round's federated accuracy (clients' own test splits) is reported too::

    python scripts/he_accuracy.py --scheme ckks --rounds 10
    python scripts/he_accuracy.py --scheme paillier --paillier-bits 2048 --model logreg --rounds 5
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fl_app  # noqa: F401  (loads TenSEAL before TensorFlow)
from strategies.encrypted.keys import generate_keys, load_client_scheme


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scheme", choices=["ckks", "paillier"], default="ckks")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--paillier-bits", type=int, default=3072)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)

    from flwr.app import ArrayRecord

    from fl_app.config.settings import Settings
    from fl_app.server.evaluation import CentralEvaluator, model_spec
    from fl_app.server.round_loop import run_rounds
    from fl_app.server.strategy_setup import make_strategy
    from fl_app.simulation.local_grid import LocalGrid, run_local_federation
    from fl_app.task.models import build_model
    from strategies.core.update_matrix import ModelLayout
    from strategies.encrypted.strategy import reconstruct

    base = {
        "num-partitions": args.clients,
        "min-train-clients": args.clients,
        "min-evaluate-clients": args.clients,
        "min-available-clients": args.clients,
        "num-server-rounds": args.rounds,
        "model": args.model,
        "seed": args.seed,
    }
    started = time.perf_counter()
    plain_arrays, plain_history = run_local_federation({**base, "strategy": "fedavg"}, evaluate_centrally=False)
    plain_seconds = time.perf_counter() - started

    with tempfile.TemporaryDirectory() as keys:
        params = {"key_bits": args.paillier_bits} if args.scheme == "paillier" else {}
        secret, public = generate_keys(args.scheme, max_clients=max(16, args.clients), **params)
        (Path(keys) / "secret.key").write_bytes(secret)
        (Path(keys) / "public.key").write_bytes(public)
        config = {
            **base,
            "homomorphic-encryption": args.scheme,
            "he-public-key-path": str(Path(keys) / "public.key"),
            "he-secret-key-path": str(Path(keys) / "secret.key"),
            "he-paillier-key-bits": args.paillier_bits,
        }
        settings = Settings.from_run_config(config)
        strategy = make_strategy(settings)
        shape, classes, test_set = model_spec(settings)
        import tensorflow as tf

        tf.keras.utils.set_random_seed(settings.seed)
        model = build_model(settings.model, shape, classes, settings.seed)
        initial = model.get_weights()
        started = time.perf_counter()
        _, he_history = run_rounds(
            LocalGrid(settings.to_run_config(), settings.num_partitions),
            strategy,
            ArrayRecord(initial),
            num_rounds=settings.num_server_rounds,
        )
        he_seconds = time.perf_counter() - started
        layout = ModelLayout.of_arrays(initial)
        flat = reconstruct(load_client_scheme(secret), layout.flatten_arrays(initial), strategy.inner.deltas)

    weights = layout.unflatten_arrays(flat)
    evaluator = CentralEvaluator(model, *test_set)
    plain_eval = evaluator(args.rounds, plain_arrays)
    he_eval = evaluator(args.rounds, ArrayRecord(weights))
    difference = max(float(np.max(np.abs(a - b))) for a, b in zip(weights, plain_arrays.to_numpy_ndarrays()))
    result = {
        "scheme": args.scheme,
        "model": args.model,
        "clients": args.clients,
        "rounds": args.rounds,
        "plaintext server-test accuracy": plain_eval["accuracy"],
        f"{args.scheme} server-test accuracy": he_eval["accuracy"],
        "accuracy difference (points)": 100 * (he_eval["accuracy"] - plain_eval["accuracy"]),
        "plaintext last federated accuracy": plain_history[-1].federated_accuracy,
        f"{args.scheme} last federated accuracy": he_history[-1].federated_accuracy,
        "max |weight difference|": difference,
        "plaintext seconds": plain_seconds,
        f"{args.scheme} seconds": he_seconds,
        "failed replies": sum(r.clients_failed for r in he_history),
        f"{args.scheme} per-round extra": [r.extra for r in he_history],
    }
    for key, value in result.items():
        if not key.endswith("per-round extra"):
            print(f"{key:40s} {value}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
