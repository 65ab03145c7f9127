"""Federated vs centralized training of the examples' own models, on the server's held-out set.

For each example (``breast_cancer``: binary, ROC-AUC and accuracy; ``diabetes``: regression, MAE)
it runs the app's federation in this process (:func:`fl_app.simulation.local_grid.run_local_federation`,
the same ClientApp code as ``fl-keras-run``) and a centralized fit of the same model, from the same
initial weights, on the union of the clients' data for as many epochs as a client trains in all
rounds; both are scored on the server's held-out test set. Prints one JSON object.

    uv run python -m examples.compare_centralized [--rounds 20] [--clients 5]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

import fl_app  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)

EXAMPLES: dict[str, dict[str, float | str]] = {
    "breast_cancer": {},  # compiled by its author: Adam at 1e-3
    "diabetes": {"optimizer": "adam", "learning-rate": 0.01},  # uncompiled: the run config's optimizer
}


def scores(example: str, y: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """ROC-AUC and accuracy (binary), or MAE in standardised and original units (regression)."""
    from sklearn.metrics import mean_absolute_error, roc_auc_score

    if example == "breast_cancer":
        p = predicted.reshape(-1)
        return {"roc_auc": float(roc_auc_score(y, p)), "accuracy": float(np.mean((p > 0.5) == y))}
    from examples.diabetes.data import TARGET_STD

    mae = float(mean_absolute_error(y, predicted.reshape(-1)))
    return {"mae": mae, "mae_original_units": mae * TARGET_STD}


def compare(example: str, rounds: int, clients: int) -> dict:
    import tensorflow as tf

    from fl_app.client.node_client import compiled_model
    from fl_app.config.settings import Settings
    from fl_app.simulation.local_grid import run_local_federation
    from fl_app.task.data import federated_data
    from fl_app.task.keras_client import reset_optimizer
    from fl_app.task.models import build_model

    run_config = {
        "model": f"examples.{example}.model:build",
        "dataset": f"examples.{example}.data:load",
        "num-partitions": clients,
        "min-train-clients": clients,
        "min-evaluate-clients": clients,
        "min-available-clients": clients,
        "num-server-rounds": rounds,
        "partitioner": "iid",
        "local-epochs": 2,
        "batch-size": 16,
        **EXAMPLES[example],
    }
    settings = Settings.from_run_config(run_config)
    data = federated_data(settings)
    x_test, y_test = data.x_server_test, data.y_server_test

    started = time.perf_counter()
    arrays, _ = run_local_federation(run_config)
    federated_seconds = time.perf_counter() - started
    model, _ = compiled_model(
        settings.model,
        data.input_shape,
        data.spec,
        settings.optimizer,
        settings.learning_rate,
        settings.seed,
        1,
    )
    initial = build_model(settings.model, data.input_shape, data.spec, settings.seed).get_weights()
    model.set_weights(arrays.to_numpy_ndarrays())
    federated = scores(example, y_test, model.predict(x_test, verbose=0))

    started = time.perf_counter()
    model.set_weights(initial)
    reset_optimizer(model.optimizer)  # the worker's model: its optimizer last ran a client's fit
    tf.keras.utils.set_random_seed(settings.seed)
    model.fit(data.x, data.y, epochs=rounds * settings.local_epochs, batch_size=settings.batch_size, verbose=0)
    centralized_seconds = time.perf_counter() - started
    centralized = scores(example, y_test, model.predict(x_test, verbose=0))
    return {
        "clients": clients,
        "rounds": rounds,
        "local epochs": settings.local_epochs,
        "server test examples": int(len(y_test)),
        "federated": federated,
        "centralized (same model, same epochs)": centralized,
        "seconds": {"federated": round(federated_seconds, 1), "centralized": round(centralized_seconds, 1)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--clients", type=int, default=5)
    args = parser.parse_args()
    print(json.dumps({name: compare(name, args.rounds, args.clients) for name in EXAMPLES}, indent=2))


if __name__ == "__main__":
    main()
