"""One Message-API strategy that chains validation, weights, a norm bound, any rule and a server step.

Per round, :class:`AggregationStrategy` runs its steps, each a small object that checks its
parameters when it is built and reports its measurements (as TFF's aggregator factories nest)::

    replies ──ReplyCollector──> K x P update matrix U (rows u_k = w_k - w, float32, reused buffer),
                                then its hooks (simulation only: omniscient attackers rewrite rows)
            ──ClientWeighting─> a_k: uniform | num-examples | num-examples capped at c * median
            ──NormBound───────> u_k <- u_k * min(1, M / |u_k|)  (fixed M, or M tracking a norm quantile)
            ──pre-aggregation─> (U, a) <- step(U, a) for each step in order  (NNM, bucketing, ARC)
            ──RuleStep────────> v = rule(U, a)  (mean, median, trimmed mean, Krum, Bulyan, DnC, …)
            ──WeakDpNoise─────> v <- v + N(0, sigma^2 I)  (optional, Sun et al. 2019)
            ──ServerStep──────> m <- beta * m + v ;  w <- w + eta * m

Replies with wrong shapes or dtypes, NaN/Inf, an update norm above ``max-update-norm``, a forged
``num-examples`` or a node's second reply are rejected (:mod:`strategies.core.replies`) and logged
with the node id; the round goes on with the rest. A round with fewer valid replies than the rule
needs is skipped (the global model is kept) with a warning. Sampling, evaluation and metric
aggregation are FedAvg's. The strategy implements :class:`~strategies.core.reporting.RoundReporting`
and validates its replies itself, so a :class:`~strategies.aggregation.guard.GuardedStrategy`
around it only forwards them (a plain mean stays streamed from the reply bytes).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from strategies.aggregation.collector import ReplyCollector
from strategies.aggregation.steps import WEIGHTINGS, ClientWeighting, RuleStep, ServerStep
from strategies.core.blas_threads import blas_thread_limit, server_cores
from strategies.core.checks import at_least, in_interval, non_negative, one_of, positive
from strategies.core.sampling import SamplingParams
from strategies.core.update_matrix import CollectedUpdates
from strategies.robust.preaggregation import (
    FixedNormBound,
    NormBound,
    PreAggregationStep,
    QuantileNormBound,
    build_pre_aggregation,
)
from strategies.robust.rules import RULES, UpdateRows, distances_of_rows
from strategies.robust.weak_dp import WeakDpNoise


class AggregationStrategy(FedAvg):
    """Collect → weights → bound → rule → server step, on Flower's Message API.

    Implements :class:`~strategies.core.reporting.RoundReporting` (its collector validates the replies).

    Parameters
    ----------
    rule : the rule step (:class:`~strategies.aggregation.steps.RuleStep`)
    weighting : client weights (default uniform)
    bound : a norm bound before the rule (:mod:`strategies.robust.preaggregation`); None: off
    pre_aggregation : steps after the bound and before the rule, applied in order (NNM, bucketing,
        ARC: :class:`~strategies.robust.preaggregation.PreAggregationStep`)
    noise : weak-DP noise on the rule's output (:class:`~strategies.robust.weak_dp.WeakDpNoise`); None: off
    server_step : the server's step (default ``w + v``)
    collector : decoding and validation (default: full-weight replies, no norm limit)
    min_valid_replies : skip a round with fewer valid replies
    blas_threads : BLAS threads while aggregating (Gram matrix, matrix-vector products); None:
        every core of the process's affinity (:func:`server_cores`): the clients wait for the
        aggregate, so the round's aggregation has the cores to itself
    **sampling : FedAvg's ``fraction_train``, ``min_train_nodes``, …
    """

    validates_replies = True
    """:meth:`aggregate_train` screens every reply (:mod:`strategies.core.replies`) while decoding it."""
    min_train_replies: int | None = None
    """No bound of its own on the replies a round needs: the run config's ``min-train-replies``."""
    dp_mode: str | None = None
    """Not differentially private."""

    def __init__(
        self,
        rule: RuleStep,
        *,
        weighting: ClientWeighting | None = None,
        bound: NormBound | None = None,
        pre_aggregation: Sequence[PreAggregationStep] = (),
        noise: WeakDpNoise | None = None,
        server_step: ServerStep | None = None,
        collector: ReplyCollector | None = None,
        min_valid_replies: int = 1,
        blas_threads: int | None = None,
        **sampling: Any,
    ) -> None:
        super().__init__(**sampling)
        at_least("min-valid-replies", min_valid_replies, 1)
        if blas_threads is not None:
            at_least("aggregation-threads", blas_threads, 1)
        self.blas_threads = blas_threads or server_cores()
        """BLAS threads while aggregating."""
        self.rule = rule
        self.weighting = weighting or ClientWeighting()
        self.bound = bound
        self.pre_aggregation = list(pre_aggregation)
        self.noise = noise
        self.server_step = server_step or ServerStep()
        self._new_global: np.ndarray | None = None  # the server step's output, reused: unflatten copies it
        self.collector = collector or ReplyCollector()
        self.min_valid_replies = int(min_valid_replies)

    def summary(self) -> None:
        super().summary()
        log(INFO, "\t├──> Aggregation: %s, %s", self.rule, self.weighting)
        log(INFO, "\t│\t├── reject update norm > %s; bound %s", self.collector.max_update_norm, self.bound)
        log(INFO, "\t│\t├── pre-aggregation %s; noise %s", self.pre_aggregation or "none", self.noise)
        log(INFO, "\t│\t└── %s", self.server_step)

    # ----------------------------------------------------------------------------- rounds

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.collector.start_round(arrays)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        with blas_thread_limit(self.blas_threads):
            return self._aggregate_train(server_round, list(replies))

    def _aggregate_train(
        self, server_round: int, replies: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        collector = self.collector
        collected, streamed = self._collect(server_round, replies)
        measurements = collector.measurements(collected)
        faults = collector.faults(collected)
        reason = self._cannot_aggregate(collected.count, faults)
        if reason:
            log(WARNING, "Round %d skipped, the global model is kept: %s", server_round, reason)
            return None, MetricRecord({**measurements, "round-skipped": 1})

        weights = self.weighting(collected.num_examples)
        known_finite = False  # the streamed mean was found finite where it was computed (stream_rows)
        if streamed is None:
            updates = collected.matrix()
            if self.bound is not None:
                measurements.update(self.bound(updates))
            rule_weights = weights
            for step in self.pre_aggregation:
                updates, rule_weights, step_measurements = step(updates, rule_weights, faults)
                measurements.update(step_measurements)
            aggregate, rule_measurements = self.rule(updates, rule_weights, faults)
            measurements.update(rule_measurements)
        elif isinstance(streamed, tuple):
            aggregate, rule_measurements = self.rule.of_rows(*streamed, faults)
            measurements.update(rule_measurements)
        else:
            aggregate, known_finite = streamed, True
        if self.noise is not None:
            aggregate, noise_measurements = self.noise(aggregate)
            measurements.update(noise_measurements)
            known_finite = False
        if aggregate.shape != (collector.layout.size,) or not (known_finite or np.isfinite(aggregate).all()):
            log(WARNING, "Round %d skipped: %s returned a non-finite or mis-shaped update", server_round, self.rule)
            return None, MetricRecord({**measurements, "round-skipped": 1})
        if self._new_global is None or self._new_global.shape != aggregate.shape:
            self._new_global = np.empty_like(aggregate)
        new_global = self.server_step(collector.global_flat, aggregate, out=self._new_global)  # copied below
        metrics = train_metrics(collected.metrics, weights)
        metrics.update(measurements)
        metrics["update-norm"] = float(np.linalg.norm(aggregate))
        return collector.layout.unflatten(new_global), metrics

    def _collect(
        self, server_round: int, replies: list[Message]
    ) -> tuple[CollectedUpdates, np.ndarray | tuple[UpdateRows, np.ndarray] | None]:
        """The round's valid replies and what was computed straight from their bytes: the mean's
        aggregate (:meth:`streams_mean`), or the rows and their K x K squared distances
        (:meth:`streams_distances`: one Gram matrix, :func:`strategies.robust.rules.distances_of_rows`);
        None: the K x P matrix is in ``collected``."""
        collector = self.collector
        if self.streams_mean():
            mean = collector.stream_mean(server_round, replies, self.weighting)
            if mean is not None:
                return mean
        elif self.streams_distances():
            streamed = collector.stream(server_round, replies, lambda rows, _: distances_of_rows(rows))
            if streamed is not None:
                collected, rows, distances = streamed
                return collected, None if distances is None else (rows, distances)
        elif self.streams_sorted_columns():
            sorted_columns = collector.stream(server_round, replies, lambda rows, _: self._sorted_columns_rule(rows))
            if sorted_columns is not None:
                return sorted_columns[0], sorted_columns[2]
        return collector.collect(server_round, replies), None

    def _sorted_columns_rule(self, rows: UpdateRows) -> np.ndarray:
        """The rule of :meth:`streams_sorted_columns` on the rows; when the round will be skipped
        (too few rows for the rule), only the rows' mean, which is non-finite exactly when a row
        is, so that the replies holding NaN or Inf are still found and reported."""
        if self._cannot_aggregate(rows.shape[0]):
            return rows.mean_of_rows(np.arange(rows.shape[0]))
        return self.rule.of_sorted_columns(rows)

    def streams_sorted_columns(self) -> bool:
        """Whether a round is the median or the trimmed mean computed from the reply bytes (sorted
        column blocks read straight from the replies), with no K x P matrix: as :meth:`streams_mean`."""
        return self.rule.reads_sorted_columns and self._reads_only_whole_rounds()

    def _reads_only_whole_rounds(self) -> bool:
        """Whether no bound, pre-aggregation step, decoder, norm limit or hook looks at single updates."""
        return self.bound is None and not self.pre_aggregation and not self.collector.reads_single_updates

    def streams_mean(self) -> bool:
        """Whether a round is a plain weighted mean that needs no update matrix: the rule is the
        mean and no bound, pre-aggregation step, decoder, norm limit or hook looks at single updates."""
        return self.rule.is_mean and self._reads_only_whole_rounds()

    def streams_distances(self) -> bool:
        """Whether a round is Krum, Multi-Krum or Bulyan computed from the reply bytes (a Gram
        matrix of column blocks, then the chosen rows or, for Bulyan, the sorted column blocks of
        the chosen rows), with no K x P matrix: as :meth:`streams_mean`."""
        return self.rule.reads_distances and self._reads_only_whole_rounds()

    def _cannot_aggregate(self, count: int, faults: int = 0) -> str:
        if count < self.min_valid_replies:
            return f"{count} valid replies, min-valid-replies is {self.min_valid_replies}"
        for step in self.pre_aggregation:
            reason = step.cannot_run(count, faults)
            if reason:
                return f"{count} valid replies are too few for {step}: {reason}"
            count = step.output_rows(count)
        return self.rule.cannot_run(count, faults)

    # ----------------------------------------------------------------------------- RoundReporting

    @property
    def stop_reason(self) -> str | None:
        """Why training stopped early; an aggregation strategy never stops it."""
        return None

    def rejections(self) -> list[str]:
        """The replies the last :meth:`aggregate_train` rejected, as ``"node <id>: <reason>"``
        (error replies are not listed: the round loop records them)."""
        return self.collector.rejections()

    def state_dict(self) -> dict[str, Any]:
        """Server momentum, adaptive bound and the rule's state (centered clipping's centre), for checkpoints."""
        state: dict[str, Any] = self.server_step.state_dict()
        if isinstance(self.bound, QuantileNormBound):
            state["norm-bound"] = self.bound.state_dict()
        rule_state = self.rule.state_dict()
        if rule_state:
            state["rule"] = rule_state
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.server_step.load_state_dict(state)
        if "norm-bound" in state and isinstance(self.bound, QuantileNormBound):
            self.bound.load_state_dict(dict(state["norm-bound"]))
        if "rule" in state:
            self.rule.load_state_dict(dict(state["rule"]))


def train_metrics(records: list[MetricRecord], weights: np.ndarray) -> MetricRecord:
    """Weighted means of the clients' numeric train metrics (for display)."""
    total = float(weights.sum()) or 1.0
    sums: dict[str, float] = {}
    for record, weight in zip(records, weights):
        for key, value in record.items():
            if key != "num-examples" and isinstance(value, (int, float)) and math.isfinite(value):
                sums[key] = sums.get(key, 0.0) + float(value) * float(weight) / total
    values: dict[str, int | float | list[int] | list[float]] = {}
    values.update(sums)
    return MetricRecord(values)


# --------------------------------------------------------------------------------- factories


@dataclasses.dataclass(frozen=True)
class RuleParams:
    """The built-in rules' parameters (run-config keys in brackets; defaults live in ``fl_app.config``).

    Attributes:
        trimmed_mean_beta: share trimmed at each end per coordinate (``trimmed-mean-beta``), in [0, 0.5).
        krum_f: Byzantine clients Krum and Multi-Krum tolerate (``krum-f``), >= 0.
        multi_krum_m: updates Multi-Krum averages (``multi-krum-m``), >= 0 (0: n - f per round).
        bulyan_f: Byzantine clients Bulyan tolerates (``bulyan-f``), >= 0.
        geometric_median_iterations: Weiszfeld iterations (``geometric-median-iterations``), >= 1.
        centered_clipping_tau: clipping radius (``centered-clipping-tau``), > 0.
        centered_clipping_iterations: iterations of centered clipping (``centered-clipping-iterations``), >= 1.
        centered_clipping_tau_quantile: if > 0, tau multiplies this quantile of the distances to the
            centre (``centered-clipping-tau-quantile``), in [0, 1].
        centered_clipping_momentum: the centre's momentum beta (``centered-clipping-momentum``), in [0, 1).
        dnc_f: Byzantine clients DnC removes per iteration, times the filter fraction (``dnc-f``), >= 0.
        dnc_iterations: DnC's iterations (``dnc-iterations``), >= 1.
        dnc_dimension: coordinates DnC samples per iteration (``dnc-dimension``), >= 1.
        dnc_filter_fraction: c, DnC removes floor(c f) updates per iteration (``dnc-filter-fraction``), > 0.
    """

    trimmed_mean_beta: float
    krum_f: int
    multi_krum_m: int
    bulyan_f: int
    geometric_median_iterations: int
    centered_clipping_tau: float
    centered_clipping_iterations: int
    centered_clipping_tau_quantile: float
    centered_clipping_momentum: float
    dnc_f: int
    dnc_iterations: int
    dnc_dimension: int
    dnc_filter_fraction: float

    def __post_init__(self) -> None:
        in_interval("trimmed-mean-beta", self.trimmed_mean_beta, 0, 0.5, "[)")
        at_least("krum-f", self.krum_f, 0)
        at_least("multi-krum-m", self.multi_krum_m, 0)
        at_least("bulyan-f", self.bulyan_f, 0)
        at_least("geometric-median-iterations", self.geometric_median_iterations, 1)
        positive("centered-clipping-tau", self.centered_clipping_tau)
        at_least("centered-clipping-iterations", self.centered_clipping_iterations, 1)
        in_interval(
            "centered-clipping-tau-quantile", self.centered_clipping_tau_quantile, 0, 1, "[]", " (0: absolute tau)"
        )
        in_interval("centered-clipping-momentum", self.centered_clipping_momentum, 0, 1, "[)")
        at_least("dnc-f", self.dnc_f, 0)
        at_least("dnc-iterations", self.dnc_iterations, 1)
        at_least("dnc-dimension", self.dnc_dimension, 1)
        positive("dnc-filter-fraction", self.dnc_filter_fraction)

    def of_rule(self, name: str) -> dict[str, Any]:
        """The keyword parameters of built-in rule ``name`` (:data:`strategies.robust.rules.RUN_CONFIG_KEYS`)."""
        from strategies.robust.rules import RUN_CONFIG_KEYS

        params = {param: getattr(self, key.replace("-", "_")) for param, key in RUN_CONFIG_KEYS[name].items()}
        if name == "multi-krum" and not params.get("m"):
            params["m"] = None  # multi-krum-m = 0: m = n - f, decided per round from the valid replies
        if name == "centered-clipping":
            params["momentum"] = self.centered_clipping_momentum  # the step's, not the pure rule's
        return params


@dataclasses.dataclass(frozen=True)
class AggregationParams:
    """What :class:`AggregationStrategy` is built from (run-config keys in brackets; defaults live in
    ``fl_app.config``).

    Attributes:
        sampling: node sampling and the clients per round.
        rules: the built-in rules' parameters.
        rule: the rule of ``strategy='robust'`` and ``dp-fedavg`` (``aggregation-rule``): a built-in
            name or ``package.module:function``, checked when the strategy is built.
        weighting: ``uniform``, ``num-examples`` or ``capped`` (``client-weighting``).
        cap_ratio: the cap of ``capped`` weighting (``weight-cap-ratio``), > 0.
        max_update_norm: reject longer updates (``max-update-norm``), >= 0 (0: off).
        norm_bound: clip updates to this norm before the rule (``norm-bound``), >= 0 (0: off).
        norm_bound_quantile: the bound follows this quantile of the norms (``norm-bound-quantile``),
            in [0, 1] (0: off).
        pre_aggregation: comma-separated steps between the bound and the rule, applied in order
            (``pre-aggregation``): ``nnm``, ``bucketing``, ``arc``; "" for none.
        pre_aggregation_f: Byzantine clients NNM and ARC assume (``pre-aggregation-f``), >= 0.
        bucketing_size: updates per bucket (``bucketing-size``), >= 1.
        weak_dp_noise_std: std of the Gaussian noise on the aggregate (``weak-dp-noise-std``), >= 0 (0: off).
        server_learning_rate: eta of the server step (``server-learning-rate``), > 0.
        server_momentum: beta of the server step (``server-momentum``), in [0, 1).
        min_valid_replies: skip a round with fewer valid replies (``min-valid-replies``), >= 1.
        aggregation_threads: BLAS threads while aggregating (``aggregation-threads``), >= 0 (0: every
            core of the server process's affinity).
        memory_gb: GiB the round's K x P update matrix may take (``aggregation-memory-gb``), >= 0
            (0: half of the server's physical memory).
    """

    sampling: SamplingParams
    rules: RuleParams
    rule: str
    weighting: str
    cap_ratio: float
    max_update_norm: float
    norm_bound: float
    norm_bound_quantile: float
    pre_aggregation: str
    pre_aggregation_f: int
    bucketing_size: int
    weak_dp_noise_std: float
    server_learning_rate: float
    server_momentum: float
    min_valid_replies: int
    aggregation_threads: int
    memory_gb: float

    def __post_init__(self) -> None:
        one_of("client-weighting", self.weighting, WEIGHTINGS)
        positive("weight-cap-ratio", self.cap_ratio)
        non_negative("max-update-norm", self.max_update_norm, " (0: off)")
        non_negative("norm-bound", self.norm_bound, " (0: off)")
        in_interval("norm-bound-quantile", self.norm_bound_quantile, 0, 1, "[]", " (0: off)")
        self.pre_aggregation_steps()
        non_negative("weak-dp-noise-std", self.weak_dp_noise_std, " (0: off)")
        positive("server-learning-rate", self.server_learning_rate)
        in_interval("server-momentum", self.server_momentum, 0, 1, "[)")
        at_least("min-valid-replies", self.min_valid_replies, 1)
        at_least("aggregation-threads", self.aggregation_threads, 0)
        non_negative("aggregation-memory-gb", self.memory_gb, " (0: half of the physical memory)")

    def pre_aggregation_steps(self) -> list[PreAggregationStep]:
        """The ``pre-aggregation`` steps, in order, with their parameters (checked here)."""
        return build_pre_aggregation(self.pre_aggregation, self.pre_aggregation_f, self.bucketing_size)

    def rows_after_pre_aggregation(self, num_rows: int) -> int:
        """The rows the rule aggregates when ``num_rows`` replies enter the pre-aggregation steps."""
        for step in self.pre_aggregation_steps():
            num_rows = step.output_rows(num_rows)
        return num_rows

    def collector(self) -> ReplyCollector:
        """The reply collector these parameters describe (no decoder: compression attaches one)."""
        return ReplyCollector(max_update_norm=self.max_update_norm or None, memory_budget_gb=self.memory_gb or None)


def rule_step(rule_name: str, params: AggregationParams) -> RuleStep:
    """The rule step of a built-in rule name (its parameters from ``params.rules``) or of a user's
    ``package.module:function``.

    Built-in rules are checked at start-up against the number of clients sampled per round, or the
    rows that remain of them after the pre-aggregation steps (bucketing: ceil(n / s))
    (e.g. Krum needs n > 2f + 2, Bulyan n >= 4f + 3), and a user's rule is run once on a synthetic
    round (:meth:`RuleStep.check_on_synthetic_round`), so that a configuration that can never work
    fails before any client trains.
    """
    if ":" in rule_name:
        from strategies.core.loading import load_object

        step = RuleStep(load_object(rule_name, key="aggregation-rule"), rule_name)
        step.check_on_synthetic_round(params.rows_after_pre_aggregation(params.sampling.clients_per_round()))
        return step
    if rule_name not in RULES:
        raise ValueError(
            f"aggregation-rule must be one of {', '.join(RULES)} or 'package.module:function'; got '{rule_name}'"
        )
    n = params.rows_after_pre_aggregation(params.sampling.clients_per_round(capped=False))
    return RuleStep.builtin(rule_name, params.rules.of_rule(rule_name), num_clients=n)


def norm_bound_step(params: AggregationParams) -> NormBound | None:
    """``norm-bound`` (fixed), ``norm-bound-quantile`` (adaptive, starting at ``norm-bound`` or 1), or None."""
    if params.norm_bound_quantile:
        return QuantileNormBound(params.norm_bound_quantile, params.norm_bound or 1.0)
    return FixedNormBound(params.norm_bound) if params.norm_bound else None


def build_aggregation_strategy(rule_name: str, params: AggregationParams) -> AggregationStrategy:
    """An :class:`AggregationStrategy` for a built-in rule name or ``package.module:function``,
    its steps built from ``params``."""
    pre_aggregation = params.pre_aggregation_steps()
    n = params.sampling.clients_per_round(capped=False)
    for step in pre_aggregation:
        reason = step.cannot_run(n)
        if reason:
            raise ValueError(f"{reason} (the clients sampled per round)")
        n = step.output_rows(n)
    return AggregationStrategy(
        rule_step(rule_name, params),
        weighting=ClientWeighting(params.weighting, params.cap_ratio),
        bound=norm_bound_step(params),
        pre_aggregation=pre_aggregation,
        noise=WeakDpNoise(params.weak_dp_noise_std) if params.weak_dp_noise_std else None,
        server_step=ServerStep(params.server_learning_rate, params.server_momentum),
        collector=params.collector(),
        min_valid_replies=params.min_valid_replies,
        blas_threads=params.aggregation_threads or None,
        **params.sampling.kwargs(),
    )
