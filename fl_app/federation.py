"""The round loop: Flower's ``Strategy.start`` template, plus a record of every round.

:func:`run_rounds` drives any Message-API strategy (Flower's built-ins and ours) through
``configure_train → send → aggregate_train → configure_evaluate → send → aggregate_evaluate →
centralized evaluation``, exactly as ``Strategy.start`` does, and in addition records per round who
replied, who failed and why, bytes sent and received, and time. It never lets a client's reply
crash the server: if a strategy's aggregation raises, the round keeps the previous global model and
the error goes into the history.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fl_app.messaging import send_and_receive
from fl_app.outputs import RoundRecord

EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]
RoundCallback = Callable[[RoundRecord, ArrayRecord], None]

_TRAIN_KEYS = {"train-loss": "train_loss", "train-accuracy": "train_accuracy"}


def message_bytes(messages: Iterable[Message]) -> int:
    """Bytes of the arrays that ``messages`` carry (what dominates the traffic)."""
    total = 0
    for message in messages:
        if message.has_content():
            total += sum(r.count_bytes() for r in message.content.array_records.values())
    return total


def split_replies(replies: Iterable[Message]) -> tuple[list[Message], list[str]]:
    """The replies with content, and a ``"node <id>: <reason>"`` line for each error reply."""
    ok, failures = [], []
    for reply in replies:
        if reply.has_error():
            failures.append(f"node {reply.metadata.src_node_id}: {reply.error.reason}")
        else:
            ok.append(reply)
    return ok, failures


def _metric(record: MetricRecord | None, key: str) -> float | None:
    if record is None or key not in record:
        return None
    value = record[key]
    return float(value) if isinstance(value, (int, float)) else None


def run_rounds(
    grid: Grid,
    strategy: Strategy,
    initial_arrays: ArrayRecord,
    *,
    num_rounds: int,
    first_round: int = 1,
    timeout: float = 600.0,
    train_config: ConfigRecord | None = None,
    evaluate_config: ConfigRecord | None = None,
    evaluate_fn: EvaluateFn | None = None,
    on_round_end: RoundCallback | None = None,
) -> tuple[ArrayRecord, list[RoundRecord]]:
    """Run rounds ``first_round..num_rounds``; return the final arrays and the history.

    ``on_round_end(record, arrays)`` is called after every round (and after round 0, the
    evaluation of the initial model, when ``first_round == 1``), e.g. to write the history and a
    checkpoint.
    """
    history: list[RoundRecord] = []
    arrays = initial_arrays
    if evaluate_fn is not None and first_round == 1:
        record = RoundRecord(round=0)
        started = time.perf_counter()
        result = evaluate_fn(0, arrays)
        record.centralized_loss = _metric(result, "loss")
        record.centralized_accuracy = _metric(result, "accuracy")
        record.seconds = time.perf_counter() - started
        history.append(record)
        _log_round(record, num_rounds)
        if on_round_end is not None:
            on_round_end(record, arrays)

    for server_round in range(first_round, num_rounds + 1):
        record = RoundRecord(round=server_round)
        started = time.perf_counter()

        messages = list(strategy.configure_train(
            server_round, arrays, ConfigRecord(dict(train_config or {})), grid
        ))
        record.bytes_sent = message_bytes(messages)
        replies = send_and_receive(grid, messages, timeout=timeout) if messages else []
        ok, failures = split_replies(replies)
        record.clients_replied, record.clients_failed = len(ok), len(failures)
        record.failures.extend(failures)
        record.bytes_received = message_bytes(ok)
        try:
            new_arrays, train_metrics = strategy.aggregate_train(server_round, replies)
        except Exception as err:  # a strategy that trusts its clients must not stop the run
            log(WARNING, "Round %d: aggregation failed, the global model is kept: %r", server_round, err)
            record.failures.append(f"aggregation: {err!r}")
            new_arrays, train_metrics = None, None
        # strategies that validate replies say which they rejected (error replies are counted above)
        record.failures.extend(getattr(strategy, "last_rejections", []))
        if new_arrays is not None:
            arrays = new_arrays
        if train_metrics is not None:
            for key, value in train_metrics.items():
                if key in _TRAIN_KEYS:
                    setattr(record, _TRAIN_KEYS[key], float(value))
                else:
                    record.extra[key] = value

        eval_messages = list(strategy.configure_evaluate(
            server_round, arrays, ConfigRecord(dict(evaluate_config or {})), grid
        ))
        if eval_messages:
            eval_replies = send_and_receive(grid, eval_messages, timeout=timeout)
            _, eval_failures = split_replies(eval_replies)
            record.failures.extend(f"evaluate {line}" for line in eval_failures)
            try:
                federated = strategy.aggregate_evaluate(server_round, eval_replies)
            except Exception as err:
                log(WARNING, "Round %d: evaluation aggregation failed: %r", server_round, err)
                record.failures.append(f"evaluate aggregation: {err!r}")
                federated = None
            record.federated_loss = _metric(federated, "loss")
            record.federated_accuracy = _metric(federated, "accuracy")

        if evaluate_fn is not None:
            result = evaluate_fn(server_round, arrays)
            record.centralized_loss = _metric(result, "loss")
            record.centralized_accuracy = _metric(result, "accuracy")

        record.seconds = time.perf_counter() - started
        history.append(record)
        _log_round(record, num_rounds)
        if on_round_end is not None:
            on_round_end(record, arrays)
    return arrays, history


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _log_round(record: RoundRecord, num_rounds: int) -> None:
    log(
        INFO,
        "[round %d/%d] central acc %s loss %s | federated acc %s | train loss %s | "
        "%d replied, %d failed | %.1f kB up | %.2f s",
        record.round, num_rounds, _fmt(record.centralized_accuracy), _fmt(record.centralized_loss),
        _fmt(record.federated_accuracy), _fmt(record.train_loss), record.clients_replied,
        record.clients_failed, record.bytes_received / 1e3, record.seconds,
    )
    for line in record.failures:
        log(WARNING, "[round %d] failure: %s", record.round, line)
