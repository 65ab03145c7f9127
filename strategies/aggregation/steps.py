"""The steps of one aggregation round after validation: client weights, the rule, the server step.

Each step is a small object that checks its parameters when it is built (errors name the run-config
key) and reports what it measured in the round, as TensorFlow Federated's aggregator factories do;
:class:`~strategies.aggregation.strategy.AggregationStrategy` chains them::

    CollectedUpdates ──ClientWeighting──> a_k
                     ──NormBound─────────> rows clipped       (strategies.robust.preaggregation)
                     ──RuleStep──────────> v = rule(U, a)
                     ──ServerStep────────> w <- w + eta * (beta * m + v)

:class:`~strategies.private.dp_fedavg.DpFedAvgStrategy` runs the same :class:`RuleStep` between its
clip and its noise. Nothing here imports TensorFlow or Flower.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from strategies.core.checks import in_interval, one_of, positive
from strategies.robust.rules import (
    DISTANCE_RULES,
    RULES,
    SORTED_COLUMN_RULES,
    UpdateRows,
    check_rule_conditions,
    weighted_mean,
)

Rule = Callable[..., np.ndarray]
"""``rule(updates: K x P float32, weights: K, **params) -> P float32`` (:mod:`strategies.robust.rules`)."""

WEIGHTINGS = ("uniform", "num-examples", "capped")


class ClientWeighting:
    """Aggregation weights a_k from the (untrusted) reported example counts n_k.

    ``uniform``: a_k = 1 (the robust rules' default: a client cannot buy influence by lying);
    ``num-examples``: a_k = n_k (FedAvg, McMahan et al. 2017); ``capped``: a_k = min(n_k, c * median(n)).
    """

    def __init__(self, name: str = "uniform", cap_ratio: float = 2.0) -> None:
        one_of("client-weighting", name, WEIGHTINGS)
        positive("weight-cap-ratio", cap_ratio)
        self.name = name
        self.cap_ratio = float(cap_ratio)

    def __call__(self, num_examples: np.ndarray) -> np.ndarray:
        """The K weights of the K reported counts (float64)."""
        counts = np.asarray(num_examples, np.float64)
        if self.name == "uniform":
            return np.ones(len(counts))
        if self.name == "num-examples":
            return counts
        return np.minimum(counts, self.cap_ratio * np.median(counts)) if len(counts) else counts

    def __repr__(self) -> str:
        return f"ClientWeighting({self.name!r}, cap_ratio={self.cap_ratio:g})"


def round_params(name: str, params: Mapping[str, Any], num_replies: int, faults: int = 0) -> dict[str, Any]:
    """Rule ``name``'s parameters for a round of ``num_replies`` valid replies.

    Multi-Krum's m = 0/None is n - f. ``faults`` is the number of replies rejected this round as
    malformed or hostile: each comes from one of the up-to-f faulty clients the rule is configured
    for, so at most ``f - faults`` of them remain among the valid replies, and Krum, Multi-Krum and
    Bulyan run with that f. Their conditions then still hold whenever they held for all replies
    (e.g. n - r > 2(f - r) + 2 if n > 2f + 2), so clients that send NaN or wrong shapes cannot
    stall the training by shrinking n below 4f + 3 (Bulyan) or 2f + 3 (Krum). A client that failed
    (an error reply) is not counted: an honest crash does not lower f.
    """
    params = dict(params)
    if name in ("krum", "multi-krum", "bulyan", "dnc") and faults > 0 and "f" in params:
        params["f"] = max(0, int(params["f"]) - faults)
    if name == "multi-krum" and params.get("m") is None:
        params["m"] = max(1, num_replies - int(params.get("f", 0)))
    return params


class RuleStep:
    """An aggregation rule with its parameters: a built-in name of :data:`strategies.robust.rules.RULES`
    or a user's function.

    Parameters
    ----------
    rule : the rule function
    name : its name: a built-in name enables the rule's conditions (e.g. Krum's n > 2f + 2),
        checked per round on the valid replies
    params : the rule's keyword parameters (Multi-Krum's ``m=None``: n - f per round)
    """

    def __init__(self, rule: Rule, name: str = "custom", params: Mapping[str, Any] | None = None) -> None:
        if not callable(rule):
            raise ValueError(f"aggregation-rule '{name}' is not callable: {rule!r}")
        if name in RULES and rule is not RULES[name]:
            raise ValueError(f"rule name '{name}' is the built-in rule's; give {rule!r} another name")
        self.rule = rule
        self.name = name
        self.params = dict(params or {})

    @classmethod
    def builtin(cls, name: str, params: Mapping[str, Any] | None = None, *, num_clients: int | None = None) -> RuleStep:
        """Built-in rule ``name``; with ``num_clients``, its conditions are checked for that many
        replies now, so that a configuration that can never work fails before any client trains."""
        if name not in RULES:
            raise ValueError(
                f"aggregation-rule must be one of {', '.join(RULES)} or 'package.module:function'; got '{name}'"
            )
        step = (CenteredClippingStep if name == "centered-clipping" else cls)(RULES[name], name, params)
        if num_clients is not None:
            check_rule_conditions(name, num_clients, round_params(name, step.params, num_clients))
        return step

    @classmethod
    def mean(cls) -> RuleStep:
        """The weighted mean (FedAvg's rule)."""
        return cls.builtin("mean")

    def check_on_synthetic_round(self, num_clients: int, size: int = 16) -> None:
        """Run the rule once on a synthetic K x P round (K = ``num_clients``, P = ``size``, updates
        N(0, 1), uniform weights) and raise ValueError naming ``aggregation-rule`` unless it returns a
        finite length-P vector and leaves its input unchanged: a broken user rule fails at start-up,
        not after training (where it would leave an untrained model behind a successful exit)."""
        updates = np.random.default_rng(0).standard_normal((max(num_clients, 1), size)).astype(np.float32)
        before = updates.copy()
        try:
            output = np.asarray(self.rule(updates, np.ones(len(updates)), **self.params_for(len(updates))))
        except Exception as err:  # a user's code: any failure is reported as the rule's
            raise ValueError(
                f"aggregation-rule '{self.name}' failed on a synthetic round of {len(updates)} updates of "
                f"{size} values: {type(err).__name__}: {err}"
            ) from err
        problem = ""
        if output.shape != (size,):
            problem = f"returned shape {list(output.shape)}, expected [{size}] (one value per parameter)"
        elif not np.issubdtype(output.dtype, np.number) or not np.isfinite(output).all():
            problem = "returned NaN, infinite or non-numeric values"
        elif not np.array_equal(updates, before):
            problem = "modified its input matrix (rules must not: the matrix is the server's buffer)"
        if problem:
            raise ValueError(
                f"aggregation-rule '{self.name}' {problem} on a synthetic round of {len(updates)} updates "
                f"of {size} values; a rule is rule(updates: K x P, weights: K) -> length-P vector"
            )

    @property
    def is_mean(self) -> bool:
        """Whether this is the plain weighted mean (which the strategy may stream from the reply bytes)."""
        return self.rule is weighted_mean

    def params_for(self, num_replies: int, faults: int = 0) -> dict[str, Any]:
        """The parameters of a round with ``num_replies`` valid replies and ``faults`` rejected ones."""
        return round_params(self.name, self.params, num_replies, faults) if self.name in RULES else dict(self.params)

    def cannot_run(self, num_replies: int, faults: int = 0) -> str:
        """Why the rule cannot aggregate ``num_replies`` valid replies ("" when it can)."""
        if self.name not in RULES:
            return ""
        try:
            check_rule_conditions(self.name, num_replies, self.params_for(num_replies, faults))
        except ValueError as err:
            return f"{num_replies} valid replies are too few for {self.name}: {err}"
        return ""

    @property
    def reads_distances(self) -> bool:
        """Whether this built-in rule needs only the rows and their pairwise distances (Krum,
        Multi-Krum, Bulyan: :data:`strategies.robust.rules.DISTANCE_RULES`), so that the strategy may
        compute it from the reply bytes (:meth:`of_rows`) without the K x P matrix."""
        return self.name in DISTANCE_RULES

    @property
    def reads_sorted_columns(self) -> bool:
        """Whether this built-in rule is computed one sorted column block at a time (median,
        trimmed mean: :data:`strategies.robust.rules.SORTED_COLUMN_RULES`), so that the strategy may
        compute it from the reply bytes (:meth:`of_sorted_columns`) without the K x P matrix."""
        return self.name in SORTED_COLUMN_RULES

    def of_sorted_columns(self, rows: UpdateRows) -> np.ndarray:
        """What :meth:`__call__` returns, for a rule that :attr:`reads_sorted_columns`, from the rows
        (all NaN when a row holds a non-finite value). Its parameters do not depend on rejected
        replies (only f does, and these rules have none)."""
        params, _ = self._round(rows.shape[0], 0)
        return np.asarray(SORTED_COLUMN_RULES[self.name](rows, **params), dtype=np.float32)

    def _round(self, num_replies: int, faults: int) -> tuple[dict[str, Any], dict[str, float]]:
        """The round's parameters and measurements: ``rule-f`` when rejected replies lowered f."""
        params = self.params_for(num_replies, faults)
        measurements: dict[str, float] = {}
        if "f" in params and params["f"] != self.params.get("f", params["f"]):
            measurements["rule-f"] = params["f"]
        return params, measurements

    def __call__(
        self, updates: np.ndarray, weights: np.ndarray, faults: int = 0
    ) -> tuple[np.ndarray, dict[str, float]]:
        """The aggregate (length-P float32) and the measurements: ``rule-f`` when rejected replies
        lowered the rule's f this round."""
        params, measurements = self._round(updates.shape[0], faults)
        return np.asarray(self.rule(updates, weights, **params), dtype=np.float32), measurements

    def of_rows(self, rows: UpdateRows, distances: np.ndarray, faults: int = 0) -> tuple[np.ndarray, dict[str, float]]:
        """What :meth:`__call__` returns, for a rule that :attr:`reads_distances`, from the rows and
        their K x K squared distances (:func:`strategies.robust.rules.distances_of_rows`)."""
        params, measurements = self._round(rows.shape[0], faults)
        return np.asarray(DISTANCE_RULES[self.name](rows, distances, **params), dtype=np.float32), measurements

    def state_dict(self) -> dict[str, Any]:
        """State carried across rounds, for checkpoints: none (rules are pure functions)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (nothing to restore)."""

    def __repr__(self) -> str:
        return f"RuleStep({self.name!r}, {self.params})"


class CenteredClippingStep(RuleStep):
    """Centered clipping with its centre carried across rounds, as in Karimireddy, He & Jaggi (ICML
    2021, "Learning from History for Byzantine Robust Optimization", Algorithm 2).

    Round t runs :func:`strategies.robust.rules.centered_clipping` from the centre ``c_{t-1}``
    (zeros in the first round) and then moves the centre::

        v_t = CC(X_t; c_{t-1}, tau, L)          c_t = beta c_{t-1} + (1 - beta) v_t

    ``beta = 0`` (``centered-clipping-momentum``) makes the centre the previous aggregate, as in the
    paper, where momentum is what makes the previous aggregate a good centre; with ``beta > 0`` the
    centre is an exponential average of the aggregates, a server-side momentum that damps how far
    one round's aggregate moves the next round's centre. The centre is :meth:`state_dict` (in the
    strategy's checkpoints); a round whose aggregate is not finite leaves it unchanged.
    """

    def __init__(self, rule: Rule, name: str = "centered-clipping", params: Mapping[str, Any] | None = None) -> None:
        params = dict(params or {})
        momentum = params.pop("momentum", 0.0)
        super().__init__(rule, name, params)
        in_interval("centered-clipping-momentum", momentum, 0, 1, "[)")
        self.momentum = float(momentum)
        self.center: np.ndarray | None = None

    def __call__(
        self, updates: np.ndarray, weights: np.ndarray, faults: int = 0
    ) -> tuple[np.ndarray, dict[str, float]]:
        """The aggregate from the current centre, which then moves towards it."""
        params = self.params_for(updates.shape[0], faults)
        center = self.center
        if center is not None and center.shape != (updates.shape[1],):
            raise ValueError(
                f"the centered-clipping centre has {center.size} values, the updates {updates.shape[1]}: "
                "a checkpoint of another model?"
            )
        aggregate = np.asarray(self.rule(updates, weights, center=center, **params), dtype=np.float32)
        if np.isfinite(aggregate).all():
            if center is None or self.momentum == 0:
                self.center = aggregate.copy()
            else:
                self.center = np.float32(self.momentum) * center + np.float32(1 - self.momentum) * aggregate
        return aggregate, {}

    def state_dict(self) -> dict[str, Any]:
        """``{"center": c_t}`` once a round has run (empty before)."""
        return {} if self.center is None else {"center": self.center.copy()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s centre (absent: left as it is); ValueError if not finite."""
        if "center" in state:
            center = np.asarray(state["center"], np.float32).copy()
            if center.ndim != 1 or not np.isfinite(center).all():
                raise ValueError("the centered-clipping centre in the saved state is not a finite vector")
            self.center = center

    def __repr__(self) -> str:
        return f"CenteredClippingStep({self.params}, momentum={self.momentum:g})"


class ServerStep:
    """The server's step on the aggregate v (Reddi et al. 2021, "Adaptive Federated Optimization",
    with SGD and momentum as the server optimizer)::

        m <- beta * m + v ;   w <- w + eta * m         (beta = 0: w <- w + eta * v; eta = 1: FedAvg)

    The momentum m is the step's state (:meth:`state_dict`).
    """

    def __init__(self, learning_rate: float = 1.0, momentum: float = 0.0) -> None:
        positive("server-learning-rate", learning_rate)
        in_interval("server-momentum", momentum, 0, 1, "[)")
        self.learning_rate = float(learning_rate)
        self.momentum = float(momentum)
        self._velocity: np.ndarray | None = None

    def __call__(self, global_flat: np.ndarray, aggregate: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The new global model from the round's start and its aggregate: written into ``out``
        when given (a float32 vector of the same size, e.g. reused from round to round), else a
        new float32 vector."""
        step = aggregate
        if self.momentum > 0:
            if self._velocity is None or self._velocity.shape != aggregate.shape:
                self._velocity = np.zeros_like(aggregate)
            self._velocity *= np.float32(self.momentum)
            self._velocity += aggregate
            step = self._velocity
        if self.learning_rate == 1:  # FedAvg's step: one pass, no scaled copy
            return np.add(global_flat, step, out=out)
        scaled = np.multiply(step, np.float32(self.learning_rate), out=out)
        return np.add(global_flat, scaled, out=scaled)

    def state_dict(self) -> dict[str, Any]:
        """``{"momentum": m}`` once the momentum exists (empty otherwise)."""
        return {} if self._velocity is None else {"momentum": self._velocity.copy()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s momentum (absent: left as it is); ValueError if not finite."""
        if "momentum" in state:
            velocity = np.asarray(state["momentum"], np.float32).copy()
            if not np.isfinite(velocity).all():
                raise ValueError("the server momentum in the saved state holds NaN or infinite values")
            self._velocity = velocity

    def __repr__(self) -> str:
        return f"ServerStep(learning_rate={self.learning_rate:g}, momentum={self.momentum:g})"
