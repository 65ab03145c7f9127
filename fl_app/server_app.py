"""The ``ServerApp``: settings → strategy → rounds → run directory.

``main`` reads the run config into :class:`~fl_app.settings.Settings` (bad values stop the run
here, before any client trains), builds the strategy by name, creates the initial Keras model,
runs the rounds with federated evaluation on the clients and centralized evaluation on the
server's held-out test set, and writes the run directory (:mod:`fl_app.outputs`).
"""

from __future__ import annotations

import dataclasses
import time
from logging import INFO

import numpy as np
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fl_app.federation import run_rounds
from fl_app.outputs import RoundRecord, RunDirectory
from fl_app.settings import Settings
from strategies.registry import build_strategy

app = ServerApp()


def model_spec(settings: Settings) -> tuple[tuple[int, ...], int, tuple[np.ndarray, np.ndarray] | None]:
    """(input shape, number of classes, server test set or None) for the configured data."""
    if settings.dataset == "local-file":
        return settings.parsed_input_shape(), settings.num_classes, None
    from fl_app.data import federated_data

    data = federated_data(settings)
    shape = settings.parsed_input_shape() or data.input_shape
    test = (data.x_server_test.reshape((-1, *shape)), data.y_server_test)
    return shape, settings.num_classes or data.num_classes, test if len(test[1]) else None


class CentralEvaluator:
    """Evaluates global weights on the server's held-out test set with one compiled model."""

    def __init__(self, model, x: np.ndarray, y: np.ndarray) -> None:
        import tensorflow as tf

        self.model = model
        self.model.compile(loss=tf.keras.losses.SparseCategoricalCrossentropy(), metrics=["accuracy"])
        self.x, self.y = x, y

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        self.model.set_weights(arrays.to_numpy_ndarrays())
        loss, accuracy = self.model.evaluate(self.x, self.y, batch_size=512, verbose=0)
        return MetricRecord({"loss": float(loss), "accuracy": float(accuracy)})


def attach_simulated_attack(settings: Settings, strategy) -> None:
    """Omniscient attacks (ALIE, IPM) act on the server, inside our aggregation strategy."""
    from fl_app.attacks import ATTACKS

    if not any(name != "none" and ATTACKS[name].omniscient for name in settings.attack_names()):
        return
    from fl_app.byzantine import OmniscientAttack
    from strategies.robust import AggregationStrategy

    if not isinstance(strategy, AggregationStrategy):
        raise ValueError(
            f"attack '{settings.attack}' is simulated on the server and needs one of our aggregation "
            f"strategies (strategy='robust' with aggregation-rule='mean' is FedAvg); got '{settings.strategy}'"
        )
    strategy.update_hooks.append(OmniscientAttack(settings))


def make_strategy(settings: Settings, run_config) -> object:
    """The configured strategy; with homomorphic encryption the server loads only the public key
    (``he-public-key-path``; ``he-secret-key-path`` is never read here)."""
    if settings.homomorphic_encryption != "none":
        from strategies.encrypted import build_encrypted_strategy

        return build_encrypted_strategy(run_config)
    strategy = build_strategy(settings.strategy, run_config)
    attach_simulated_attack(settings, strategy)
    return strategy


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation that the run config describes."""
    started = time.perf_counter()
    settings = Settings.from_run_config(context.run_config)
    strategy = make_strategy(settings, context.run_config)

    import tensorflow as tf

    from fl_app.models import build_model

    input_shape, num_classes, test_set = model_spec(settings)
    tf.keras.utils.set_random_seed(settings.seed)
    model = build_model(settings.model, input_shape, num_classes, settings.seed)
    # with encryption the server never holds the model after round 0: no centralized evaluation
    encrypted = settings.homomorphic_encryption != "none"
    evaluator = CentralEvaluator(model, *test_set) if test_set is not None and not encrypted else None
    initial = ArrayRecord(model.get_weights())

    run_dir = RunDirectory(settings.output_dir, settings.strategy)
    run_dir.write_json("config.json", settings.to_run_config())
    log(INFO, "Run directory: %s", run_dir.path)
    history: list[RoundRecord] = []

    def on_round_end(record: RoundRecord, _arrays: ArrayRecord) -> None:
        history.append(record)
        run_dir.write_history(history)

    arrays, _ = run_rounds(
        grid, strategy, initial,
        num_rounds=settings.num_server_rounds,
        timeout=settings.round_timeout,
        evaluate_fn=evaluator,
        on_round_end=on_round_end,
    )

    if encrypted:  # G_0 + the encrypted chain; a key holder runs scripts/decrypt_model.py
        model_file = strategy.save_encrypted_model(run_dir.file("encrypted-model.npz"))
    else:
        model.set_weights(arrays.to_numpy_ndarrays())
        model_file = run_dir.file("model.keras")
        model.save(model_file)
    run_dir.plot(history)
    summary = summarize(settings, history, time.perf_counter() - started, run_dir)
    summary["model file"] = str(model_file)
    run_dir.write_json("summary.json", summary)
    log(INFO, "")
    for key, value in summary.items():
        if key != "settings":
            log(INFO, "%-28s %s", key, value)


def summarize(settings: Settings, history: list[RoundRecord], seconds: float, run_dir: RunDirectory) -> dict:
    """The run's closing figures (also written to summary.json)."""
    last = history[-1] if history else RoundRecord(round=0)
    trained = [r for r in history if r.round > 0]
    return {
        "strategy": settings.strategy,
        "dataset": settings.dataset,
        "model": settings.model,
        "clients (partitions)": settings.num_partitions,
        "rounds": len(trained),
        "final centralized accuracy": last.centralized_accuracy,
        "final centralized loss": last.centralized_loss,
        "final federated accuracy": last.federated_accuracy,
        "failed client replies": sum(r.clients_failed for r in trained),
        "seconds": round(seconds, 2),
        "mean seconds per round": round(float(np.mean([r.seconds for r in trained])), 3) if trained else None,
        "run directory": str(run_dir.path),
        "model file": str(run_dir.file("model.keras")),
        "history": [str(run_dir.file("history.json")), str(run_dir.file("history.csv"))],
        "plot": str(run_dir.file("metrics.png")),
        "settings": {k: v for k, v in dataclasses.asdict(settings).items()},
    }
