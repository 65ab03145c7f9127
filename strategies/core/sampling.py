"""Node sampling: the parameters every Flower Message-API strategy takes, and the clients per round."""

from __future__ import annotations

import dataclasses
from typing import Any

from strategies.core.checks import at_least, in_interval


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How many nodes a round samples (run-config keys in brackets; defaults live in ``fl_app.config``).

    Attributes:
        fraction_train: share of the connected nodes sampled for training (``fraction-train``), in (0, 1].
        fraction_evaluate: share sampled for evaluation (``fraction-evaluate``), in (0, 1].
        min_train_nodes: never sample fewer for training (``min-train-clients``), >= 1.
        min_evaluate_nodes: never sample fewer for evaluation (``min-evaluate-clients``), >= 0.
        min_available_nodes: wait until this many are connected (``min-available-clients``), >= 1.
        num_nodes: the nodes of the federation, one per data partition (``num-partitions``), >= 1.
        trains_every_node: a strategy wrapped by DP, which samples for it: :meth:`kwargs` asks it to
            train every node of the grid it is handed, without waiting (see :meth:`every_node`).
    """

    fraction_train: float
    fraction_evaluate: float
    min_train_nodes: int
    min_evaluate_nodes: int
    min_available_nodes: int
    num_nodes: int
    trains_every_node: bool = False

    def __post_init__(self) -> None:
        in_interval("fraction-train", self.fraction_train, 0, 1, "(]")
        in_interval("fraction-evaluate", self.fraction_evaluate, 0, 1, "(]")
        at_least("min-train-clients", self.min_train_nodes, 1)
        at_least("min-evaluate-clients", self.min_evaluate_nodes, 0)
        at_least("min-available-clients", self.min_available_nodes, 1)
        at_least("num-partitions", self.num_nodes, 1)

    def kwargs(self) -> dict[str, Any]:
        """The node-sampling arguments every Flower Message-API strategy takes."""
        if self.trains_every_node:
            train: dict[str, Any] = {"fraction_train": 1.0, "min_train_nodes": 0, "min_available_nodes": 0}
        else:
            train = {
                "fraction_train": self.fraction_train,
                "min_train_nodes": self.min_train_nodes,
                "min_available_nodes": self.min_available_nodes,
            }
        return {**train, "fraction_evaluate": self.fraction_evaluate, "min_evaluate_nodes": self.min_evaluate_nodes}

    def every_node(self) -> SamplingParams:
        """These parameters for a strategy inside DP: it trains exactly the nodes DP sampled (the
        grid it is handed lists only them), and evaluates as configured."""
        return dataclasses.replace(self, trains_every_node=True)

    def clients_per_round(self, *, capped: bool = True) -> int:
        """``m = max(min-train-clients, floor(fraction-train * num-partitions))``, the sample size
        Flower's FedAvg asks for with every node connected.

        ``capped`` (the default) limits it to ``num-partitions``, the clients that exist: what DP's
        fixed-size sampling and SecAgg+ run on. ``capped=False`` is the sample size as asked for
        (more than the nodes when ``min-train-clients`` says so), against which the robust rules'
        conditions are checked.
        """
        m = max(self.min_train_nodes, int(self.fraction_train * self.num_nodes))
        return min(m, self.num_nodes) if capped else m
