"""Model delivery: export the global model, check the exports before they ship, report.

After the last round the server (:func:`deliver`):

1. exports the final model (and, with ``export-best``, the model of the round with the best
   centralized accuracy) in the formats of ``export`` (:mod:`fl_app.delivery.export`); int8 TFLite is
   calibrated on up to ``export-calibration-samples`` examples of the server's held-out set;
2. checks every TFLite model against its Keras model:

   * *centralized*: accuracy on the server's held-out set through the TFLite interpreter, the
     argmax agreement with Keras' predictions, per-example latency (one example per ``invoke``)
     and size;
   * *federated*: one extra evaluate round sent to a sample (``export-check-fraction``) of the
     clients that did **not** reply in the last training round (all clients, said so in the
     report, when every client trained). Each receives the Keras weights and the ``.tflite``
     bytes (uint8 arrays in the ``tflite`` ArrayRecord, flagged by ``export-check`` in the
     ConfigRecord) and answers the accuracy of each on its local test split
     (:func:`answer_export_check`); the server takes the example-weighted means;

   a TFLite model is *ready* only if its accuracy is at least the Keras model's minus
   ``export-tolerance`` on both, and the whole export is ready only if every model is;
3. writes ``export_check.json`` (the report) into the run directory. A failed check or a failed
   conversion never removes ``model.keras`` or any exported file: it only marks the export not
   ready and says why.

:class:`TrainReplyRecorder` wraps the Grid during the rounds to learn who replied to the last
train messages, without touching the round loop.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterable
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from fl_app.delivery.export import ExportedModel, export_model
from fl_app.delivery.tflite import TFLitePredictor
from strategies.core.grid_wrapper import GridWrapper

CHECK_FLAG = "export-check"
TFLITE_RECORD = "tflite"
KERAS_PREFIX = "keras-"
REPORT_FILE = "export_check.json"
EXPORT_DIR = "export"
LATENCY_EXAMPLES = 200


class TrainReplyRecorder(GridWrapper):
    """A Grid that remembers which nodes replied (without error) to the latest train messages;
    every other method is the wrapped grid's."""

    def __init__(self, grid: Grid) -> None:
        super().__init__(grid)
        self.last_train_nodes: set[int] = set()
        self.train_rounds_seen = 0

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        replies = list(self.inner.send_and_receive(messages, timeout=timeout))
        if messages and all(m.metadata.message_type == MessageType.TRAIN for m in messages):
            self.last_train_nodes = {r.metadata.src_node_id for r in replies if not r.has_error()}
            self.train_rounds_seen += 1
        return replies


# --------------------------------------------------------------------------- client side


def is_export_check(msg: Message) -> bool:
    """Whether an evaluate message asks for the export check (ConfigRecord flag ``export-check``)."""
    if "config" not in msg.content:
        return False
    return bool(msg.content["config"].get(CHECK_FLAG, False))


def answer_export_check(msg: Message, client, num_threads: int = 1) -> Message:
    """Evaluate each Keras model (``keras-<name>`` ArrayRecords) with ``client`` and each TFLite
    model (uint8 arrays of the ``tflite`` ArrayRecord) with the TFLite interpreter on the client's
    local test split; reply ``<name>-keras-accuracy``, ``<name>-<variant>-accuracy`` and
    ``num-examples``."""
    x_test, y_test = client.data.x_test, client.data.y_test
    if len(y_test) == 0:
        raise ValueError("this client has no test examples for the export check")
    metrics: dict[str, int | float | list[int] | list[float]] = {}
    for key in msg.content.array_records:
        if key.startswith(KERAS_PREFIX):
            name = key[len(KERAS_PREFIX) :]
            _, _, result = client.evaluate(msg.content.array_records[key].to_numpy_ndarrays(), {})
            metrics[f"{name}-keras-accuracy"] = float(result["accuracy"])
    if TFLITE_RECORD in msg.content:
        for key, array in msg.content.array_records[TFLITE_RECORD].items():
            predictor = TFLitePredictor(array.numpy().tobytes(), num_threads=num_threads)
            metrics[f"{key}-accuracy"] = predictor.accuracy(x_test, y_test)
    metrics["num-examples"] = int(len(y_test))
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


# --------------------------------------------------------------------------- server side


@dataclasses.dataclass
class CheckInputs:
    """Everything the check needs to know about the run besides the models."""

    tolerance: float
    test_set: tuple[np.ndarray, np.ndarray] | None
    check_fraction: float = 1.0
    timeout: float = 600.0
    seed: int = 0
    server_round: int = 0


def keras_accuracy(model, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """Top-1 accuracy and the predicted classes of a Keras model."""
    predicted = np.argmax(model.predict(x, batch_size=512, verbose=0), axis=-1)
    return float(np.mean(predicted == y)), predicted


def centralized_check(model, exported: ExportedModel, x: np.ndarray, y: np.ndarray) -> dict:
    """Keras vs each TFLite variant on the server's held-out set."""
    keras_acc, keras_pred = keras_accuracy(model, x, y)
    out: dict[str, Any] = {
        "keras": {"centralized_accuracy": keras_acc, "parameters": int(model.count_params())},
        "tflite": {},
    }
    for variant, blob in exported.tflite.items():
        predictor = TFLitePredictor(blob)
        pred = np.argmax(predictor.predict(x), axis=-1)
        out["tflite"][variant] = {
            "size_bytes": len(blob),
            "centralized_accuracy": float(np.mean(pred == y)),
            "argmax_agreement_with_keras": float(np.mean(pred == keras_pred)),
            "latency_per_example": predictor.latency(x[:LATENCY_EXAMPLES]),
            "interpreter": predictor.interpreter_package,
        }
    return out


def select_check_nodes(
    all_nodes: Iterable[int], trained: set[int], fraction: float, seed: int
) -> tuple[list[int], str]:
    """A sample of the nodes that did not train in the last round (all nodes when none is left)."""
    nodes = sorted(all_nodes)
    eligible = [n for n in nodes if n not in trained]
    if eligible:
        why = f"{len(eligible)} of {len(nodes)} clients did not reply in the last training round"
    else:
        eligible = nodes
        why = (
            f"every one of the {len(nodes)} clients trained in the last round, so the check "
            "falls back to all clients (they have seen their training data, not their test split)"
        )
    size = max(1, int(round(fraction * len(eligible)))) if eligible else 0
    chosen = sorted(random.Random(seed).sample(eligible, size))
    return chosen, why


def federated_check(
    grid,
    recorder: TrainReplyRecorder | None,
    keras_weights: dict[str, list[np.ndarray]],
    exported: list[ExportedModel],
    inputs: CheckInputs,
) -> dict:
    """One evaluate round of every Keras and TFLite model on clients that did not train last."""
    trained = recorder.last_train_nodes if recorder is not None else set()
    nodes, why = select_check_nodes(grid.get_node_ids(), trained, inputs.check_fraction, inputs.seed)
    report: dict[str, Any] = {"selection": why, "nodes": nodes, "trained_in_last_round": sorted(trained)}
    if not nodes:
        report["error"] = "no client is connected"
        return report
    content = RecordDict(
        {
            **{f"{KERAS_PREFIX}{name}": ArrayRecord(weights) for name, weights in keras_weights.items()},
            TFLITE_RECORD: ArrayRecord(
                {
                    f"{e.name}-{variant}": Array(np.frombuffer(blob, dtype=np.uint8))
                    for e in exported
                    for variant, blob in e.tflite.items()
                }
            ),
            "config": ConfigRecord({CHECK_FLAG: True, "server-round": inputs.server_round}),
        }
    )
    messages = [Message(content=content, message_type=MessageType.EVALUATE, dst_node_id=node) for node in nodes]
    replies = list(grid.send_and_receive(messages, timeout=inputs.timeout))
    ok = [r for r in replies if not r.has_error()]
    report["failures"] = [f"node {r.metadata.src_node_id}: {r.error.reason}" for r in replies if r.has_error()]
    report["replied"] = len(ok)
    totals: dict[str, float] = {}
    examples = 0
    for reply in ok:
        metrics = next(iter(reply.content.metric_records.values()))
        n = int(metrics["num-examples"])
        examples += n
        for key, value in metrics.items():
            if key != "num-examples":
                totals[key] = totals.get(key, 0.0) + n * float(value)
    report["num_examples"] = examples
    report["accuracy"] = {k: v / examples for k, v in totals.items()} if examples else {}
    return report


def judge(report: dict, tolerance: float) -> dict:
    """Mark each TFLite model ready iff its accuracy >= the Keras model's - tolerance on every
    check that ran (and at least one ran); the export is ready iff every model is."""
    reasons: list[str] = []
    fed_report = report.get("federated_check")
    federated = (fed_report or {}).get("accuracy", {})
    if fed_report is not None and not federated:
        why = fed_report.get("error") or "; ".join(fed_report.get("failures", [])) or "no reply"
        reasons.append(f"the federated check round measured nothing ({why})")
    for name, entry in report["models"].items():
        reasons.extend(f"{name}: {e}" for e in entry.get("errors", []))
        keras = entry.get("keras", {})
        keras_fed = federated.get(f"{name}-keras-accuracy")
        if keras_fed is not None:
            keras["federated_accuracy"] = keras_fed
        for variant, result in entry.get("tflite", {}).items():
            own: list[str] = []
            checks = 0
            for scope, keras_acc in (("centralized", keras.get("centralized_accuracy")), ("federated", keras_fed)):
                acc = (
                    federated.get(f"{name}-{variant}-accuracy")
                    if scope == "federated"
                    else result.get("centralized_accuracy")
                )
                if scope == "federated":
                    result["federated_accuracy"] = acc
                if acc is None or keras_acc is None:
                    continue
                checks += 1
                if acc < keras_acc - tolerance:
                    own.append(
                        f"{scope} accuracy {acc:.4f} is more than the tolerance {tolerance} below "
                        f"the Keras model's {keras_acc:.4f}"
                    )
            if checks == 0:
                own.append("no accuracy could be measured (no server test set and no federated reply)")
            result["ready"] = not own
            result["reasons"] = own
            reasons.extend(f"{name} {variant}: {r}" for r in own)
    report["ready"] = not reasons
    report["reasons"] = reasons
    return report


def deliver(
    *,
    grid,
    recorder: TrainReplyRecorder | None,
    model,
    weights: dict[str, list[np.ndarray]],
    directory: Path,
    formats: tuple[str, ...],
    tflite_types: tuple[str, ...],
    calibration_samples: int,
    inputs: CheckInputs,
) -> dict:
    """Export every model in ``weights`` (name → weights, e.g. ``final``, ``best``) with ``model``'s
    architecture, check the TFLite exports, and return the report (see the module docstring)."""
    directory = Path(directory)
    representative = None
    calibration: dict[str, Any] = {"samples": 0, "source": None}
    if inputs.test_set is not None:
        x_test = inputs.test_set[0]
        rng = np.random.default_rng(inputs.seed)
        take = rng.permutation(len(x_test))[:calibration_samples]
        representative = x_test[take]
        calibration = {"samples": int(len(take)), "source": "server held-out set (random sample)"}
    report: dict[str, Any] = {
        "ready": False,
        "tolerance": inputs.tolerance,
        "formats": list(formats),
        "tflite_types": list(tflite_types),
        "calibration": calibration,
        "models": {},
    }
    exported: list[ExportedModel] = []
    for name, model_weights in weights.items():
        model.set_weights(model_weights)
        types = tflite_types
        entry: dict[str, Any] = {}
        if "int8" in tflite_types and "tflite" in formats and representative is None:
            types = tuple(t for t in tflite_types if t != "int8")
            entry["skipped"] = ["int8: no server held-out data to calibrate on (dataset='local-file')"]
        result = export_model(model, name, directory, formats, types, representative)
        entry.update(result.describe())
        if inputs.test_set is not None:
            entry.update(centralized_check(model, result, *inputs.test_set))
        else:
            entry["keras"] = {"parameters": int(model.count_params())}
            entry["tflite"] = {v: {"size_bytes": len(b)} for v, b in result.tflite.items()}
        report["models"][name] = entry
        exported.append(result)
    if any(e.tflite for e in exported):
        try:
            report["federated_check"] = federated_check(grid, recorder, weights, exported, inputs)
        except Exception as err:  # the check must never lose the run's outputs
            log(WARNING, "Export check: the federated round failed: %r", err)
            report["federated_check"] = {"error": repr(err)}
    judge(report, inputs.tolerance)
    _log_report(report)
    return report


def _log_report(report: dict) -> None:
    for name, entry in report["models"].items():
        for variant, result in entry.get("tflite", {}).items():
            log(
                INFO,
                "[export] %s %s: %d bytes, centralized acc %s, federated acc %s, agreement %s -> %s",
                name,
                variant,
                result.get("size_bytes", 0),
                result.get("centralized_accuracy"),
                result.get("federated_accuracy"),
                result.get("argmax_agreement_with_keras"),
                "ready" if result.get("ready") else "NOT ready",
            )
    if report["ready"]:
        log(INFO, "[export] ready to ship")
    else:
        for reason in report["reasons"]:
            log(WARNING, "[export] not ready: %s", reason)


# --------------------------------------------------------------------------- run integration


class BestWeights:
    """The global weights of the round with the best centralized accuracy (rounds >= 1), in memory."""

    def __init__(self) -> None:
        self.round: int | None = None
        self.accuracy: float | None = None
        self.weights: list[np.ndarray] | None = None

    def update(self, record, arrays: ArrayRecord) -> None:
        acc = record.centralized_accuracy
        if record.round >= 1 and acc is not None and (self.accuracy is None or acc > self.accuracy):
            self.round, self.accuracy, self.weights = record.round, acc, arrays.to_numpy_ndarrays()


def finish_run(
    *,
    grid,
    recorder: TrainReplyRecorder | None,
    settings,
    model,
    final_weights: list[np.ndarray],
    best: BestWeights | None,
    history: list,
    run_dir,
    test_set,
) -> dict | None:
    """After the rounds: export and check (when ``export`` asks for it), write ``export_check.json``,
    then always write ``model_card.md``. Returns the export report, or None without export."""
    from fl_app.delivery.model_card import render

    report = None
    formats = settings.export_formats()
    if formats:
        weights = {"final": final_weights}
        if best is not None and best.weights is not None:
            weights["best"] = best.weights
        inputs = CheckInputs(
            tolerance=settings.export_tolerance,
            test_set=test_set,
            check_fraction=settings.export_check_fraction,
            timeout=settings.round_timeout,
            seed=settings.seed,
            server_round=len([r for r in history if r.round > 0]) + 1,
        )
        try:
            report = deliver(
                grid=grid,
                recorder=recorder,
                model=model,
                weights=weights,
                directory=run_dir.file(EXPORT_DIR),
                formats=formats,
                tflite_types=settings.export_tflite_variants(),
                calibration_samples=settings.export_calibration_samples,
                inputs=inputs,
            )
        except Exception as err:  # never lose model.keras and the history to a failed export
            log(WARNING, "[export] failed: %r", err)
            report = {"ready": False, "reasons": [f"export failed: {err!r}"], "models": {}}
        if best is not None:
            report["best_round"] = {"round": best.round, "centralized_accuracy": best.accuracy}
        report["report_file"] = str(run_dir.file(REPORT_FILE))
        run_dir.write_json(REPORT_FILE, report)
        model.set_weights(final_weights)
    keras_file = run_dir.file("model.keras")
    card = render(
        settings,
        history,
        parameters=int(sum(w.size for w in final_weights)),
        keras_size=keras_file.stat().st_size if keras_file.exists() else None,
        export_report=report,
        num_server_test=len(test_set[1]) if test_set is not None else None,
    )
    run_dir.file("model_card.md").write_text(card, encoding="utf-8")
    return report
