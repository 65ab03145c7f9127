"""The ``ServerApp``: settings → strategy → rounds → run directory.

``main`` reads the run config into :class:`~fl_app.config.settings.Settings` (bad values stop the run
here, before any client trains), builds the strategy by name inside the reply guard, creates the
initial Keras model, runs the rounds with federated evaluation on the clients and centralized
evaluation on the server's held-out test set, and writes the run directory
(:mod:`fl_app.server.run_directory`).
"""

from __future__ import annotations

import time
from logging import INFO

import numpy as np
from flwr.app import ArrayRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fl_app.config.settings import Settings
from fl_app.delivery.shipping import BestWeights, TrainReplyRecorder, check_exportable, finish_run
from fl_app.server import initial_weights
from fl_app.server.checkpoint import check_compatible, load_checkpoint, resume_strategy, save_checkpoint
from fl_app.server.evaluation import CentralEvaluator, model_spec
from fl_app.server.object_pulls import shorten_object_pulls
from fl_app.server.polling import ShortPollGrid
from fl_app.server.round_loop import run_rounds
from fl_app.server.run_directory import RoundRecord, RunDirectory
from fl_app.server.strategy_setup import make_strategy
from fl_app.server.summary import privacy_summary, summarize
from fl_app.server.tracking import RunTracker
from strategies.core.reporting import Private, Stateful

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation that the run config describes."""
    started = time.perf_counter()
    settings = Settings.from_run_config(context.run_config)
    grid = ShortPollGrid(grid)  # Flower's grid sleeps 3 s between polls for replies
    shorten_object_pulls()  # and retries a reply's objects after 1 s, then 2 s, ...

    model = evaluator = test_set = None
    encrypted = settings.homomorphic_encryption != "none"
    # TensorFlow on the server only for centralized evaluation and for exporting the model
    if settings.export_formats():  # a model that cannot be exported is refused before training
        check_exportable(model_spec(settings)[1], settings.export_formats())
    if settings.centralized_evaluation or settings.export_formats():
        model, test_set = initial_weights.server_model(settings)
        # with encryption the server never holds the model after round 0: no centralized evaluation
        if settings.centralized_evaluation and test_set is not None and not encrypted:
            x_test, y_test = test_set
            evaluator = CentralEvaluator.from_settings(settings, model, x_test, y_test, spec=model_spec(settings)[1])
        initial = ArrayRecord(model.get_weights())
    else:
        initial = initial_weights.query_initial_arrays(grid, settings)
    history: list[RoundRecord] = []
    first_round = 1
    checkpoint = load_checkpoint(settings.resume_from) if settings.resume_from else None
    if checkpoint is not None:  # continue after the last round that the earlier run completed
        check_compatible(checkpoint, initial.to_numpy_ndarrays(), settings.num_server_rounds)
        initial = ArrayRecord(checkpoint.weights)
        history = checkpoint.history
        first_round = checkpoint.round + 1

    # the strategy that runs the rounds is the one whose state (e.g. the DP accountant) checkpoints keep
    guarded = secure = None
    running: Stateful
    if settings.secure_aggregation:  # Flower's legacy SecAgg+ workflow (fl_app.secagg.server)
        from fl_app.secagg.server import SecureDpFedAvg

        running = secure = SecureDpFedAvg(settings, initial, evaluator)
    else:
        running = guarded = make_strategy(settings)
    if checkpoint is not None:  # same strategy class and privacy, then its state
        resume_strategy(checkpoint, running)
        log(INFO, "Resuming from %s after round %d", settings.resume_from, checkpoint.round)

    run_dir = RunDirectory(settings.output_dir, settings.strategy)
    run_dir.write_json("config.json", settings.to_run_config())
    log(INFO, "Run directory: %s", run_dir.path)
    tracker = RunTracker.for_run(settings, run_dir.path, running.dp_mode if isinstance(running, Private) else None)
    tracker.replay(history)  # a resumed run's events hold the earlier rounds too, as its history does
    recorder = TrainReplyRecorder(grid)  # who trained last: the export check asks the others
    best = BestWeights() if settings.export_best else None

    def on_round_end(record: RoundRecord, arrays: ArrayRecord) -> None:
        history.append(record)
        run_dir.write_history(history)
        tracker.log_round(record)
        if best is not None:
            best.update(record, arrays)
        save_checkpoint(
            run_dir.path, record.round, arrays.to_numpy_ndarrays(), history, running, dict(context.run_config)
        )

    if secure is not None:
        from fl_app.secagg.server import run_secure_rounds

        arrays, _ = run_secure_rounds(grid, context, secure, on_round_end, first_round=first_round)
        stop_reason = secure.stop_reason
    else:
        assert guarded is not None
        arrays, _ = run_rounds(
            recorder,
            guarded,
            initial,
            num_rounds=settings.num_server_rounds,
            first_round=first_round,
            timeout=settings.round_timeout,
            evaluate_fn=evaluator,
            on_round_end=on_round_end,
            min_train_replies=settings.min_train_replies,
            sampling_seed=settings.seed,
            observe_replies=tracker.observe_replies if tracker.wants_replies else None,
        )
        stop_reason = guarded.stop_reason

    if encrypted and guarded is not None:  # G_0 + the encrypted chain; a key holder runs scripts/decrypt_model.py
        from strategies.encrypted.strategy import EncryptedFedAvg

        assert isinstance(guarded.inner, EncryptedFedAvg)
        model_file = guarded.inner.save_encrypted_model(run_dir.file("encrypted-model.npz"))
    elif model is not None:
        model.set_weights(arrays.to_numpy_ndarrays())
        model_file = run_dir.file("model.keras")
        model.save(model_file)
    else:  # no TensorFlow on this server: the final weights as NumPy arrays, in model order
        model_file = run_dir.file("weights.npz")
        np.savez(model_file, *arrays.to_numpy_ndarrays())
    run_dir.plot(history)
    export_report = finish_run(
        grid=recorder,
        recorder=recorder,
        settings=settings,
        model=model,
        final_weights=arrays.to_numpy_ndarrays(),
        best=best,
        history=history,
        run_dir=run_dir,
        test_set=test_set,
    )
    summary = summarize(settings, history, time.perf_counter() - started, run_dir)
    summary["model file"] = str(model_file)
    summary["model card"] = str(run_dir.file("model_card.md"))
    if export_report is not None:
        summary["export ready"] = export_report["ready"]
        summary["export check report"] = export_report["report_file"]
    summary.update(privacy_summary(settings, history, stop_reason))
    summary.update(tracker.summary())
    run_dir.write_json("summary.json", summary)
    tracker.finish([model_file, run_dir.file("history.json"), run_dir.file("summary.json")])
    log(INFO, "=== Summary %s", "=" * 50)  # fl_app.deploy.output_filter.SUMMARY_HEADING
    for key, value in summary.items():
        if key != "settings":
            log(INFO, "%-28s %s", key, value)
