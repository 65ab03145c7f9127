"""User-level DP-FTRL: differentially private federated training without sampling or shuffling.

Kairouz, McMahan, Song, Thakkar, Thakurta, Xu 2021, "Practical and private (deep) learning without
sampling or shuffling" (ICML), in its federated form (DP-FTRL with tree restarts, App. D). DP-FedAvg's
guarantee (:mod:`strategies.private.dp_fedavg`) rests on amplification by sampling, which a real
fleet cannot enforce: devices come online when they can. DP-FTRL needs no sampling; it needs only
that every user contributes at most once per epoch, which the server enforces
(:class:`strategies.private.participation.EpochParticipation`).

One round ``t`` of epoch ``e`` (:class:`DpFtrlStrategy`):

1. **participation**: ask up to ``m`` connected nodes that have not been asked in this epoch; when
   none is left (or after ``dp-ftrl-epoch-rounds`` rounds) a new epoch starts and the tree restarts;
2. **clip** every valid update ``u_i`` (client weights minus the global model) to L2 norm ``C``
   and sum: ``S_t = sum_i clip(u_i, C)`` (a reply from a node that was not asked this round is
   left out, so no user enters two leaves of one tree);
3. **tree aggregation** (:class:`strategies.private.tree_aggregation.TreeNoise`): release the prefix
   sum of the epoch's round sums with tree noise of std ``z C`` per node, and set the model to
   the FTRL iterate

       x_(t+1) = x_e + eta (sum_(s = start of epoch .. t) S_s + n_t) / m

   with ``x_e`` the released model at the start of the epoch, ``eta`` = ``server-learning-rate``,
   ``m`` the clients per round (a public constant, not the number that replied) and ``n_t`` the
   sum of the ``popcount`` tree nodes that tile the epoch's rounds so far. Without noise this is
   FedAvg with server learning rate ``eta`` and a fixed denominator ``m``;
4. **accounting**: an epoch of ``T`` rounds is ``SingleEpochTreeAggregationDpEvent(z, T)`` (RDP
   ``alpha ceil(log2(T + 1)) / (2 z^2)``), epochs compose
   (:class:`strategies.private.accounting.TreeAggregationEpoch`); epsilon at ``delta`` is
   computed by ``dp_accounting``'s RDP accountant after every round, and ``configure_train``
   raises :class:`strategies.core.errors.PrivacyBudgetExhausted` *before* a round that would take
   it above ``dp-target-epsilon``.

Neighbouring relation: ``REPLACE_SPECIAL`` ("zero-out", Definition 1.1 of the paper): two
federations differ in one user's data, replaced by a special user whose every update is zero. The
schedule of who is asked when depends on who connects, not on anyone's data, and is not hidden;
what a user's data contributes is. A user is a Flower node id: someone who takes part under two
node ids is two users to this mechanism, and the guarantee does not cover that.

The server is trusted: it sees each raw update and clips it, and the state it checkpoints (the tree
nodes' noise, the exact prefix sum) would undo the noise. Nothing here imports TensorFlow.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy

from strategies.aggregation.collector import ReplyCollector
from strategies.aggregation.strategy import AggregationParams
from strategies.core.clipping import clip_rows
from strategies.core.errors import PrivacyBudgetExhausted
from strategies.core.nodes import wait_for_nodes
from strategies.private.accounting import PrivacyAccountant, TreeAggregationEpoch
from strategies.private.dp_fedavg import DpParams, SampledNodes
from strategies.private.mechanisms import secure_generator
from strategies.private.participation import EpochParticipation
from strategies.private.tree_aggregation import TreeNoise

DP_FTRL_MODE = "dp-ftrl"
"""What :attr:`DpFtrlStrategy.dp_mode` reports (and a checkpoint records)."""


class DpFtrlStrategy(Strategy):
    """DP-FTRL with tree restarts: one contribution per node per epoch, prefix sums through tree noise.

    Parameters
    ----------
    noise_multiplier : ``z`` > 0: each tree node's noise std is ``z C``
    clip_norm : ``C``, the L2 clip norm of each update
    clients_per_round : ``m``, the most nodes a round asks, and the public denominator of the step
    server_learning_rate : ``eta`` of ``x_e + eta (prefix sum + noise) / m``
    epoch_rounds : end an epoch (restart the tree) after this many rounds; 0: when every
        connected node has been asked
    delta : epsilon is reported at this delta
    target_epsilon : stop before a round that would exceed it (None: no budget)
    evaluation : the strategy that runs federated evaluation (Flower's FedAvg with the run's
        evaluation sampling); it never sees a train reply
    collector : decoding and validation of the replies
    min_available_nodes : wait for this many connected nodes before a round
    rng : the noise and node-choice generator (default :func:`secure_generator`)
    """

    validates_replies = True
    """:meth:`aggregate_train` validates every reply with its collector."""
    min_train_replies = 0
    """The mechanism runs (and is accounted) whoever replies: a round without replies releases noise."""

    def __init__(
        self,
        *,
        noise_multiplier: float,
        clip_norm: float,
        clients_per_round: int,
        server_learning_rate: float = 1.0,
        epoch_rounds: int = 0,
        delta: float = 1e-5,
        target_epsilon: float | None = None,
        evaluation: Strategy | None = None,
        collector: ReplyCollector | None = None,
        min_available_nodes: int = 1,
        rng: np.random.Generator | None = None,
    ) -> None:
        TreeAggregationEpoch(noise_multiplier, 1)  # z > 0 and finite
        if not clip_norm > 0:
            raise ValueError(f"dp-clip-norm must be > 0, got {clip_norm}")
        if not server_learning_rate > 0:
            raise ValueError(f"server-learning-rate must be > 0, got {server_learning_rate}")
        if not 0 < delta < 1:
            raise ValueError(f"dp-delta must be in (0, 1), got {delta}")
        self.noise_multiplier = float(noise_multiplier)
        self.clip_norm = float(clip_norm)
        self.server_learning_rate = float(server_learning_rate)
        self.delta = float(delta)
        self.target_epsilon = target_epsilon if target_epsilon and target_epsilon > 0 else None
        self.participation = EpochParticipation(clients_per_round, epoch_rounds)
        self.evaluation = evaluation or FedAvg(fraction_train=1.0, min_train_nodes=0, min_available_nodes=0)
        self.collector = collector or ReplyCollector()
        self.min_available_nodes = max(1, int(min_available_nodes))
        self.rng = rng if rng is not None else secure_generator()
        self.accountant = PrivacyAccountant()
        """The epochs that ended (the current one is the tree's steps so far)."""
        self.tree: TreeNoise | None = None
        self.anchor: np.ndarray | None = None
        """``x_e``: the released model at the start of the current epoch (float32)."""
        self.prefix_sum: np.ndarray | None = None
        """The exact sum of the epoch's clipped round sums (float64): the tree's noise hides it."""
        self.stop_reason: str | None = None
        self._selected: list[int] | None = None
        self._refused: list[str] = []

    # ----------------------------------------------------------------------------- RoundReporting

    @property
    def dp_mode(self) -> str:
        """``dp-ftrl``: this strategy is differentially private."""
        return DP_FTRL_MODE

    @property
    def clients_per_round(self) -> int:
        """``m``."""
        return self.participation.clients_per_round

    def rejections(self) -> list[str]:
        """The replies the last :meth:`aggregate_train` rejected or left out, as ``"node <id>: <reason>"``."""
        return self.collector.rejections() + list(self._refused)

    def state_dict(self) -> dict[str, Any]:
        """The accountant of the ended epochs, the participation of the current one, the tree
        (node noise), the epoch's anchor model and exact prefix sum."""
        state: dict[str, Any] = {
            "privacy-accountant": self.accountant.state_dict(),
            "participation": self.participation.state_dict(),
        }
        if self.tree is not None and self.anchor is not None and self.prefix_sum is not None:
            state.update(
                tree=self.tree.state_dict(), anchor=self.anchor.copy(), **{"prefix-sum": self.prefix_sum.copy()}
            )
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        accountant = PrivacyAccountant.from_state_dict(state["privacy-accountant"])
        kinds = {entry["spec"]["kind"] for entry in state["privacy-accountant"]["rounds"]}
        if kinds - {TreeAggregationEpoch.kind}:
            raise ValueError(f"the accountant holds rounds of {sorted(kinds)}, not DP-FTRL epochs")
        self.participation.load_state_dict(state["participation"])
        if "tree" in state:
            anchor = np.asarray(state["anchor"], dtype=np.float32).ravel()
            tree = TreeNoise(anchor.size, self.noise_multiplier * self.clip_norm, self.rng)
            tree.load_state_dict(state["tree"])
            self.tree, self.anchor = tree, anchor
            self.prefix_sum = np.asarray(state["prefix-sum"], dtype=np.float64).reshape(anchor.shape)
        self.accountant = accountant

    # ----------------------------------------------------------------------------- epsilon

    @property
    def rounds(self) -> int:
        """Rounds accounted so far (ended epochs and the current one)."""
        ended = sum(entry["spec"]["steps"] * entry["count"] for entry in self.accountant.state_dict()["rounds"])
        return ended + (self.tree.steps if self.tree is not None else 0)

    def epsilon_with(self, current_steps: Iterable[int]) -> float:
        """Epsilon at ``delta`` (RDP) of the ended epochs plus epochs of ``current_steps`` rounds."""
        accountant = PrivacyAccountant.from_state_dict(self.accountant.state_dict())
        for steps in current_steps:
            if steps:
                accountant.add_round(TreeAggregationEpoch(self.noise_multiplier, steps))
        return accountant.epsilon(self.delta, "rdp")

    def epsilon(self) -> float:
        """Epsilon at ``delta`` of every round so far."""
        return self.epsilon_with([self.tree.steps if self.tree is not None else 0])

    def _check_budget(self, server_round: int, restart: bool) -> None:
        if self.target_epsilon is None:
            return
        steps = self.tree.steps if self.tree is not None else 0
        after = self.epsilon_with([steps, 1] if restart else [steps + 1])
        if after > self.target_epsilon:
            self.stop_reason = (
                f"privacy budget: round {server_round} would take epsilon from {self.epsilon():.4g} to "
                f"{after:.4g} > dp-target-epsilon {self.target_epsilon:g} (delta {self.delta:g}); training "
                f"stops after {self.rounds} private rounds"
            )
            raise PrivacyBudgetExhausted(self.stop_reason)

    # ----------------------------------------------------------------------------- rounds

    def summary(self) -> None:
        log(
            INFO,
            "\t├──> DP-FTRL: z %s, C %s, m %s, server learning rate %s, epoch rounds %s, delta %s, target epsilon %s",
            self.noise_multiplier,
            self.clip_norm,
            self.clients_per_round,
            self.server_learning_rate,
            self.participation.epoch_rounds or "until every node was asked",
            self.delta,
            self.target_epsilon,
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.collector.start_round(arrays)
        nodes = wait_for_nodes(grid, self.min_available_nodes, None)
        restart = self.participation.begins_epoch(nodes)
        self._check_budget(server_round, restart)
        selected, restart = self.participation.select(nodes, self.rng)
        if restart:
            self._start_epoch(self.collector.global_flat)
        self._selected = selected
        log(
            INFO,
            "configure_train: DP-FTRL epoch %d round %d asks %d of %d connected nodes (none asked before in the epoch)",
            self.participation.epoch,
            self.participation.rounds_in_epoch,
            len(selected),
            len(nodes),
        )
        if not selected:
            return []
        messages = list(self.evaluation.configure_train(server_round, arrays, config, SampledNodes(grid, selected)))
        if sorted(message.metadata.dst_node_id for message in messages) != selected:
            raise ValueError(
                f"the evaluation strategy ({type(self.evaluation).__name__}) addressed other nodes than the "
                f"{len(selected)} DP-FTRL asked: build it with fraction_train=1.0, min_train_nodes=0, min_available_nodes=0"
            )
        return messages

    def _start_epoch(self, model: np.ndarray) -> None:
        """Close the current epoch in the accountant and restart the tree at the released ``model``."""
        if self.tree is not None and self.tree.steps:
            self.accountant.add_round(TreeAggregationEpoch(self.noise_multiplier, self.tree.steps))
        if self.tree is None or self.tree.size != model.size:
            self.tree = TreeNoise(model.size, self.noise_multiplier * self.clip_norm, self.rng)
        self.tree.restart()
        self.anchor = np.array(model, dtype=np.float32)
        self.prefix_sum = np.zeros(model.size, np.float64)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self._selected is None or self.tree is None or self.anchor is None or self.prefix_sum is None:
            raise RuntimeError("aggregate_train called before configure_train")
        collector = self.collector
        collected = collector.collect(server_round, replies)
        updates = collected.matrix()
        self._refused = []
        for row, node in enumerate(collected.node_ids):
            reason = self.participation.refusal(node)
            if reason is not None:  # never let a user contribute twice to one tree
                updates[row] = 0.0
                self._refused.append(f"node {node}: {reason}")
        if updates.shape[0]:
            clip_rows(updates, self.clip_norm)
        round_sum = np.einsum("ij->j", updates, dtype=np.float64)
        prefix_sum = self.prefix_sum + round_sum
        noise = self.tree.next()  # the mechanism ran: the tree advances whoever replied
        self.prefix_sum = prefix_sum
        step = self.server_learning_rate / self.clients_per_round
        new_global = (self.anchor + step * (prefix_sum + noise)).astype(np.float32)
        epsilon = self.epsilon()
        metrics: dict[str, int | float | list[int] | list[float]] = {
            **collector.measurements(collected),
            "refused-replies": len(self._refused),
            "dp-asked": len(self._selected),
            "epsilon": epsilon,
            "epsilon-rdp": epsilon,
            "delta": self.delta,
            "dp-rounds": self.rounds,
            "dp-ftrl-epoch": self.participation.epoch,
            "dp-ftrl-epoch-round": self.tree.steps,
            "dp-ftrl-tree-nodes": len(self.tree.levels),
            "noise-multiplier": self.noise_multiplier,
            "clip-norm": self.clip_norm,
            "noise-std": step * self.noise_multiplier * self.clip_norm * len(self.tree.levels) ** 0.5,
            "update-norm": float(np.linalg.norm(new_global - collector.global_flat)),
        }
        if self.target_epsilon is not None:
            metrics["dp-target-epsilon"] = self.target_epsilon
        self._selected = None
        return collector.layout.unflatten(new_global), MetricRecord(metrics)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.evaluation.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.evaluation.aggregate_evaluate(server_round, replies)


def check_dp_ftrl_combination(aggregation: AggregationParams, dp: DpParams) -> None:
    """Refuse settings DP-FTRL cannot honour or would ignore (errors name the keys and the values)."""
    refusals = [
        (
            dp.noise_multiplier > 0,
            f"dp-noise-multiplier must be > 0, got {dp.noise_multiplier:g} (DP-FTRL does not calibrate z to "
            "dp-target-epsilon, which is its budget: an epoch's length depends on the nodes that connect)",
        ),
        (dp.mode == "central", f"dp-mode must be 'central' (the server clips and noises), got '{dp.mode}'"),
        (
            dp.clip_quantile == 0,
            f"dp-clip-quantile must be 0 (no adaptive clipping under the tree), got {dp.clip_quantile:g}",
        ),
        (
            dp.accounting == "rdp",
            f"dp-accounting must be 'rdp' (dp_accounting has no PLD bound for tree aggregation), got '{dp.accounting}'",
        ),
        (
            dp.inner_strategy == "fedavg",
            f"dp-inner-strategy is dp-fedavg's (DP-FTRL steps to its FTRL iterate), got '{dp.inner_strategy}'",
        ),
        (
            aggregation.rule == "mean",
            f"aggregation-rule must be 'mean' (the tree releases sums of clipped updates), got '{aggregation.rule}'",
        ),
        (
            aggregation.weighting == "uniform",
            f"client-weighting must be 'uniform' (weights from the clients' num-examples make the sensitivity "
            f"unbounded), got '{aggregation.weighting}'",
        ),
        (
            aggregation.norm_bound == 0 and aggregation.norm_bound_quantile == 0,
            "norm-bound and norm-bound-quantile must be 0 (DP-FTRL clips with dp-clip-norm)",
        ),
        (
            aggregation.server_momentum == 0,
            f"server-momentum must be 0 (the FTRL iterate has no momentum), got {aggregation.server_momentum:g}",
        ),
    ]
    for ok, message in refusals:
        if not ok:
            raise ValueError(f"strategy='dp-ftrl': {message}")


def build_dp_ftrl_strategy(
    aggregation: AggregationParams, dp: DpParams, *, rng: np.random.Generator | None = None
) -> DpFtrlStrategy:
    """The ``dp-ftrl`` strategy from the run's settings: ``m`` = max(``min-train-clients``,
    floor(``fraction-train`` x ``num-partitions``)), ``eta`` = ``server-learning-rate``, epochs of
    at most ``dp-ftrl-epoch-rounds`` rounds; federated evaluation as configured."""
    check_dp_ftrl_combination(aggregation, dp)
    sampling = aggregation.sampling
    return DpFtrlStrategy(
        noise_multiplier=dp.noise_multiplier,
        clip_norm=dp.clip_norm,
        clients_per_round=sampling.clients_per_round(),
        server_learning_rate=aggregation.server_learning_rate,
        epoch_rounds=dp.ftrl_epoch_rounds,
        delta=dp.delta,
        target_epsilon=dp.target_epsilon or None,
        evaluation=FedAvg(**sampling.every_node().kwargs()),
        collector=aggregation.collector(),
        min_available_nodes=sampling.min_available_nodes,
        rng=rng,
    )
