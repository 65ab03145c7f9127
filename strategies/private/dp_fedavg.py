"""User-level differentially private federated averaging, as a wrapper around any strategy.

:class:`DpFedAvgStrategy` wraps an inner Message-API strategy (Flower's ``FedAvg``, ``FedAdam``, …,
our :class:`~strategies.aggregation.strategy.AggregationStrategy`, or a user's own), as Flower's
``DifferentialPrivacy*`` wrappers do, and runs the private part of every round itself with its
:class:`strategies.private.central_mechanism.CentralGaussianMechanism` (the same mechanism as the
SecAgg+ path's, :mod:`fl_app.secagg.server`):

* **sampling** (``configure_train``): Poisson (each connected node joins independently with
  probability ``q``) or fixed-size (``m`` of the ``N`` connected nodes without replacement), both
  from a generator seeded by :mod:`secrets`, so that amplification by sampling is what the
  accountant assumes. The inner strategy builds the train messages for exactly those nodes (it is
  handed a grid that lists only them, :class:`SampledNodes`);
* **aggregation** (``aggregate_train``): the replies are validated (:class:`ReplyCollector`), every
  valid update is clipped to L2 norm ``C`` (fixed, or adaptive at a target quantile with a noised
  count, Andrew et al. 2021), then, with the wrapper's rule step,

      mean rule:   Delta = (1/m) sum_i clip(u_i, C)  +  N(0, (z C / m)^2 I)     (McMahan et al. 2018)
      other rule:  Delta = clip(rule(clip(u_1, C), ...), C)  +  N(0, (2 z C)^2 I)

  with ``m`` the *expected* number of clients (``q N`` or the fixed sample size), not the number
  that replied. The mean's add/remove-one-client sensitivity is ``C / m``; any other rule's
  output lies in the ball of radius ``C`` (it is clipped there), so its sensitivity is at most the
  ball's diameter ``2C``. Both are the Gaussian mechanism with noise multiplier ``z``. Failed or
  rejected clients contribute nothing (a zero row), and a round with no valid reply still
  releases noise: the mechanism ran;
* **the inner strategy's step**: the inner strategy receives the released ``w + Delta`` as the
  round's one reply (``num-examples`` 1) and applies its own server step to it (FedAvg: ``w +
  Delta``; FedAdam: an Adam step on ``Delta``; ours: ``server-learning-rate`` and momentum).
  Whatever it does and whatever state it keeps is post-processing of the released ``Delta``: it
  never sees a client's update, so the guarantee holds for any inner strategy;
* **what else is released**: the round's MetricRecord holds the mechanism's figures (epsilon,
  noise, clip norm), the released aggregate's norm and the reply counts; no client metric and not
  the exact count of clipped updates (see :mod:`fl_app.config.privacy_scope` for each field);
* **accounting**: every round is one :class:`strategies.private.accounting.DpFedAvgRound` (or a
  local-DP round spec) in a :class:`strategies.private.accounting.PrivacyAccountant`; epsilon at
  ``delta`` (RDP and, where ``dp_accounting`` supports it, PLD) goes into the round's MetricRecord,
  and ``configure_train`` raises :class:`strategies.core.errors.PrivacyBudgetExhausted` *before* a
  round that would take epsilon above the target. The accountant is part of :meth:`state_dict`.

Modes (``dp-mode``): ``central`` (the server clips), ``client-clipping`` (clients clip to the
``dp-clip-norm`` sent in the train config, the server clips again and adds the noise, so the
server never needs an unclipped update), ``local-gaussian`` / ``local-laplace`` (each client clips
and noises its own update, see :mod:`fl_app.client.update_privacy`; the server adds nothing, any rule is
post-processing, and the accountant composes the local mechanism per client and round).

Nothing here imports TensorFlow.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy

from strategies.aggregation.collector import ReplyCollector
from strategies.aggregation.guard import GuardedStrategy
from strategies.aggregation.steps import CenteredClippingStep, RuleStep, ServerStep
from strategies.aggregation.strategy import AggregationParams, AggregationStrategy, rule_step
from strategies.core.checks import at_least, in_interval, non_negative, one_of, positive
from strategies.core.clipping import clip_rows
from strategies.core.grid_wrapper import GridWrapper
from strategies.core.nodes import wait_for_nodes
from strategies.core.sampling import SamplingParams
from strategies.private.accounting import (
    METHODS,
    SAMPLINGS,
    LocalGaussianRound,
    LocalLaplaceRound,
    RoundSpec,
    calibrate_noise_multiplier,
)
from strategies.private.central_mechanism import CentralGaussianMechanism

DP_MODES = ("central", "client-clipping", "local-gaussian", "local-laplace")
SERVER_NOISE_MODES = ("central", "client-clipping")
RELEASE_NODE_ID = 0
"""The source node id of the one reply the inner strategy receives: the released aggregate."""


class SampledNodes(GridWrapper):
    """The server's grid, listing only the nodes DP sampled this round (the inner strategy's view)."""

    def __init__(self, inner: Grid, nodes: Iterable[int]) -> None:
        super().__init__(inner)
        self.nodes = list(nodes)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)


class DpFedAvgStrategy(Strategy):
    """Central user-level DP around ``inner`` (and the server side of client clipping and local DP).

    Sampling, clipping, noise, accounting and the budget stop are those of ``mechanism``.

    Parameters
    ----------
    inner : the strategy whose server step is applied to the released aggregate; it must train
        every node of the grid it is handed (e.g. ``fraction_train=1.0, min_train_nodes=0,
        min_available_nodes=0``): :meth:`configure_train` checks it
    mechanism : the central Gaussian mechanism of the run (its ``mean`` must match ``rule``; its
        ``local_round`` is set exactly for the local modes)
    rule : the aggregation rule under DP (default the mean: DP-FedAvg)
    mode : one of :data:`DP_MODES`
    collector : decoding and validation of the replies (default: full weights, no norm limit)
    min_available_nodes : wait for this many connected nodes before sampling
    """

    validates_replies = True
    """:meth:`aggregate_train` validates every reply with its collector."""
    min_train_replies = 0
    """The round loop's minimum of replies: the mechanism runs (and is accounted) on any sample."""

    def __init__(
        self,
        inner: Strategy,
        mechanism: CentralGaussianMechanism,
        *,
        rule: RuleStep | None = None,
        mode: str = "central",
        collector: ReplyCollector | None = None,
        min_available_nodes: int = 1,
    ) -> None:
        one_of("dp-mode", mode, DP_MODES)
        rule = rule or RuleStep.mean()
        if isinstance(inner, (DpFedAvgStrategy, GuardedStrategy)):
            raise ValueError(f"the strategy inside DP must be a plain strategy, got {type(inner).__name__}")
        if mechanism.local_round is None and mechanism.mean_rule != rule.is_mean:
            raise ValueError(
                f"the mechanism's sensitivity is for {'the mean' if mechanism.mean_rule else 'a clipped rule output'}"
                f" but the rule is {rule.name}: build it with mean={rule.is_mean}"
            )
        if (mode in SERVER_NOISE_MODES) != (mechanism.local_round is None):
            raise ValueError(
                f"dp-mode '{mode}' needs a mechanism {'without' if mode in SERVER_NOISE_MODES else 'with'} a local round"
            )
        at_least("min-available-clients", min_available_nodes, 0)
        self.inner = GuardedStrategy(inner)
        self.mechanism = mechanism
        self.rule = rule
        self.mode = mode
        self.collector = collector or ReplyCollector()
        self.min_available_nodes = int(min_available_nodes)
        self._round_spec: RoundSpec | None = None
        self._sampled: list[int] = []
        self._instruction: Message | None = None

    # ----------------------------------------------------------------------------- RoundReporting

    @property
    def dp_mode(self) -> str:
        """``dp-mode``: this strategy is differentially private."""
        return self.mode

    @property
    def stop_reason(self) -> str | None:
        """Why training stopped before the last round (the privacy budget), or None."""
        return self.mechanism.stop_reason

    def rejections(self) -> list[str]:
        """The replies the last :meth:`aggregate_train` rejected, as ``"node <id>: <reason>"``."""
        return self.collector.rejections()

    def state_dict(self) -> dict[str, Any]:
        """The privacy accountant and the adaptive clip norm, and the inner strategy's state under ``inner``."""
        return {**self.mechanism.state_dict(), "inner": self.inner.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.mechanism.load_state_dict(state)
        if "inner" in state:
            self.inner.load_state_dict(state["inner"])

    # ----------------------------------------------------------------------------- quantities

    @property
    def noise_multiplier(self) -> float:
        """``z``, the total noise multiplier."""
        return self.mechanism.noise_multiplier

    @property
    def clip_norm(self) -> float:
        """The clip norm ``C`` of the next round."""
        return self.mechanism.clip_norm

    def summary(self) -> None:
        mechanism = self.mechanism
        log(
            INFO,
            "\t├──> DP (%s): %s, z %s, C %s, m %s (%s sampling), delta %s, %s accounting, target epsilon %s",
            self.mode,
            self.rule,
            mechanism.noise_multiplier,
            mechanism.clip_norm,
            mechanism.expected_clients,
            mechanism.sampling,
            mechanism.delta,
            mechanism.accounting,
            mechanism.target_epsilon,
        )
        log(INFO, "\t├──> inside DP: %s", type(self.inner.inner).__name__)
        self.inner.summary()

    # ----------------------------------------------------------------------------- rounds

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.collector.start_round(arrays)
        nodes = wait_for_nodes(grid, self.min_available_nodes, None)
        spec = self.mechanism.check_budget(server_round, len(nodes))
        sampled = self.mechanism.sample(nodes)
        self._round_spec, self._sampled = spec, list(sampled)
        log(
            INFO,
            "configure_train: %s sampling chose %d of %d nodes (expected %g)",
            self.mechanism.sampling,
            len(sampled),
            len(nodes),
            self.mechanism.expected_clients,
        )
        if self.mode == "client-clipping":
            config["dp-clip-norm"] = float(self.clip_norm)
        messages = list(self.inner.configure_train(server_round, arrays, config, SampledNodes(grid, sampled)))
        addressed = sorted(message.metadata.dst_node_id for message in messages)
        if addressed != sorted(sampled):
            raise ValueError(
                f"the strategy inside DP ({type(self.inner.inner).__name__}) addressed {len(addressed)} train "
                f"messages for the {len(sampled)} nodes DP sampled: it must train every node of the grid it is "
                "handed (build it with fraction_train=1.0, min_train_nodes=0, min_available_nodes=0)"
            )
        self._instruction = messages[0] if messages else None
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        spec = self._round_spec
        if spec is None:
            raise RuntimeError("aggregate_train called before configure_train")
        collector, mechanism = self.collector, self.mechanism
        collected = collector.collect(server_round, replies)
        updates = collected.matrix()
        measurements: dict[str, float] = {
            **collector.measurements(collected),
            "dp-sampled": len(self._sampled),
            "clip-norm": mechanism.clip_norm,
            "noise-std": mechanism.noise_std(),
            "noise-multiplier": mechanism.noise_multiplier,
        }
        faults = collector.faults(collected)
        norms: np.ndarray | None = None
        if self.mode in SERVER_NOISE_MODES:
            clip = mechanism.clip_norm
            norms = mechanism.clip(updates)  # their exact count above C is not released (adaptive clipping noises it)
            aggregate = self._bounded_rule_output(updates, clip, faults)
        else:  # local DP: the updates are already private; any rule is post-processing
            aggregate = self._rule_output(updates, faults)
        # the mechanism ran (whoever replied): noise (none for local DP) and account the round
        mechanism.release(aggregate, spec, norms)
        self._round_spec = None
        measurements.update(mechanism.metrics())
        arrays, _ = self.inner.aggregate_train(server_round, [self._released(aggregate)])
        measurements["update-norm"] = float(np.linalg.norm(aggregate))
        values: dict[str, int | float | list[int] | list[float]] = {}
        values.update(measurements)  # no client metric: they are not covered by epsilon
        return arrays, MetricRecord(values)

    def _released(self, aggregate: np.ndarray) -> Message:
        """The inner strategy's one reply: the global model plus the released aggregate."""
        layout = self.collector.layout
        weighted_by = self.inner.inner.weighted_by_key if isinstance(self.inner.inner, FedAvg) else "num-examples"
        content = RecordDict(
            {
                "arrays": layout.unflatten(self.collector.global_flat + aggregate),
                "metrics": MetricRecord({weighted_by: 1}),
            }
        )
        instruction = self._instruction or Message(
            RecordDict(), dst_node_id=RELEASE_NODE_ID, message_type=MessageType.TRAIN
        )
        return Message(content, reply_to=instruction)

    def _rule_output(self, updates: np.ndarray, faults: int) -> np.ndarray:
        """The rule's output (zero when it cannot run on these replies or fails to give a finite
        vector of the model's size)."""
        count, size = updates.shape
        if count == 0 or self.rule.cannot_run(count, faults):
            return np.zeros(size, np.float32)
        output, _ = self.rule(updates, np.ones(count), faults)
        return output if output.shape == (size,) and np.isfinite(output).all() else np.zeros(size, np.float32)

    def _bounded_rule_output(self, clipped: np.ndarray, clip: float, faults: int) -> np.ndarray:
        """``sum / m`` for the mean; otherwise the rule's output clipped to ``C``, so the
        sensitivity is the mechanism's (:attr:`CentralGaussianMechanism.sensitivity`)."""
        if self.rule.is_mean:
            return self.mechanism.mean(clipped)
        output = self._rule_output(clipped, faults).reshape(1, -1)
        clip_rows(output, clip)
        return output[0]

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)


# --------------------------------------------------------------------------------- factory


@dataclasses.dataclass(frozen=True)
class DpParams:
    """The ``dp-*`` settings of DP-FedAvg (run-config keys in brackets; defaults live in ``fl_app.config``).

    Attributes:
        mode: ``central``, ``client-clipping``, ``local-gaussian`` or ``local-laplace`` (``dp-mode``).
        noise_multiplier: z (``dp-noise-multiplier``), >= 0; 0 with a target epsilon calibrates z.
        clip_norm: C, the L2 clip norm of an update (``dp-clip-norm``), > 0.
        clip_quantile: adaptive clipping at this quantile (``dp-clip-quantile``), in [0, 1] (0: fixed C).
        clip_learning_rate: eta of the geometric clip update (``dp-clip-learning-rate``), > 0.
        clip_count_noise: noise std of the clipped count (``dp-clip-count-noise``), >= 0 (0: m / 20).
        sampling: ``poisson`` or ``fixed-size`` (``dp-sampling``).
        delta: delta at which epsilon is reported (``dp-delta``), in (0, 1).
        accounting: ``rdp`` or ``pld`` (``dp-accounting``).
        target_epsilon: stop before a round would exceed it (``dp-target-epsilon``), >= 0 (0: no budget).
        local_epsilon: per-round epsilon of ``local-laplace`` (``dp-local-epsilon``), > 0.
        num_rounds: the rounds a calibrated z must last (``num-server-rounds``), >= 1.
        inner_strategy: the strategy inside DP, whose server step takes the released aggregate
            (``dp-inner-strategy``): ``fedavg`` (``w + eta Delta`` with ``server-learning-rate`` and
            ``server-momentum``), another of Flower's strategies, or ``package.module:Name``.
        ftrl_epoch_rounds: ``strategy='dp-ftrl'`` only: rounds per epoch, after which its tree restarts
            (``dp-ftrl-epoch-rounds``), >= 0 (0: when every connected node has been asked).
    """

    mode: str
    noise_multiplier: float
    clip_norm: float
    clip_quantile: float
    clip_learning_rate: float
    clip_count_noise: float
    sampling: str
    delta: float
    accounting: str
    target_epsilon: float
    local_epsilon: float
    num_rounds: int
    inner_strategy: str
    ftrl_epoch_rounds: int = 0

    def __post_init__(self) -> None:
        one_of("dp-mode", self.mode, DP_MODES)
        one_of("dp-sampling", self.sampling, SAMPLINGS)
        one_of("dp-accounting", self.accounting, METHODS)
        non_negative("dp-noise-multiplier", self.noise_multiplier)
        non_negative("dp-target-epsilon", self.target_epsilon)
        non_negative("dp-clip-count-noise", self.clip_count_noise)
        positive("dp-clip-norm", self.clip_norm)
        positive("dp-clip-learning-rate", self.clip_learning_rate)
        positive("dp-local-epsilon", self.local_epsilon)
        in_interval("dp-clip-quantile", self.clip_quantile, 0, 1, "[]", " (0: fixed clipping)")
        in_interval("dp-delta", self.delta, 0, 1, "()")
        at_least("num-server-rounds", self.num_rounds, 1)
        at_least("dp-ftrl-epoch-rounds", self.ftrl_epoch_rounds, 0)


def dp_sampling_params(sampling: SamplingParams, dp: DpParams) -> dict[str, Any]:
    """``num_clients``, ``sampling``, ``sampling_rate`` / ``clients_per_round`` of :class:`DpFedAvgStrategy`.

    ``N = num-partitions``. Poisson: ``q = fraction-train``. Fixed-size: ``m =
    min(max(min-train-clients, floor(fraction-train * N)), N)`` (as FedAvg samples).
    """
    params: dict[str, Any] = {
        "num_clients": sampling.num_nodes,
        "sampling": dp.sampling,
        "sampling_rate": sampling.fraction_train,
    }
    if dp.sampling == "fixed-size":
        params["clients_per_round"] = sampling.clients_per_round()
    return params


def calibrated_noise_multiplier(sampling: SamplingParams, dp: DpParams) -> float:
    """``z``: ``dp-noise-multiplier``, or, when it is 0 and ``dp-target-epsilon`` > 0 with server
    noise, the smallest ``z`` whose epsilon after ``num-server-rounds`` rounds is at most the target
    (:func:`strategies.private.accounting.calibrate_noise_multiplier`)."""
    if dp.noise_multiplier > 0 or dp.target_epsilon <= 0 or dp.mode not in SERVER_NOISE_MODES:
        return dp.noise_multiplier
    params = dp_sampling_params(sampling, dp)
    m = params.get("clients_per_round") or params["sampling_rate"] * params["num_clients"]
    return calibrate_noise_multiplier(
        dp.target_epsilon,
        dp.delta,
        dp.num_rounds,
        num_clients=params["num_clients"],
        clients_per_round=m,
        sampling=params["sampling"],
        method="pld" if dp.accounting == "pld" else "rdp",  # DpParams checked it is one of the two
    )


def check_dp_combination(aggregation: AggregationParams) -> None:
    """Refuse combinations whose epsilon cannot be honestly reported (errors name the keys)."""
    if aggregation.weighting != "uniform":
        raise ValueError(
            f"strategy='dp-fedavg' needs client-weighting='uniform', got '{aggregation.weighting}': weights "
            f"from the clients' num-examples make the sensitivity of the average unbounded"
        )
    if aggregation.norm_bound > 0:
        raise ValueError("strategy='dp-fedavg' clips with dp-clip-norm; set norm-bound=0")
    if aggregation.norm_bound_quantile > 0:
        raise ValueError(
            "strategy='dp-fedavg' cannot use norm-bound-quantile (a noise-free quantile of the update "
            "norms leaks them): use dp-clip-quantile for private adaptive clipping"
        )
    if aggregation.pre_aggregation:
        raise ValueError(
            f"strategy='dp-fedavg' cannot use pre-aggregation='{aggregation.pre_aggregation}': mixing or "
            "bucketing spreads one client's update over several rows, which the noise's sensitivity does not "
            "cover; set pre-aggregation=''"
        )
    if aggregation.weak_dp_noise_std > 0:
        raise ValueError("strategy='dp-fedavg' adds calibrated noise already; set weak-dp-noise-std=0")


def dp_mechanism(
    sampling: SamplingParams,
    dp: DpParams,
    *,
    mean: bool,
    noise_multiplier: float | None = None,
    rng: np.random.Generator | None = None,
) -> CentralGaussianMechanism:
    """The run's :class:`CentralGaussianMechanism` from the ``dp-*`` settings; ``mean``: the rule is
    the mean (sensitivity ``C / m``); ``noise_multiplier`` None: ``dp-noise-multiplier``, calibrated
    to ``dp-target-epsilon`` when it is 0 (:func:`calibrated_noise_multiplier`)."""
    local_round: RoundSpec | None = None
    z = calibrated_noise_multiplier(sampling, dp) if noise_multiplier is None else noise_multiplier
    if dp.mode == "local-gaussian":
        local_round = LocalGaussianRound(float(dp.clip_norm), float(z) * float(dp.clip_norm))
    elif dp.mode == "local-laplace":
        local_round = LocalLaplaceRound(float(dp.local_epsilon))
    if dp.clip_quantile and dp.mode != "central":
        raise ValueError("adaptive clipping (dp-clip-quantile > 0) needs dp-mode='central'")
    return CentralGaussianMechanism(
        noise_multiplier=z,
        clip_norm=dp.clip_norm,
        mean=mean,
        delta=dp.delta,
        accounting=dp.accounting,
        target_epsilon=dp.target_epsilon or None,
        clip_quantile=dp.clip_quantile or None,
        clip_learning_rate=dp.clip_learning_rate,
        count_noise_std=dp.clip_count_noise or None,
        local_round=local_round,
        rng=rng,
        **dp_sampling_params(sampling, dp),
    )


def build_dp_strategy(
    aggregation: AggregationParams,
    dp: DpParams,
    *,
    inner: Strategy | None = None,
    noise_multiplier: float | None = None,
    rng: np.random.Generator | None = None,
) -> DpFedAvgStrategy:
    """The ``dp-fedavg`` strategy: DP with the rule ``aggregation.rule`` (``aggregation-rule``) around
    ``inner`` (default: ``w + eta Delta`` with ``server-learning-rate`` and ``server-momentum``).

    ``inner`` must train every node of the grid it is handed (build it with
    :meth:`strategies.core.sampling.SamplingParams.every_node`'s arguments).
    ``noise_multiplier`` None calibrates ``z`` to the target when ``dp-noise-multiplier`` is 0 (seconds).
    """
    check_dp_combination(aggregation)
    rule = rule_step(aggregation.rule, aggregation)  # validates the rule and its conditions
    if isinstance(rule, CenteredClippingStep):
        # A centre carried from un-noised past aggregates would make a round depend on clients it
        # did not sample, which the accountant's amplification by sampling does not allow: under DP
        # every round starts centered clipping from zero.
        rule = RuleStep(rule.rule, rule.name, rule.params)
    sampling = aggregation.sampling
    if inner is None:
        inner = AggregationStrategy(
            RuleStep.mean(),
            server_step=ServerStep(aggregation.server_learning_rate, aggregation.server_momentum),
            **sampling.every_node().kwargs(),
        )
    return DpFedAvgStrategy(
        inner,
        dp_mechanism(sampling, dp, mean=rule.is_mean, noise_multiplier=noise_multiplier, rng=rng),
        rule=rule,
        mode=dp.mode,
        collector=aggregation.collector(),
        min_available_nodes=sampling.min_available_nodes,
    )
