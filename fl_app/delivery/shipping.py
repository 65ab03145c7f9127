"""Model delivery: export the global model, check the exports before they ship, report.

After the last round the server (:func:`deliver`):

1. exports the final model (and, with ``export-best``, the model of the round with the best
   centralized headline metric) in the formats of ``export`` (:mod:`fl_app.delivery.export`); int8 TFLite is
   calibrated on up to ``export-calibration-samples`` examples of the server's held-out set;
2. checks every TFLite model against its Keras model:

   * *centralized*: the model's own headline metric (``accuracy`` if compiled with it, else its
     first metric, e.g. ``auc`` or ``mae``; :func:`fl_app.task.output_spec.headline_metric`) on the
     server's held-out set through the TFLite interpreter, scored by the model's compiled metric;
     the agreement with Keras' predictions (same argmax or threshold decisions, or the mean
     absolute difference for regression); per-example latency (one example per ``invoke``) and size;
   * *federated*: one extra evaluate round sent to a sample (``export-check-fraction``) of the
     clients that did **not** reply in the last training round (all clients, said so in the
     report, when every client trained). Each receives the Keras weights and the ``.tflite``
     bytes (uint8 arrays in the ``tflite`` ArrayRecord, flagged by ``export-check`` in the
     ConfigRecord, with the metric's name) and answers the metric of each on its local test split
     (:func:`answer_export_check`); the server takes the example-weighted means;

   a TFLite model is *ready* only if its metric is at least the Keras model's minus
   ``export-tolerance`` (a metric where higher is better, in points) or at most the Keras
   model's times ``1 + export-tolerance`` (an error such as ``mae``, relative) on both, and the
   whole export is ready only if every model is;
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
METRIC_KEY = "export-check-metric"
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
    local test split, by the metric the server names (``export-check-metric``, ``accuracy`` if
    absent); reply ``<name>-keras-<metric>``, ``<name>-<variant>-<metric>`` and ``num-examples``."""
    from fl_app.task.losses import score_predictions

    x_test, y_test = client.data.x_test, client.data.y_test
    if len(y_test) == 0:
        raise ValueError("this client has no test examples for the export check")
    metric = str(msg.content["config"].get(METRIC_KEY, "accuracy"))
    metrics: dict[str, int | float | list[int] | list[float]] = {}
    for key in msg.content.array_records:
        if key.startswith(KERAS_PREFIX):
            name = key[len(KERAS_PREFIX) :]
            _, _, result = client.evaluate(msg.content.array_records[key].to_numpy_ndarrays(), {})
            if metric not in result:
                raise ValueError(
                    f"the export check asks for metric '{metric}'; this client's model reports {sorted(result)}"
                )
            metrics[f"{name}-keras-{metric}"] = float(result[metric])
    if TFLITE_RECORD in msg.content:
        for key, array in msg.content.array_records[TFLITE_RECORD].items():
            predictor = TFLitePredictor(array.numpy().tobytes(), num_threads=num_threads)
            scores = score_predictions(client.model, y_test, predictor.predict(x_test))
            metrics[f"{key}-{metric}"] = scores[metric]
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
    task: str = "multiclass"
    metric: str | None = None  # None: the model's headline metric (model_metric)


def model_metric(model, test_set: tuple[np.ndarray, np.ndarray] | None) -> str:
    """The compiled model's headline metric (its metrics exist once it has scored something, so it
    scores a few held-out examples); ``accuracy`` without a held-out set."""
    from fl_app.task.losses import score_predictions
    from fl_app.task.output_spec import headline_metric

    if test_set is None:
        return "accuracy"
    x, y = test_set[0][:8], test_set[1][:8]
    return headline_metric(list(score_predictions(model, y, model.predict(x, verbose=0)))) or "accuracy"


def centralized_check(model, exported: ExportedModel, x: np.ndarray, y: np.ndarray, task: str, metric: str) -> dict:
    """Keras vs each TFLite variant on the server's held-out set, by ``metric``."""
    from fl_app.task.losses import agreement, gives_logits, score_predictions

    keras_pred = model.predict(x, batch_size=512, verbose=0)
    threshold = 0.0 if gives_logits(model) else 0.5
    out: dict[str, Any] = {
        "keras": {f"centralized_{metric}": score_predictions(model, y, keras_pred)[metric]},
        "tflite": {},
    }
    out["keras"]["parameters"] = int(model.count_params())
    for variant, blob in exported.tflite.items():
        predictor = TFLitePredictor(blob)
        pred = predictor.predict(x)
        key, value = agreement(keras_pred, pred, task, threshold)
        out["tflite"][variant] = {
            "size_bytes": len(blob),
            f"centralized_{metric}": score_predictions(model, y, pred)[metric],
            key: value,
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
            "config": ConfigRecord(
                {CHECK_FLAG: True, "server-round": inputs.server_round, METRIC_KEY: inputs.metric or "accuracy"}
            ),
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
    report["means"] = {k: v / examples for k, v in totals.items()} if examples else {}
    return report


def judge(report: dict, tolerance: float) -> dict:
    """Mark each TFLite model ready iff its metric (``report["metric"]``) is within ``tolerance``
    of the Keras model's on every check that ran (and at least one ran): at least the Keras value
    minus ``tolerance`` where higher is better, at most the Keras value times ``1 + tolerance``
    for an error; the export is ready iff every model is."""
    from fl_app.task.output_spec import lower_is_better

    metric = report.get("metric", "accuracy")
    lower = lower_is_better(metric)
    reasons: list[str] = []
    fed_report = report.get("federated_check")
    federated = (fed_report or {}).get("means", {})
    if fed_report is not None and not federated:
        why = fed_report.get("error") or "; ".join(fed_report.get("failures", [])) or "no reply"
        reasons.append(f"the federated check round measured nothing ({why})")
    for name, entry in report["models"].items():
        reasons.extend(f"{name}: {e}" for e in entry.get("errors", []))
        keras = entry.get("keras", {})
        keras_fed = federated.get(f"{name}-keras-{metric}")
        if keras_fed is not None:
            keras[f"federated_{metric}"] = keras_fed
        for variant, result in entry.get("tflite", {}).items():
            own: list[str] = []
            checks = 0
            for scope, keras_value in (("centralized", keras.get(f"centralized_{metric}")), ("federated", keras_fed)):
                value = (
                    federated.get(f"{name}-{variant}-{metric}")
                    if scope == "federated"
                    else result.get(f"centralized_{metric}")
                )
                if scope == "federated":
                    result[f"federated_{metric}"] = value
                if value is None or keras_value is None:
                    continue
                checks += 1
                if lower and value > keras_value * (1 + tolerance):
                    own.append(
                        f"{scope} {metric} {value:.4f} is more than the tolerance {tolerance} (relative) above "
                        f"the Keras model's {keras_value:.4f}"
                    )
                elif not lower and value < keras_value - tolerance:
                    own.append(
                        f"{scope} {metric} {value:.4f} is more than the tolerance {tolerance} below "
                        f"the Keras model's {keras_value:.4f}"
                    )
            if checks == 0:
                own.append(f"no {metric} could be measured (no server test set and no federated reply)")
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
    metric = inputs.metric or model_metric(model, inputs.test_set)
    inputs = dataclasses.replace(inputs, metric=metric)
    report: dict[str, Any] = {
        "ready": False,
        "metric": metric,
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
            entry.update(centralized_check(model, result, *inputs.test_set, inputs.task, metric))
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
    metric = report.get("metric", "accuracy")
    for name, entry in report["models"].items():
        for variant, result in entry.get("tflite", {}).items():
            agreement = next((f"{k} {v:.4f}" for k, v in result.items() if "keras" in k), "-")
            log(
                INFO,
                "[export] %s %s: %d bytes, centralized %s %s, federated %s %s, %s -> %s",
                name,
                variant,
                result.get("size_bytes", 0),
                metric,
                result.get(f"centralized_{metric}"),
                metric,
                result.get(f"federated_{metric}"),
                agreement,
                "ready" if result.get("ready") else "NOT ready",
            )
    if report["ready"]:
        log(INFO, "[export] ready to ship")
    else:
        for reason in report["reasons"]:
            log(WARNING, "[export] not ready: %s", reason)


# --------------------------------------------------------------------------- run integration


class BestWeights:
    """The global weights of the round with the best centralized headline metric (rounds >= 1;
    the largest accuracy, or the smallest error such as ``mae``), in memory."""

    def __init__(self) -> None:
        self.round: int | None = None
        self.metric: str | None = None
        self.value: float | None = None
        self.weights: list[np.ndarray] | None = None

    def update(self, record, arrays: ArrayRecord) -> None:
        from fl_app.server.run_directory import headline
        from fl_app.task.output_spec import lower_is_better

        self.metric = self.metric or headline([record])
        value = record.value("centralized", self.metric) if self.metric else None
        if record.round < 1 or value is None:
            return
        better = self.value is None or (
            value < self.value if lower_is_better(self.metric or "") else value > self.value
        )
        if better:
            self.round, self.value, self.weights = record.round, value, arrays.to_numpy_ndarrays()


def check_exportable(spec, formats: tuple[str, ...]) -> None:
    """``ValueError`` before any training when ``export`` asks for a model that cannot be exported
    and checked: a model with several outputs (``spec`` multioutput), whose TFLite outputs the
    check before shipping cannot score by one metric."""
    if formats and spec.multi_output:
        names = ", ".join(name for name, _ in spec.outputs)
        raise ValueError(
            f"export='{','.join(formats)}' supports models with one output; this model has {len(spec.outputs)} "
            f"({names}), whose TFLite outputs the check before shipping cannot score: set export='' "
            "(the run still writes model.keras)"
        )


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
        from fl_app.server.evaluation import model_spec
        from fl_app.server.run_directory import headline
        from fl_app.task.keras_client import compile_model

        spec = model_spec(settings)[1]
        compile_model(model, spec=spec, with_proximal_term=False)  # a server without evaluation: not yet
        inputs = CheckInputs(
            task=spec.task,
            metric=headline(history),
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
            report["best_round"] = {"round": best.round, f"centralized_{best.metric}": best.value}
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
