"""User-level differentially private federated averaging on Flower's Message API.

:class:`DpFedAvgStrategy` is :class:`strategies.aggregation.strategy.AggregationStrategy` with three
changes, all made by its :class:`strategies.private.central_mechanism.CentralGaussianMechanism`
(the same mechanism as the SecAgg+ path's, :mod:`fl_app.secagg.server`):

* **sampling** (``configure_train``): Poisson (each connected node joins independently with
  probability ``q``) or fixed-size (``m`` of the ``N`` connected nodes without replacement), both
  from a generator seeded by :mod:`secrets`, so that amplification by sampling is what the
  accountant assumes;
* **aggregation** (``aggregate_train``): every valid update is clipped to L2 norm ``C`` (fixed, or
  adaptive at a target quantile with a noised count, Andrew et al. 2021), then

      mean rule:   Delta = (1/m) sum_i clip(u_i, C)  +  N(0, (z C / m)^2 I)     (McMahan et al. 2018)
      other rule:  Delta = clip(rule(clip(u_1, C), ...), C)  +  N(0, (2 z C)^2 I)

  with ``m`` the *expected* number of clients (``q N`` or the fixed sample size), not the number
  that replied. The mean's add/remove-one-client sensitivity is ``C / m``; any other rule's
  output lies in the ball of radius ``C`` (it is clipped there), so its sensitivity is at most the
  ball's diameter ``2C``. Both are the Gaussian mechanism with noise multiplier ``z``. Failed or
  rejected clients contribute nothing (a zero row), and a round with no valid reply still
  releases noise: the mechanism ran;
* **accounting**: every round is one :class:`strategies.private.accounting.DpFedAvgRound` (or a local-DP
  round spec) in a :class:`strategies.private.accounting.PrivacyAccountant`; epsilon at ``delta``
  (RDP and, where ``dp_accounting`` supports it, PLD) goes into the round's MetricRecord, and
  ``configure_train`` raises :class:`strategies.core.errors.PrivacyBudgetExhausted` *before* a round
  that would take epsilon above the target. The accountant is part of :meth:`state_dict`.

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

from strategies.aggregation.strategy import AggregationParams, AggregationStrategy, Rule, round_params
from strategies.core.checks import at_least, in_interval, non_negative, one_of, positive
from strategies.core.clipping import clip_rows
from strategies.core.nodes import wait_for_nodes
from strategies.core.sampling import SamplingParams
from strategies.core.update_matrix import ModelLayout
from strategies.private.accounting import (
    METHODS,
    SAMPLINGS,
    LocalGaussianRound,
    LocalLaplaceRound,
    RoundSpec,
    calibrate_noise_multiplier,
)
from strategies.private.central_mechanism import CentralGaussianMechanism
from strategies.robust.rules import RULES, check_rule_conditions

DP_MODES = ("central", "client-clipping", "local-gaussian", "local-laplace")
SERVER_NOISE_MODES = ("central", "client-clipping")


class DpFedAvgStrategy(AggregationStrategy):
    """Central user-level DP-FedAvg (and the server side of client clipping and local DP).

    Sampling, clipping, noise, accounting and the budget stop are those of its
    :class:`~strategies.private.central_mechanism.CentralGaussianMechanism` (:attr:`mechanism`).

    Parameters
    ----------
    rule, rule_name, rule_params : the aggregation rule (``mean`` is DP-FedAvg)
    mode : one of :data:`DP_MODES`
    noise_multiplier : ``z`` (total, including the adaptive clipping count's share)
    clip_norm : ``C``; with ``clip_quantile`` the initial clip norm
    num_clients : ``N``, the population the run config expects (``num-partitions``)
    sampling : ``poisson`` (rate ``sampling_rate``) or ``fixed-size`` (``clients_per_round``)
    delta, accounting : epsilon is reported at this delta; ``rdp`` or ``pld`` decides the stop
    target_epsilon : stop before a round that would exceed it (None: no budget)
    clip_quantile, clip_learning_rate, count_noise_std : adaptive clipping (gamma, eta, sigma_b;
        ``count_noise_std`` None: ``m / 20`` as Andrew et al. suggest)
    local_epsilon : per-round epsilon of ``local-laplace``
    rng : noise and sampling generator (default :func:`secure_generator`; tests may pass a seeded one)
    **kwargs : :class:`AggregationStrategy` / FedAvg arguments (server step, evaluation sampling, …)
    """

    min_train_replies = 0
    """The round loop's minimum of replies: the mechanism runs (and is accounted) on any sample."""

    def __init__(
        self,
        rule: Rule,
        *,
        rule_name: str = "mean",
        rule_params: Mapping[str, Any] | None = None,
        mode: str = "central",
        noise_multiplier: float = 1.0,
        clip_norm: float = 1.0,
        num_clients: int,
        sampling: str = "poisson",
        sampling_rate: float = 1.0,
        clients_per_round: int | None = None,
        delta: float = 1e-5,
        accounting: str = "rdp",
        target_epsilon: float | None = None,
        clip_quantile: float | None = None,
        clip_learning_rate: float = 0.2,
        count_noise_std: float | None = None,
        local_epsilon: float = 1.0,
        rng: np.random.Generator | None = None,
        **kwargs: Any,
    ) -> None:
        for key in ("weighting", "norm_bound_quantile", "norm_bound"):
            if kwargs.pop(key, None) not in (None, "uniform"):
                raise ValueError(f"{key} is not allowed with differential privacy (dp-clip-norm clips)")
        super().__init__(rule, rule_name=rule_name, rule_params=rule_params, weighting="uniform", **kwargs)
        if mode not in DP_MODES:
            raise ValueError(f"dp-mode must be one of {', '.join(DP_MODES)}; got '{mode}'")
        if clip_quantile and mode != "central":
            raise ValueError("adaptive clipping (dp-clip-quantile > 0) needs dp-mode='central'")
        local_round: RoundSpec | None = None
        if mode == "local-gaussian":
            local_round = LocalGaussianRound(float(clip_norm), float(noise_multiplier) * float(clip_norm))
        elif mode == "local-laplace":
            if not local_epsilon > 0:
                raise ValueError(f"dp-local-epsilon must be > 0 for local-laplace, got {local_epsilon}")
            local_round = LocalLaplaceRound(float(local_epsilon))
        self.mode = mode
        self.mechanism = CentralGaussianMechanism(
            noise_multiplier=noise_multiplier,
            clip_norm=clip_norm,
            num_clients=num_clients,
            sampling=sampling,
            sampling_rate=sampling_rate,
            clients_per_round=clients_per_round,
            mean=self.rule_name == "mean",
            delta=delta,
            accounting=accounting,
            target_epsilon=target_epsilon,
            clip_quantile=clip_quantile,
            clip_learning_rate=clip_learning_rate,
            count_noise_std=count_noise_std,
            local_round=local_round,
            rng=rng,
        )
        self._round_spec: RoundSpec | None = None
        self._sampled = 0

    @property
    def noise_multiplier(self) -> float:
        """``z``, the total noise multiplier."""
        return self.mechanism.noise_multiplier

    @property
    def clip_norm(self) -> float:
        """The clip norm ``C`` of the next round."""
        return self.mechanism.clip_norm

    @property
    def stop_reason(self) -> str | None:
        """Why training stopped before the last round (the privacy budget), or None."""
        return self.mechanism.stop_reason

    def noise_std(self) -> float:
        """Std of the Gaussian noise on the aggregate this round (0 for local modes)."""
        return self.mechanism.noise_std()

    def sample(self, nodes: list[int]) -> list[int]:
        """Poisson: each node independently with probability q; fixed-size: m without replacement."""
        return self.mechanism.sample(nodes)

    def summary(self) -> None:
        super().summary()
        mechanism = self.mechanism
        log(
            INFO,
            "\t├──> DP (%s): z %s, C %s, m %s (%s sampling), delta %s, %s accounting, target epsilon %s",
            self.mode,
            mechanism.noise_multiplier,
            mechanism.clip_norm,
            mechanism.expected_clients,
            mechanism.sampling,
            mechanism.delta,
            mechanism.accounting,
            mechanism.target_epsilon,
        )

    # ----------------------------------------------------------------------------- rounds

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._layout = ModelLayout.of(arrays)
        self._global = self.layout.flatten(arrays)
        nodes = wait_for_nodes(grid, self.min_available_nodes, None)
        spec = self.mechanism.check_budget(server_round, len(nodes))
        sampled = self.sample(nodes)
        self._round_spec = spec
        self._sampled = len(sampled)
        log(
            INFO,
            "configure_train: %s sampling chose %d of %d nodes (expected %g)",
            self.mechanism.sampling,
            len(sampled),
            len(nodes),
            self.mechanism.expected_clients,
        )
        config["server-round"] = server_round
        if self.mode == "client-clipping":
            config["dp-clip-norm"] = float(self.clip_norm)
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, sampled, MessageType.TRAIN)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self._layout is None or self._global is None or self._round_spec is None:
            raise RuntimeError("aggregate_train called before configure_train")
        collected = self.collect(server_round, replies)
        if collected.count:
            for hook in self.update_hooks:
                hook(server_round, collected)
        updates = collected.matrix()
        clip = self.clip_norm
        noise_std = self.noise_std()
        measurements: dict[str, float] = {
            "accepted-replies": collected.count,
            "rejected-replies": len(collected.rejections),
            "dp-sampled": self._sampled,
            "clip-norm": clip,
            "noise-std": noise_std,
            "noise-multiplier": self.noise_multiplier,
        }
        norms: np.ndarray | None = None
        if self.mode in SERVER_NOISE_MODES:
            norms = self.mechanism.clip(updates)
            measurements["clipped-replies"] = int(np.sum(norms > clip))
            aggregate = self._bounded_rule_output(updates, clip)
        else:  # local DP: the updates are already private; any rule is post-processing
            aggregate = self._local_rule_output(updates)
        # the mechanism ran (whoever replied): noise (none for local DP) and account the round
        self.mechanism.release(aggregate, self._round_spec, norms)
        self._round_spec = None
        measurements.update(self.mechanism.metrics())
        new_global = self._server_step(aggregate)
        weights = np.ones(collected.count)
        metrics = self._train_metrics(collected, weights) if collected.count else MetricRecord({})
        metrics.update(measurements)
        metrics["update-norm"] = float(np.linalg.norm(aggregate))
        return self.layout.unflatten(new_global), metrics

    def _rule_can_run(self, count: int) -> bool:
        if count < self.min_valid_replies:
            return False
        if self.rule_name in RULES:
            try:
                check_rule_conditions(self.rule_name, count, round_params(self.rule_name, self.rule_params, count))
            except ValueError:
                return False
        return True

    def _bounded_rule_output(self, clipped: np.ndarray, clip: float) -> np.ndarray:
        """``sum / m`` for the mean; otherwise the rule's output clipped to ``C`` (zero when the
        rule cannot run on this many replies), so the sensitivity is the mechanism's
        (:attr:`CentralGaussianMechanism.sensitivity`)."""
        size = self.layout.size
        count = clipped.shape[0]
        if self.rule_name == "mean":
            return self.mechanism.mean(clipped)
        if not self._rule_can_run(count):
            return np.zeros(size, np.float32)
        params = round_params(self.rule_name, self.rule_params, count)
        output = np.array(self.rule(clipped, np.ones(count), **params), dtype=np.float32).reshape(1, -1)
        if output.shape[1] != size or not np.isfinite(output).all():
            return np.zeros(size, np.float32)
        clip_rows(output, clip)
        return output[0]

    def _local_rule_output(self, updates: np.ndarray) -> np.ndarray:
        count = updates.shape[0]
        if count == 0 or not self._rule_can_run(count):
            return np.zeros(self.layout.size, np.float32)
        params = round_params(self.rule_name, self.rule_params, count)
        output = np.asarray(self.rule(updates, np.ones(count), **params), dtype=np.float32)
        return output if np.isfinite(output).all() else np.zeros(self.layout.size, np.float32)

    # ----------------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """Momentum, the privacy accountant and the adaptive clip norm (restore all on resume)."""
        return {**super().state_dict(), **self.mechanism.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.mechanism.load_state_dict(state)


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


def build_dp_strategy(aggregation: AggregationParams, dp: DpParams, **overrides: Any) -> DpFedAvgStrategy:
    """The ``dp-fedavg`` strategy with the rule ``aggregation.rule`` (``aggregation-rule``)."""
    from strategies.aggregation.strategy import build_aggregation_strategy

    check_dp_combination(aggregation)
    base = build_aggregation_strategy(aggregation.rule, aggregation)  # validates the rule and its conditions
    sampling = aggregation.sampling
    kwargs: dict[str, Any] = dict(
        rule_name=base.rule_name,
        rule_params=base.rule_params,
        mode=dp.mode,
        clip_norm=dp.clip_norm,
        delta=dp.delta,
        accounting=dp.accounting,
        target_epsilon=dp.target_epsilon or None,
        clip_quantile=dp.clip_quantile or None,
        clip_learning_rate=dp.clip_learning_rate,
        count_noise_std=dp.clip_count_noise or None,
        local_epsilon=dp.local_epsilon,
        max_update_norm=base.max_update_norm,
        server_learning_rate=base.server_learning_rate,
        server_momentum=base.server_momentum,
        min_valid_replies=base.min_valid_replies,
        fraction_evaluate=sampling.fraction_evaluate,
        min_evaluate_nodes=sampling.min_evaluate_nodes,
        min_available_nodes=sampling.min_available_nodes,
        **dp_sampling_params(sampling, dp),
    )
    kwargs.update(overrides)
    if "noise_multiplier" not in kwargs:  # calibration costs seconds: only when it is needed
        kwargs["noise_multiplier"] = calibrated_noise_multiplier(sampling, dp)
    return DpFedAvgStrategy(base.rule, **kwargs)
