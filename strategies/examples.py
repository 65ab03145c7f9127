"""A user's own strategy, as docs/extending.md shows: FedAvg that skips clients with tiny data.

Run it with ``fl-keras-run -- -c "strategy='strategies.examples:MinExamplesFedAvg'"``.
"""

from flwr.serverapp.strategy import FedAvg


class MinExamplesFedAvg(FedAvg):
    """FedAvg over the replies of clients that trained on at least ``min_examples`` examples."""

    min_examples = 20

    def aggregate_train(self, server_round, replies):
        replies = [r for r in replies if r.has_error() or self._enough(r)]
        return super().aggregate_train(server_round, replies)

    def _enough(self, reply):
        metrics = next(iter(reply.content.metric_records.values()))
        return metrics["num-examples"] >= self.min_examples
