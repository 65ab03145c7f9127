"""Hand-made Flower messages and a grid that answers them in-process, for strategy unit tests."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fl_app.config.settings import Settings

TaskIdentity.run_id = TaskIdentity._run_id or 1  # messages need a run id outside a real run
TaskIdentity.node_id = TaskIdentity._node_id or 0
TaskIdentity.task_id = TaskIdentity._task_id or 1


def instruction(node_id: int, message_type: str = MessageType.TRAIN) -> Message:
    return Message(content=RecordDict({"config": ConfigRecord({})}), dst_node_id=node_id, message_type=message_type)


def reply(node_id: int, arrays: list[np.ndarray] | ArrayRecord, num_examples: float = 10, **metrics: float) -> Message:
    record = arrays if isinstance(arrays, ArrayRecord) else ArrayRecord(arrays)
    content = RecordDict({"arrays": record, "metrics": MetricRecord({**metrics, "num-examples": num_examples})})
    return Message(content=content, reply_to=instruction(node_id))


def error_reply(node_id: int, reason: str) -> Message:
    return Message(Error(code=0, reason=reason), reply_to=instruction(node_id))


class FakeGrid:
    """Enough of ``flwr.serverapp.Grid`` for strategies: node ids and an in-process round trip."""

    def __init__(self, node_ids: Iterable[int], answer: Callable[[Message], Message]) -> None:
        self.node_ids = list(node_ids)
        self.answer = answer

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        return [self.answer(m) for m in messages]


def settings_of(run_config: Mapping[str, Any] | None = None) -> Settings:
    """The settings of a run config (kebab-case keys, the rest defaults), types and ranges checked
    only: the typed parameter objects they build check the rest."""
    return Settings.parse(run_config or {})
