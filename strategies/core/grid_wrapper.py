"""A Flower ``Grid`` that hands every call to another grid: the base of the server's grid layers.

DP-FedAvg hands its inner strategy a grid that lists only the nodes it sampled
(:class:`strategies.private.dp_fedavg.SampledNodes`). The server stacks small layers on Flower's grid, each changing one method: short polls for
replies (:class:`fl_app.server.polling.ShortPollGrid`), a record of who trained
(:class:`fl_app.delivery.shipping.TrainReplyRecorder`), and a deadline on waiting for nodes
(:class:`fl_app.server.round_loop.PatientGrid`). Each subclasses :class:`GridWrapper` and
overrides its method; everything else is delegated explicitly, so each layer is a ``Grid`` that
strategies can be handed, and nothing is forwarded by attribute lookup.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run


class GridWrapper(Grid):
    """Delegates every ``Grid`` method to ``inner``; subclasses override what they change."""

    def __init__(self, inner: Grid) -> None:
        self.inner = inner

    def set_run(self, run: Run) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        return self.inner.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.inner.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.inner.send_and_receive(messages, timeout=timeout)
