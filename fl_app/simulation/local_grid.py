"""An in-process Flower grid, for experiments and benchmarks with many virtual clients.

:class:`LocalGrid` answers the messages of any Message-API strategy by calling this app's
ClientApp handlers (:func:`fl_app.client_app.train`, :func:`~fl_app.client_app.evaluate`, ``query``) in the
calling process, one node after another, with a Flower ``Context`` per node (``partition-id``,
``num-partitions``) — the same code path as Flower's simulation engine, without Ray, gRPC or one
process per worker. A handler's exception becomes an error reply, as Flower does. Together with
:func:`fl_app.server.round_loop.run_rounds` it runs whole federations inside a script (see
:func:`run_local_federation`); ``flwr run`` remains the way to run the app itself.
"""

from __future__ import annotations

import time
import traceback
import uuid
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from flwr.app import ArrayRecord, Context, Error, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fl_app.config.settings import Settings
from fl_app.server.run_directory import RoundRecord

if TYPE_CHECKING:
    from fl_app.server.round_loop import ReplyObserver, RoundCallback


def _ensure_task_identity() -> None:
    """Flower messages carry run and task ids; outside a real run they must be set once."""
    for name in ("run_id", "task_id", "node_id"):
        if getattr(TaskIdentity, f"_{name}") is None:
            setattr(TaskIdentity, name, 0 if name == "node_id" else 1)


class LocalGrid(Grid):
    """A Flower ``Grid`` whose nodes are this process: strategies and :func:`run_rounds` use it as
    they use Flower's.

    Node ``i`` (node id ``i + 1``) is partition ``i``. ``node_configs`` may add keys per node
    (e.g. ``data-path``). A pushed message is answered at once by the ClientApp handler; its
    reply waits until it is pulled.
    """

    def __init__(
        self,
        run_config: Mapping[str, Any],
        num_nodes: int,
        node_configs: Mapping[int, Mapping[str, Any]] | None = None,
    ) -> None:
        _ensure_task_identity()
        self.run_config = dict(run_config)
        self._run = Run.create_empty(run_id=1)
        self.contexts = {
            i + 1: Context(
                run_id=1,
                node_id=i + 1,
                node_config={"partition-id": i, "num-partitions": num_nodes, **dict((node_configs or {}).get(i, {}))},
                state=RecordDict(),
                run_config=self.run_config,
            )
            for i in range(num_nodes)
        }
        self.seconds_in_clients = 0.0
        self._replies: dict[str, Message] = {}

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        messages = list(messages)
        for message in messages:  # Flower's grid gives a pushed message its id (its content hash)
            if not message.metadata.message_id:
                message.metadata.__dict__["_message_id"] = uuid.uuid4().hex
        ids = []
        for reply in self.send_and_receive(messages):
            self._replies[reply.metadata.reply_to_message_id] = reply
            ids.append(reply.metadata.reply_to_message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        from fl_app import client_app

        replies = []
        for message in messages:
            context = self.contexts[message.metadata.dst_node_id]
            handlers = {MessageType.TRAIN: client_app.train, MessageType.QUERY: client_app.query}
            handler = handlers.get(message.metadata.message_type, client_app.evaluate)
            started = time.perf_counter()
            try:
                replies.append(handler(message, context))
            except Exception as err:  # as Flower does: the failure becomes the node's error reply
                reason = f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=3)}"
                replies.append(Message(Error(code=1, reason=reason), reply_to=message))
            self.seconds_in_clients += time.perf_counter() - started
        return replies


def run_local_federation(
    run_config: Mapping[str, Any],
    *,
    num_rounds: int | None = None,
    evaluate_centrally: bool = True,
    on_round_end: RoundCallback | None = None,
    observe_replies: ReplyObserver | None = None,
) -> tuple[ArrayRecord, list[RoundRecord]]:
    """Run the federation that ``run_config`` describes in this process; return final arrays and history.

    ``on_round_end`` and ``observe_replies`` are handed to :func:`~fl_app.server.round_loop.run_rounds`
    (e.g. a :class:`~fl_app.server.tracking.RunTracker`'s ``log_round`` and ``observe_replies``)."""
    import tensorflow as tf

    from fl_app.server.evaluation import CentralEvaluator, model_spec
    from fl_app.server.round_loop import run_rounds
    from fl_app.server.strategy_setup import make_strategy
    from fl_app.task.models import build_model

    settings = Settings.from_run_config(run_config)
    strategy = make_strategy(settings)
    evaluate_centrally = evaluate_centrally and settings.homomorphic_encryption == "none"
    input_shape, spec, test_set = model_spec(settings)
    tf.keras.utils.set_random_seed(settings.seed)
    model = build_model(settings.model, input_shape, spec, settings.seed)
    evaluator = None
    if test_set is not None and evaluate_centrally:
        evaluator = CentralEvaluator.from_settings(settings, model, *test_set, spec)
    grid = LocalGrid(settings.to_run_config(), settings.num_partitions)
    return run_rounds(
        grid,
        strategy,
        ArrayRecord(model.get_weights()),
        num_rounds=num_rounds or settings.num_server_rounds,
        timeout=settings.round_timeout,
        evaluate_fn=evaluator,
        on_round_end=on_round_end,
        observe_replies=observe_replies,
    )
