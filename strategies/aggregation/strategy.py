"""One Message-API strategy that composes validation, pre-aggregation, any rule and a server step.

Per round, :class:`AggregationStrategy` does (each step a small piece that composes, as
TFF's aggregator factories nest)::

    replies ──validate──> K x P update matrix U (rows u_k = w_k - w, float32, reused buffer)
            ──hooks──────> (simulation only: e.g. omniscient attackers rewrite their rows)
            ──weights────> a_k: uniform | num-examples | num-examples capped at c * median
            ──bound──────> u_k <- u_k * min(1, M / |u_k|)  (fixed M, or M tracking a norm quantile)
            ──rule───────> v = rule(U, a)  (mean, median, trimmed mean, Krum, Bulyan, …)
            ──server step> m <- beta * m + v ;  w <- w + eta * m

Replies with wrong shapes or dtypes, NaN/Inf, an update norm above ``max_update_norm``, a forged
``num-examples`` or a node's second reply are rejected (:mod:`strategies.core.replies`) and logged
with the node id; the round goes on with the rest. A round with fewer valid replies than the rule
needs is skipped (the global model is kept) with a warning. Sampling, evaluation and metric
aggregation are FedAvg's. The strategy implements :class:`~strategies.core.reporting.RoundReporting`
and validates its replies itself, so a :class:`~strategies.aggregation.guard.GuardedStrategy`
around it only forwards them (a plain mean stays streamed from the reply bytes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable, Iterable, Mapping
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from strategies.core.checks import at_least, in_interval, non_negative, one_of, positive
from strategies.core.replies import is_client_error
from strategies.core.sampling import SamplingParams
from strategies.core.update_matrix import (
    CollectedUpdates,
    Decoder,
    ModelLayout,
    UpdateBuffer,
    collect_updates,
    stream_weighted_mean,
)
from strategies.robust.preaggregation import QuantileNormBound, norm_bound
from strategies.robust.rules import RULES, check_rule_conditions, weighted_mean

Rule = Callable[..., np.ndarray]
UpdateHook = Callable[[int, CollectedUpdates], None]

WEIGHTINGS = ("uniform", "num-examples", "capped")


def client_weights(num_examples: np.ndarray, weighting: str, cap_ratio: float = 2.0) -> np.ndarray:
    """Aggregation weights a_k from the (untrusted) reported example counts n_k.

    ``uniform``: a_k = 1 (robust rules' default: a client cannot buy influence by lying);
    ``num-examples``: a_k = n_k (FedAvg); ``capped``: a_k = min(n_k, c * median(n)).
    """
    if weighting == "uniform":
        return np.ones(len(num_examples))
    if weighting == "num-examples":
        return np.asarray(num_examples, np.float64)
    if weighting == "capped":
        return np.minimum(num_examples, cap_ratio * np.median(num_examples))
    raise ValueError(f"client-weighting must be one of {', '.join(WEIGHTINGS)}; got '{weighting}'")


@functools.cache
def _threadpools() -> Any:
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def blas_thread_limit(threads: int | None) -> contextlib.AbstractContextManager:
    """A context that runs BLAS with ``threads`` threads (None: leave the library's setting).

    On a server that shares its cores (a simulation's clients, other jobs), one thread keeps
    the aggregation's CPU use and timing predictable; a dedicated server can use them all.
    """
    if threads is None:
        return contextlib.nullcontext()
    return _threadpools().limit(limits=threads, user_api="blas")


class AggregationStrategy(FedAvg):
    """Validation → pre-aggregation → ``rule`` → server step, on Flower's Message API.

    Implements :class:`~strategies.core.reporting.RoundReporting` (it validates its replies).

    Parameters
    ----------
    rule : ``rule(updates, weights, **rule_params) -> update`` (see :mod:`strategies.robust.rules`)
    rule_name : for logs and checks; a built-in name enables the rule's minimum-client check
    rule_params : keyword parameters of the rule
    weighting, cap_ratio : see :func:`client_weights`
    max_update_norm : reject (not clip) updates longer than this; None: no limit
    norm_bound : clip updates to this L2 norm before the rule; None: off
    norm_bound_quantile : if set, the bound tracks this quantile of the norms (Andrew et al. 2021
        geometric update, without noise), starting at ``norm_bound`` (or 1.0)
    server_learning_rate, server_momentum : eta and beta of the server step (1, 0: plain update)
    min_valid_replies : skip a round with fewer valid replies
    decoder : decodes compressed uploads (ArrayRecord, P, server_round) -> update; None: replies
        carry weights
    blas_threads : BLAS threads while aggregating (Gram matrix, matrix-vector products); None:
        the library's default (all cores)
    **sampling : FedAvg's ``fraction_train``, ``min_train_nodes``, …
    """

    validates_replies = True
    """:meth:`aggregate_train` screens every reply (:mod:`strategies.core.replies`) while decoding it."""
    """Why training ended early; None: it did not (subclasses with a budget set it)."""
    min_train_replies: int | None = None
    """No bound of its own on the replies a round needs: the run config's ``min-train-replies``."""

    def __init__(
        self,
        rule: Rule,
        *,
        rule_name: str = "custom",
        rule_params: Mapping[str, Any] | None = None,
        weighting: str = "uniform",
        cap_ratio: float = 2.0,
        max_update_norm: float | None = None,
        norm_bound: float | None = None,
        norm_bound_quantile: float | None = None,
        server_learning_rate: float = 1.0,
        server_momentum: float = 0.0,
        min_valid_replies: int = 1,
        decoder: Decoder | None = None,
        blas_threads: int | None = None,
        **sampling: Any,
    ) -> None:
        super().__init__(**sampling)
        client_weights(np.ones(1), weighting, cap_ratio)  # validates the name
        self.rule = rule
        self.rule_name = rule_name
        self.rule_params = dict(rule_params or {})
        self.weighting = weighting
        self.cap_ratio = cap_ratio
        self.max_update_norm = max_update_norm
        self.fixed_norm_bound = None if norm_bound_quantile else norm_bound
        self.adaptive_bound = QuantileNormBound(norm_bound_quantile, norm_bound or 1.0) if norm_bound_quantile else None
        self.server_learning_rate = server_learning_rate
        self.server_momentum = server_momentum
        self.min_valid_replies = max(1, min_valid_replies)
        self.decoder = decoder
        self.blas_threads = blas_threads
        self.update_hooks: list[UpdateHook] = []
        self._buffer = UpdateBuffer()
        self._stream_out: np.ndarray | None = None  # the streamed mean's reused vector
        self._layout: ModelLayout | None = None
        self._global: np.ndarray | None = None
        self._momentum: np.ndarray | None = None
        self._rejections: list[str] = []  # "node <id>: <reason>" of the last aggregate_train

    def summary(self) -> None:
        super().summary()
        log(INFO, "\t├──> Aggregation: rule %s %s, weighting %s", self.rule_name, self.rule_params, self.weighting)
        log(
            INFO,
            "\t│\t├── reject update norm > %s; norm bound %s",
            self.max_update_norm,
            self.adaptive_bound.state_dict() if self.adaptive_bound else self.fixed_norm_bound,
        )
        log(INFO, "\t│\t└── server step: eta %s, momentum %s", self.server_learning_rate, self.server_momentum)

    # ----------------------------------------------------------------------------- rounds

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._layout = ModelLayout.of(arrays)
        self._global = self.layout.flatten(arrays)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self._layout is None or self._global is None:
            raise RuntimeError("aggregate_train called before configure_train")
        with blas_thread_limit(self.blas_threads):
            return self._aggregate_train(server_round, list(replies))

    def _aggregate_train(
        self, server_round: int, replies: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        streamed = self._stream_mean(server_round, replies) if self._streams_mean() else None
        collected, aggregate = streamed if streamed is not None else (self.collect(server_round, replies), None)
        measurements: dict[str, float] = {
            "accepted-replies": collected.count,
            "rejected-replies": len(collected.rejections),
        }
        reason = self._cannot_aggregate(collected.count, len(collected.rejections))
        if reason:
            log(WARNING, "Round %d skipped, the global model is kept: %s", server_round, reason)
            return None, MetricRecord({**measurements, "round-skipped": 1})

        weights = client_weights(collected.num_examples, self.weighting, self.cap_ratio)
        if aggregate is None:
            aggregate = self._apply_rule(server_round, collected, weights, measurements)
        if aggregate.shape != (self.layout.size,) or not np.isfinite(aggregate).all():
            log(
                WARNING,
                "Round %d skipped: rule %s returned a non-finite or mis-shaped update",
                server_round,
                self.rule_name,
            )
            return None, MetricRecord({**measurements, "round-skipped": 1})
        new_global = self._server_step(aggregate)
        metrics = self._train_metrics(collected, weights)
        metrics.update(measurements)
        metrics["update-norm"] = float(np.linalg.norm(aggregate))
        return self.layout.unflatten(new_global), metrics

    def _apply_rule(
        self, server_round: int, collected: CollectedUpdates, weights: np.ndarray, measurements: dict[str, float]
    ) -> np.ndarray:
        """Hooks, norm bound and the rule on the update matrix."""
        for hook in self.update_hooks:
            hook(server_round, collected)
        updates = collected.matrix()
        if self.adaptive_bound is not None:
            measurements["norm-bound"] = self.adaptive_bound.bound
            norms = self.adaptive_bound.clip(updates)
            measurements["bounded-replies"] = int(np.sum(norms > measurements["norm-bound"]))
        elif self.fixed_norm_bound is not None:
            measurements["bounded-replies"] = int(np.sum(norm_bound(updates, self.fixed_norm_bound)))
        params = round_params(self.rule_name, self.rule_params, collected.count, len(collected.rejections))
        if "f" in params and params["f"] != self.rule_params.get("f", params["f"]):
            measurements["rule-f"] = params["f"]
        return np.asarray(self.rule(updates, weights, **params), dtype=np.float32)

    def collect(self, server_round: int, replies: Iterable[Message]) -> CollectedUpdates:
        """Validate the replies into the update matrix; log and remember the rejected ones."""
        collected = collect_updates(
            list(replies),
            self.layout,
            self.global_flat,
            self._buffer,
            max_norm=self.max_update_norm,
            decoder=self.decoder,
            server_round=server_round,
        )
        self._log_rejections(server_round, collected)
        return collected

    def _streams_mean(self) -> bool:
        """Whether the round is a plain weighted mean that needs no update matrix: the rule is
        :func:`~strategies.robust.rules.weighted_mean` and no hook, bound, norm limit or decoder
        looks at single updates."""
        return (
            self.rule is weighted_mean
            and not self.update_hooks
            and self.decoder is None
            and self.max_update_norm is None
            and self.fixed_norm_bound is None
            and self.adaptive_bound is None
        )

    def _stream_mean(
        self, server_round: int, replies: list[Message]
    ) -> tuple[CollectedUpdates, np.ndarray | None] | None:
        """The weighted mean straight from the reply bytes (:func:`stream_weighted_mean`)."""
        if self._stream_out is None or self._stream_out.shape != (self.layout.size,):
            self._stream_out = np.empty(self.layout.size, np.float32)
        streamed = stream_weighted_mean(
            replies,
            self.layout,
            self.global_flat,
            lambda counts: client_weights(counts, self.weighting, self.cap_ratio),
            self._stream_out,
        )
        if streamed is not None:
            self._log_rejections(server_round, streamed[0])
        return streamed

    def _log_rejections(self, server_round: int, collected: CollectedUpdates) -> None:
        self._rejections = [line for line in collected.rejections if not is_client_error(line)]
        for line in collected.rejections:
            log(WARNING, "Round %d: %s", server_round, line)

    @property
    def stop_reason(self) -> str | None:
        """Why training stopped early; an aggregation strategy never stops it (DP-FedAvg may)."""
        return None

    @property
    def layout(self) -> ModelLayout:
        """The global model's layout (known from :meth:`configure_train` on)."""
        if self._layout is None:
            raise RuntimeError("aggregate_train called before configure_train")
        return self._layout

    @property
    def global_flat(self) -> np.ndarray:
        """The global model this round started from, as one float32 vector."""
        if self._global is None:
            raise RuntimeError("aggregate_train called before configure_train")
        return self._global

    def rejections(self) -> list[str]:
        """The replies the last :meth:`aggregate_train` rejected, as ``"node <id>: <reason>"``
        (error replies are not listed: the round loop records them)."""
        return list(self._rejections)

    # ----------------------------------------------------------------------------- pieces

    def _cannot_aggregate(self, count: int, faults: int = 0) -> str:
        if count < self.min_valid_replies:
            return f"{count} valid replies, min-valid-replies is {self.min_valid_replies}"
        if self.rule_name in RULES:
            try:
                check_rule_conditions(
                    self.rule_name, count, round_params(self.rule_name, self.rule_params, count, faults)
                )
            except ValueError as err:
                return f"{count} valid replies are too few for {self.rule_name}: {err}"
        return ""

    def _server_step(self, aggregate: np.ndarray) -> np.ndarray:
        if self.server_momentum > 0:
            if self._momentum is None or self._momentum.shape != aggregate.shape:
                self._momentum = np.zeros_like(aggregate)
            self._momentum *= np.float32(self.server_momentum)
            self._momentum += aggregate
            step = self._momentum
        else:
            step = aggregate
        return self.global_flat + np.float32(self.server_learning_rate) * step

    @staticmethod
    def _train_metrics(collected: CollectedUpdates, weights: np.ndarray) -> MetricRecord:
        """Weighted means of the clients' numeric train metrics (for display)."""
        total = float(weights.sum()) or 1.0
        sums: dict[str, float] = {}
        for record, weight in zip(collected.metrics, weights):
            for key, value in record.items():
                if key != "num-examples" and isinstance(value, (int, float)) and math.isfinite(value):
                    sums[key] = sums.get(key, 0.0) + float(value) * float(weight) / total
        values: dict[str, int | float | list[int] | list[float]] = {}
        values.update(sums)
        return MetricRecord(values)

    # ----------------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """Server momentum and adaptive bound, for checkpoints."""
        state: dict[str, Any] = {}
        if self._momentum is not None:
            state["momentum"] = self._momentum.copy()
        if self.adaptive_bound is not None:
            state["norm-bound"] = self.adaptive_bound.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "momentum" in state:
            self._momentum = np.asarray(state["momentum"], np.float32).copy()
        if "norm-bound" in state and self.adaptive_bound is not None:
            self.adaptive_bound.load_state_dict(dict(state["norm-bound"]))


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
    """

    trimmed_mean_beta: float
    krum_f: int
    multi_krum_m: int
    bulyan_f: int
    geometric_median_iterations: int
    centered_clipping_tau: float
    centered_clipping_iterations: int

    def __post_init__(self) -> None:
        in_interval("trimmed-mean-beta", self.trimmed_mean_beta, 0, 0.5, "[)")
        at_least("krum-f", self.krum_f, 0)
        at_least("multi-krum-m", self.multi_krum_m, 0)
        at_least("bulyan-f", self.bulyan_f, 0)
        at_least("geometric-median-iterations", self.geometric_median_iterations, 1)
        positive("centered-clipping-tau", self.centered_clipping_tau)
        at_least("centered-clipping-iterations", self.centered_clipping_iterations, 1)

    def of_rule(self, name: str) -> dict[str, Any]:
        """The keyword parameters of built-in rule ``name`` (:data:`strategies.robust.rules.RUN_CONFIG_KEYS`)."""
        from strategies.robust.rules import RUN_CONFIG_KEYS

        params = {param: getattr(self, key.replace("-", "_")) for param, key in RUN_CONFIG_KEYS[name].items()}
        if name == "multi-krum" and not params.get("m"):
            params["m"] = None  # multi-krum-m = 0: m = n - f, decided per round from the valid replies
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
        server_learning_rate: eta of the server step (``server-learning-rate``), > 0.
        server_momentum: beta of the server step (``server-momentum``), in [0, 1).
        min_valid_replies: skip a round with fewer valid replies (``min-valid-replies``), >= 1.
        aggregation_threads: BLAS threads while aggregating (``aggregation-threads``), >= 0 (0: the
            library's default).
    """

    sampling: SamplingParams
    rules: RuleParams
    rule: str
    weighting: str
    cap_ratio: float
    max_update_norm: float
    norm_bound: float
    norm_bound_quantile: float
    server_learning_rate: float
    server_momentum: float
    min_valid_replies: int
    aggregation_threads: int

    def __post_init__(self) -> None:
        one_of("client-weighting", self.weighting, WEIGHTINGS)
        positive("weight-cap-ratio", self.cap_ratio)
        non_negative("max-update-norm", self.max_update_norm, " (0: off)")
        non_negative("norm-bound", self.norm_bound, " (0: off)")
        in_interval("norm-bound-quantile", self.norm_bound_quantile, 0, 1, "[]", " (0: off)")
        positive("server-learning-rate", self.server_learning_rate)
        in_interval("server-momentum", self.server_momentum, 0, 1, "[)")
        at_least("min-valid-replies", self.min_valid_replies, 1)
        at_least("aggregation-threads", self.aggregation_threads, 0)


def build_aggregation_strategy(rule_name: str, params: AggregationParams, **overrides: Any) -> AggregationStrategy:
    """An :class:`AggregationStrategy` for a built-in rule name or ``package.module:function``.

    Built-in rules are checked at start-up against the number of clients sampled per round
    (e.g. Krum needs n > 2f + 2, Bulyan n >= 4f + 3), so that a configuration that can never
    work fails before any client trains.
    """
    from strategies.core.loading import load_object

    if ":" in rule_name:
        rule, rule_params = load_object(rule_name, key="aggregation-rule"), {}
    elif rule_name in RULES:
        rule, rule_params = RULES[rule_name], params.rules.of_rule(rule_name)
        n = params.sampling.clients_per_round(capped=False)
        check_rule_conditions(rule_name, n, round_params(rule_name, rule_params, n))
    else:
        raise ValueError(
            f"aggregation-rule must be one of {', '.join(RULES)} or 'package.module:function'; got '{rule_name}'"
        )
    kwargs: dict[str, Any] = dict(
        rule_name=rule_name,
        rule_params=rule_params,
        weighting=params.weighting,
        cap_ratio=params.cap_ratio,
        max_update_norm=params.max_update_norm or None,
        norm_bound=params.norm_bound or None,
        norm_bound_quantile=params.norm_bound_quantile or None,
        server_learning_rate=params.server_learning_rate,
        server_momentum=params.server_momentum,
        min_valid_replies=params.min_valid_replies,
        blas_threads=params.aggregation_threads or None,
        **params.sampling.kwargs(),
    )
    kwargs.update(overrides)
    return AggregationStrategy(rule, **kwargs)


def round_params(name: str, params: Mapping[str, Any], num_replies: int, faults: int = 0) -> dict[str, Any]:
    """The rule's parameters for a round of ``num_replies`` valid replies.

    Multi-Krum's m = 0/None is n - f. ``faults`` is the number of replies rejected this round
    (invalid, or a client error): each comes from one of the up-to-f faulty clients the rule is
    configured for, so at most ``f - faults`` of them remain among the valid replies, and Krum,
    Multi-Krum and Bulyan run with that f. Their conditions then still hold whenever they held
    for all replies (e.g. n - r > 2(f - r) + 2 if n > 2f + 2), so clients that send NaN or wrong
    shapes cannot stall the training by shrinking n below 4f + 3 (Bulyan) or 2f + 3 (Krum).
    """
    params = dict(params)
    if name in ("krum", "multi-krum", "bulyan") and faults > 0 and "f" in params:
        params["f"] = max(0, int(params["f"]) - faults)
    if name == "multi-krum" and params.get("m") is None:
        params["m"] = max(1, num_replies - int(params.get("f", 0)))
    return params
