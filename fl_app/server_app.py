"""The ``ServerApp``: settings → strategy → rounds → run directory.

``main`` reads the run config into :class:`~fl_app.settings.Settings` (bad values stop the run
here, before any client trains), builds the strategy by name, creates the initial Keras model,
runs the rounds with federated evaluation on the clients and centralized evaluation on the
server's held-out test set, and writes the run directory (:mod:`fl_app.outputs`).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from logging import INFO

import numpy as np
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fl_app.checkpoint import check_compatible, load_checkpoint, restore_strategy_state, save_checkpoint
from fl_app.delivery import BestWeights, TrainReplyRecorder, finish_run
from fl_app.federation import run_rounds
from fl_app.messaging import ShortPollGrid
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
        from fl_app.fast_train import loop_for

        self.model.set_weights(arrays.to_numpy_ndarrays())
        loss, accuracy = loop_for(self.model).evaluate(self.x, self.y)
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
    from fl_app.compression import attach_compression

    strategy = build_strategy(settings.strategy, run_config)
    attach_simulated_attack(settings, strategy)
    attach_compression(settings, strategy)
    return strategy


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation that the run config describes."""
    started = time.perf_counter()
    settings = Settings.from_run_config(context.run_config)
    strategy = make_strategy(settings, context.run_config)
    grid = ShortPollGrid(grid)  # Flower's grid sleeps 3 s between polls for replies

    from fl_app.initial import query_initial_arrays, server_model

    model = evaluator = test_set = None
    encrypted = settings.homomorphic_encryption != "none"
    # TensorFlow on the server only for centralized evaluation and for exporting the model
    if settings.centralized_evaluation or settings.export_formats():
        model, test_set = server_model(settings)
        # with encryption the server never holds the model after round 0: no centralized evaluation
        if settings.centralized_evaluation and test_set is not None and not encrypted:
            evaluator = CentralEvaluator(model, *test_set)
        initial = ArrayRecord(model.get_weights())
    else:
        initial = query_initial_arrays(grid, settings)
    history: list[RoundRecord] = []
    first_round = 1
    if settings.resume_from:  # continue after the last round that the earlier run completed
        checkpoint = load_checkpoint(settings.resume_from)
        check_compatible(checkpoint, initial.to_numpy_ndarrays())
        restore_strategy_state(strategy, checkpoint.strategy_state)
        initial = ArrayRecord(checkpoint.weights)
        history = checkpoint.history
        first_round = checkpoint.round + 1
        log(INFO, "Resuming from %s after round %d", settings.resume_from, checkpoint.round)

    run_dir = RunDirectory(settings.output_dir, settings.strategy)
    run_dir.write_json("config.json", settings.to_run_config())
    log(INFO, "Run directory: %s", run_dir.path)
    recorder = TrainReplyRecorder(grid)  # who trained last: the export check asks the others
    best = BestWeights() if settings.export_best else None

    def on_round_end(record: RoundRecord, arrays: ArrayRecord) -> None:
        history.append(record)
        run_dir.write_history(history)
        if best is not None:
            best.update(record, arrays)
        save_checkpoint(run_dir.path, record.round, arrays.to_numpy_ndarrays(), history, strategy,
                        dict(context.run_config))

    if settings.secure_aggregation:  # Flower's legacy SecAgg+ workflow (fl_app.secure_aggregation)
        from fl_app.secure_aggregation import run_secure_rounds

        arrays, _, strategy = run_secure_rounds(grid, context, settings, initial, evaluator, on_round_end)
    else:
        arrays, _ = run_rounds(
            recorder, strategy, initial,
            num_rounds=settings.num_server_rounds,
            first_round=first_round,
            timeout=settings.round_timeout,
            evaluate_fn=evaluator,
            on_round_end=on_round_end,
            min_train_replies=settings.min_train_replies,
            sampling_seed=settings.seed,
        )

    if encrypted:  # G_0 + the encrypted chain; a key holder runs scripts/decrypt_model.py
        model_file = strategy.save_encrypted_model(run_dir.file("encrypted-model.npz"))
    elif model is not None:
        model.set_weights(arrays.to_numpy_ndarrays())
        model_file = run_dir.file("model.keras")
        model.save(model_file)
    else:  # no TensorFlow on this server: the final weights as NumPy arrays, in model order
        model_file = run_dir.file("weights.npz")
        np.savez(model_file, *arrays.to_numpy_ndarrays())
    run_dir.plot(history)
    export_report = finish_run(
        grid=recorder, recorder=recorder, settings=settings, model=model,
        final_weights=arrays.to_numpy_ndarrays(), best=best, history=history, run_dir=run_dir,
        test_set=test_set,
    )
    summary = summarize(settings, history, time.perf_counter() - started, run_dir)
    summary["model file"] = str(model_file)
    summary["model card"] = str(run_dir.file("model_card.md"))
    if export_report is not None:
        summary["export ready"] = export_report["ready"]
        summary["export check report"] = export_report["report_file"]
    summary.update(privacy_summary(history, getattr(strategy, "stop_reason", None)))
    run_dir.write_json("summary.json", summary)
    log(INFO, "")
    for key, value in summary.items():
        if key != "settings":
            log(INFO, "%-28s %s", key, value)


def privacy_summary(history: list[RoundRecord], stop_reason: str | None) -> dict:
    """Epsilon (user level, and the clients' largest DP-SGD example-level one) and why training stopped."""
    out: dict = {}
    for key, name in (("epsilon", "epsilon (user level)"), ("delta", "delta"),
                      ("dp-sgd-epsilon-max", "epsilon (example level, DP-SGD, largest client)")):
        values = [r.extra[key] for r in history if key in r.extra]
        if values:
            out[name] = values[-1]
    if stop_reason:
        out["stopped early"] = stop_reason
    return out


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
        "tensorflow on the server": "tensorflow" in sys.modules,
        "mean seconds per round": round(float(np.mean([r.seconds for r in trained])), 3) if trained else None,
        "run directory": str(run_dir.path),
        "model file": str(run_dir.file("model.keras") if run_dir.file("model.keras").exists()
                          else run_dir.file("weights.npz")),
        "history": [str(run_dir.file("history.json")), str(run_dir.file("history.csv"))],
        "plot": str(run_dir.file("metrics.png")),
        "settings": {k: v for k, v in dataclasses.asdict(settings).items()},
    }
