"""The round loop: Flower's ``Strategy.start`` template, plus a record of every round.

:func:`run_rounds` drives any Message-API strategy (Flower's built-ins and ours) through
``configure_train → send → aggregate_train → configure_evaluate → send → aggregate_evaluate →
centralized evaluation``, exactly as ``Strategy.start`` does, and in addition records per round who
replied, who failed and why, bytes sent and received, and time. The strategy runs inside a
:class:`~strategies.aggregation.guard.GuardedStrategy`, so no unscreened train reply reaches it, and
the loop reads what it rejected, why it stopped and its own minimum of replies through the guard's
:class:`~strategies.core.reporting.RoundReporting` interface only. It never lets a client's reply
crash the server: if a strategy's aggregation raises, the round keeps the previous global model and
the error goes into the history.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from logging import WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fl_app.server.progress import RoundProgress
from fl_app.server.run_directory import RoundRecord
from strategies.aggregation.guard import GuardedStrategy
from strategies.core.errors import StopTraining
from strategies.core.grid_wrapper import GridWrapper
from strategies.core.nodes import NodesUnavailable

EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]
RoundCallback = Callable[[RoundRecord, ArrayRecord], None]
ReplyObserver = Callable[[int, ArrayRecord, list[Message]], None]
"""``observe(server_round, global_arrays, replies)``: sees a round's train replies with content
before aggregation (e.g. :meth:`fl_app.server.tracking.RunTracker.observe_replies`); must not change them."""


def message_bytes(messages: Iterable[Message]) -> int:
    """Bytes of the arrays that ``messages`` carry (what dominates the traffic)."""
    total = 0
    for message in messages:
        if message.has_content():
            total += sum(r.count_bytes() for r in message.content.array_records.values())
    return total


def split_replies(replies: Iterable[Message], messages: Iterable[Message] = ()) -> tuple[list[Message], list[str]]:
    """The replies with content, and a ``"node <id>: <reason>"`` line for each error reply.

    An error reply that the SuperLink makes itself (e.g. "Node Unavailable" for a node that
    stopped sending heartbeats) comes from the SuperLink's own id: the node is then the
    destination of the ``messages`` entry that the reply answers.
    """
    destination = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
    ok, failures = [], []
    for reply in replies:
        if reply.has_error():
            node = destination.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            failures.append(f"node {node}: {reply.error.reason}")
        else:
            ok.append(reply)
    return ok, failures


MAX_METRICS = ("dp-sgd-epsilon",)
"""Client metrics the history reports as their largest value over the round's replies."""


def max_of_reply_metrics(replies: Iterable[Message]) -> dict[str, float]:
    """``{"<key>-max": largest value}`` of each :data:`MAX_METRICS` key that the replies carry."""
    out: dict[str, float] = {}
    for reply in replies:
        for record in reply.content.metric_records.values():
            for key in MAX_METRICS:
                value = record.get(key)
                if isinstance(value, (int, float)):
                    out[f"{key}-max"] = max(out.get(f"{key}-max", float(value)), float(value))
    return out


class PatientGrid(GridWrapper):
    """A :class:`Grid` whose ``get_node_ids`` gives up once a phase has waited ``timeout`` s.

    Flower's strategies, and ours through :func:`strategies.core.nodes.wait_for_nodes`, sample
    nodes by calling ``grid.get_node_ids()`` once a second until ``min_available_nodes`` are
    connected, without a limit: one node that crashed for good would
    stop the run. Before each phase :func:`run_rounds` calls :meth:`start_phase`; a strategy that
    is still waiting for nodes after ``timeout`` seconds gets :class:`NodesUnavailable`, and the
    round goes on without that phase. Everything else is the wrapped grid's.
    """

    def __init__(self, grid: Grid) -> None:
        super().__init__(grid)
        self._deadline: float | None = None
        self._timeout = 0.0

    def start_phase(self, timeout: float) -> None:
        self._timeout = timeout
        self._deadline = time.monotonic() + timeout

    def get_node_ids(self) -> Iterable[int]:
        node_ids = self.inner.get_node_ids()
        if self._deadline is not None and time.monotonic() > self._deadline:
            raise NodesUnavailable(
                f"only {len(list(node_ids))} node(s) connected after waiting {self._timeout:g} s "
                "(round-timeout) for the strategy's min-available-clients"
            )
        return node_ids


def missing_replies(messages: Iterable[Message], replies: Iterable[Message], timeout: float) -> list[str]:
    """A ``"node <id>: ..."`` line for each node that was sent a message but never answered
    (crashed, killed, cut off, or slower than ``timeout``)."""
    answered = {reply.metadata.reply_to_message_id for reply in replies}
    return [
        f"node {node}: no reply within the round timeout ({timeout:g} s)"
        for node in sorted(m.metadata.dst_node_id for m in messages if m.metadata.message_id not in answered)
    ]


def _record_evaluation(record: RoundRecord, result: MetricRecord | None) -> None:
    """The centralized evaluation's metrics under their Keras names; ``backdoor-success`` (a simulated
    backdoor's measurement, not a metric of the model) in ``extra``."""
    results = dict(result or {})
    backdoor = results.pop("backdoor-success", None)
    record.set_metrics("centralized", results)
    if isinstance(backdoor, (int, float)):
        record.extra["backdoor-success"] = float(backdoor)


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
    min_train_replies: int = 1,
    sampling_seed: int | None = None,
    observe_replies: ReplyObserver | None = None,
) -> tuple[ArrayRecord, list[RoundRecord]]:
    """Run rounds ``first_round..num_rounds``; return the final arrays and the history.

    ``strategy`` is guarded (:meth:`GuardedStrategy.around`) unless it is already. A round with
    fewer than ``min_train_replies`` training replies (or the strategy's own lower bound,
    ``min_train_replies`` of its RoundReporting) keeps the previous global model (and says so in
    the history); the replies the guard or strategy rejects are recorded as failures. Nodes that
    do not answer within ``timeout`` are recorded as failures. With ``sampling_seed``, Python's ``random`` (which Flower's strategies sample
    nodes with) is seeded with ``(sampling_seed, round)`` before each round, so a resumed run
    samples as an uninterrupted one would from the same nodes.

    ``on_round_end(record, arrays)`` is called after every round (and after round 0, the
    evaluation of the initial model, when ``first_round == 1``), e.g. to write the history and a
    checkpoint. ``observe_replies(round, arrays, replies)`` sees each round's train replies with
    content, and the global arrays they answer, before aggregation.
    """
    history: list[RoundRecord] = []
    arrays = initial_arrays
    progress = RoundProgress(num_rounds, first_round)
    patient = PatientGrid(grid)
    guarded = GuardedStrategy.around(strategy)
    # a strategy may lower the bar: DP-FedAvg runs its mechanism (noise) on an empty Poisson sample
    if guarded.min_train_replies is not None:
        min_train_replies = min(min_train_replies, guarded.min_train_replies)
    if evaluate_fn is not None and first_round == 1:
        record = RoundRecord(round=0)
        started = time.perf_counter()
        _record_evaluation(record, evaluate_fn(0, arrays))
        _close_round(record, started, history, progress, on_round_end, arrays)

    for server_round in range(first_round, num_rounds + 1):
        record = RoundRecord(round=server_round)
        started = time.perf_counter()
        if sampling_seed is not None:
            random.seed(f"{sampling_seed}/{server_round}")

        patient.start_phase(timeout)
        try:
            messages = list(
                guarded.configure_train(server_round, arrays, ConfigRecord(dict(train_config or {})), patient)
            )
        except StopTraining as err:  # e.g. the privacy budget: end after the last completed round
            log(WARNING, "Training stops before round %d: %s", server_round, err)
            break
        except NodesUnavailable as err:
            record.failures.append(f"train sampling: {err}")
            messages = []
        record.bytes_sent = message_bytes(messages)
        replies = list(patient.send_and_receive(messages, timeout=timeout)) if messages else []
        ok, failures = split_replies(replies, messages)
        failures += missing_replies(messages, replies, timeout)
        record.clients_replied, record.clients_failed = len(ok), len(failures)
        record.failures.extend(failures)
        record.bytes_received = message_bytes(ok)
        record.extra.update(max_of_reply_metrics(ok))
        if observe_replies is not None:
            observe_replies(server_round, arrays, ok)
        if len(ok) < min_train_replies:
            log(
                WARNING,
                "Round %d: %d valid replies < min-train-replies (%d), the global model is kept",
                server_round,
                len(ok),
                min_train_replies,
            )
            record.failures.append(
                f"round skipped: {len(ok)} valid replies < min-train-replies ({min_train_replies}); "
                "the global model is kept"
            )
            new_arrays, train_metrics = None, None
        else:
            try:
                new_arrays, train_metrics = guarded.aggregate_train(server_round, replies)
            except Exception as err:  # a strategy that trusts its clients must not stop the run
                log(WARNING, "Round %d: aggregation failed, the global model is kept: %r", server_round, err)
                record.failures.append(f"aggregation: {err!r}")
                new_arrays, train_metrics = None, None
            # the replies the guard or the strategy rejected (error replies are counted above)
            rejected = guarded.rejections()
            record.failures.extend(rejected)
            record.extra["rejected"] = len(rejected)
        if new_arrays is not None:
            arrays = new_arrays
        if train_metrics is not None:  # the clients' train-<Keras name> means; the rest as it is
            record.extra.update(record.set_metrics("train", train_metrics, prefix="train-"))

        patient.start_phase(timeout)
        try:
            eval_messages = list(
                guarded.configure_evaluate(server_round, arrays, ConfigRecord(dict(evaluate_config or {})), patient)
            )
        except NodesUnavailable as err:
            record.failures.append(f"evaluate sampling: {err}")
            eval_messages = []
        if eval_messages:
            eval_replies = list(patient.send_and_receive(eval_messages, timeout=timeout))
            _, eval_failures = split_replies(eval_replies, eval_messages)
            eval_failures += missing_replies(eval_messages, eval_replies, timeout)
            record.failures.extend(f"evaluate {line}" for line in eval_failures)
            try:
                federated = guarded.aggregate_evaluate(server_round, eval_replies)
            except Exception as err:
                log(WARNING, "Round %d: evaluation aggregation failed: %r", server_round, err)
                record.failures.append(f"evaluate aggregation: {err!r}")
                federated = None
            record.set_metrics("federated", {k: v for k, v in (federated or {}).items() if k != "num-examples"})

        if evaluate_fn is not None:
            _record_evaluation(record, evaluate_fn(server_round, arrays))

        _close_round(record, started, history, progress, on_round_end, arrays)
    return arrays, history


def _close_round(
    record: RoundRecord,
    started: float,
    history: list[RoundRecord],
    progress: RoundProgress,
    on_round_end: RoundCallback | None,
    arrays: ArrayRecord,
) -> None:
    """Time, keep, report (one progress line) and hand on a finished round."""
    record.seconds = time.perf_counter() - started
    record.finished_at = time.time()
    history.append(record)
    progress.report(record)
    if on_round_end is not None:
        on_round_end(record, arrays)
