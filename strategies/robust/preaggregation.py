"""Pre-aggregation steps on the K x P matrix of client updates, composing with any rule.

Norm bounds (:class:`NormBound`) are called on the round's matrix, clip its rows in place (the
matrix is the strategy's per-round buffer) and return their measurements: :class:`FixedNormBound`
(Sun et al. 2019) or :class:`QuantileNormBound` (Andrew et al. 2021, without noise).

The robust pre-aggregation steps (:class:`PreAggregationStep`) run after the bound, in the order
configured (``pre-aggregation='nnm,bucketing'``), each handing the next a matrix and its weights:
nearest-neighbour mixing (:class:`NearestNeighbourMixing`, Allouah et al. 2023), bucketing
(:class:`Bucketing`, Karimireddy, He & Jaggi 2022) and adaptive robust clipping
(:class:`AdaptiveRobustClipping`, Allouah et al. 2025). They are designed for heterogeneous
(non-IID) clients, where honest updates differ enough that a rule alone mistakes them for outliers.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import numpy as np

from strategies.core.checks import positive_number
from strategies.core.clipping import clip_rows, row_norms
from strategies.robust.rules import pairwise_squared_distances, random_generator


class NormBound(Protocol):
    """A pre-aggregation step: clips the rows of ``updates`` in place, returns its measurements."""

    def __call__(self, updates: np.ndarray) -> dict[str, float]: ...


def norm_bound(updates: np.ndarray, bound: float) -> np.ndarray:
    """Norm-bounding defence (Sun et al., 2019, "Can You Really Backdoor Federated Learning?").

    Scales down, in place, every update whose L2 norm exceeds ``bound``:
    ``x_i <- x_i / max(1, |x_i| / M)``, which limits how far one (boosted, model-replacement)
    update can pull the aggregate. Returns a boolean mask of the rows that were bounded.
    """
    return clip_rows(updates, bound) > bound


class FixedNormBound:
    """:func:`norm_bound` with a fixed ``M`` (``norm-bound``); measures ``bounded-replies``."""

    def __init__(self, bound: float) -> None:
        self.bound = positive_number("norm-bound", bound)

    def __call__(self, updates: np.ndarray) -> dict[str, float]:
        return {"bounded-replies": int(np.sum(norm_bound(updates, self.bound)))}

    def __repr__(self) -> str:
        return f"FixedNormBound({self.bound:g})"


class QuantileNormBound:
    """Norm bound that tracks a quantile of the clients' update norms.

    Geometric update of Andrew et al., 2021 ("Differentially Private Learning with Adaptive
    Clipping"), without the noise: after clipping a round's updates with bound ``C``, with
    ``b = fraction of updates whose norm was <= C``,

        ``C <- C * exp(-learning_rate * (b - quantile))``

    so ``C`` moves towards the ``quantile``-th quantile of the norms, by a factor of at most
    ``exp(learning_rate)`` per round: a minority of clients sending huge updates cannot make it
    jump. The state is the current bound only (see :meth:`state_dict`).
    """

    def __init__(self, quantile: float, initial_bound: float, learning_rate: float = 0.2):
        if isinstance(quantile, bool) or not isinstance(quantile, (int, float, np.number)):
            raise ValueError(f"quantile must be a number in [0, 1], got {quantile!r}")
        if not 0.0 <= quantile <= 1.0:
            raise ValueError(f"quantile must be in [0, 1], got {quantile!r}")
        self.quantile = float(quantile)
        self.learning_rate = positive_number("learning_rate", learning_rate)
        self._bound = positive_number("initial_bound", initial_bound)

    @property
    def bound(self) -> float:
        """The bound that the next call of :meth:`clip` applies."""
        return self._bound

    def __call__(self, updates: np.ndarray) -> dict[str, float]:
        """:meth:`clip`; measures the ``norm-bound`` applied and the ``bounded-replies``."""
        applied = self._bound
        norms = self.clip(updates)
        return {"norm-bound": applied, "bounded-replies": int(np.sum(norms > applied))}

    def __repr__(self) -> str:
        return f"QuantileNormBound(quantile={self.quantile:g}, bound={self._bound:g})"

    def clip(self, updates: np.ndarray) -> np.ndarray:
        """Clip the rows of ``updates`` in place to the current bound, then adapt the bound.

        Returns the rows' L2 norms before clipping.
        """
        norms = clip_rows(updates, self._bound)
        self.update(norms)
        return norms

    def update(self, norms: np.ndarray) -> float:
        """Adapt the bound to the observed update norms of one round; return the new bound."""
        norms = np.asarray(norms, dtype=np.float64)
        if norms.size == 0:
            return self._bound
        unclipped = float(np.mean(norms <= self._bound))
        self._bound *= math.exp(-self.learning_rate * (unclipped - self.quantile))
        return self._bound

    def state_dict(self) -> dict[str, float]:
        """JSON-able state: ``{"bound": current bound}``."""
        return {"bound": self._bound}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the bound saved by :meth:`state_dict`."""
        if "bound" not in state:
            raise ValueError(f"QuantileNormBound state needs a 'bound', got keys {sorted(state)}")
        self._bound = positive_number("bound", state["bound"])


# ---------------------------------------------------------------------------------------------
# Robust pre-aggregation steps: matrix in, matrix out
# ---------------------------------------------------------------------------------------------


class PreAggregationStep(Protocol):
    """A step between the norm bound and the rule.

    ``step(updates, weights, faults)`` returns the matrix and weights that the next step (or the
    rule) receives, and its measurements; it may modify ``updates`` in place (the strategy's
    per-round buffer) and may return fewer rows. ``faults`` is the number of replies rejected this
    round: each is one of the f faulty clients the step is configured for (as for the rules).
    """

    def __call__(
        self, updates: np.ndarray, weights: np.ndarray, faults: int = 0
    ) -> tuple[np.ndarray, np.ndarray, dict[str, float]]: ...

    def output_rows(self, num_rows: int) -> int:
        """How many rows the step returns for ``num_rows`` rows (what the rule then aggregates)."""
        ...

    def cannot_run(self, num_rows: int, faults: int = 0) -> str:
        """Why the step cannot process ``num_rows`` rows ("" when it can)."""
        ...


def _check_count(key: str, value: Any, minimum: int) -> int:
    """``value`` as an int >= ``minimum`` (not a bool), else a ValueError naming ``key``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{key} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _honest_majority(name: str, f_key: str, f: int, num_rows: int) -> str:
    """ "" when ``num_rows > 2 f`` (the steps' condition), else why not."""
    if num_rows > 2 * f:
        return ""
    return f"{name} needs more than 2*{f_key} updates: {f_key}={f} requires at least {2 * f + 1}, got {num_rows}"


def nearest_neighbour_mixing(updates: np.ndarray, f: int) -> np.ndarray:
    """Nearest-neighbour mixing, NNM (Allouah, Farhadkhani, Guerraoui, Gupta, Pinot & Stephan,
    AISTATS 2023, "Fixing by Mixing: A Recipe for Optimal Byzantine ML under Heterogeneity").

    Every row is replaced by the mean of its ``n - f`` nearest rows in L2 distance, itself
    included: ``y_i = 1/(n - f) sum_{j in N_i} x_j``. The K x K squared distances come from one
    Gram matrix (:func:`strategies.robust.rules.pairwise_squared_distances`), the mixing from
    one K x K by K x P product ``Y = A X`` with ``A_ij = 1/(n - f)`` for ``j in N_i``. With
    ``n > 2f`` every honest row's neighbourhood holds a majority of honest rows, which lowers the
    heterogeneity that the rule after it sees (the paper shows it makes rules such as Krum,
    the median and the trimmed mean optimal under heterogeneity). The result does not depend on
    the order of the rows up to ties in the distances. Returns a new K x P float32 matrix.
    Cost: about 4 K^2 P flops (Gram matrix and mixing product) and one K x P output.
    """
    num_rows = updates.shape[0]
    neighbours = num_rows - f
    distances = pairwise_squared_distances(updates)
    nearest = np.argsort(distances, axis=1, kind="stable")[:, :neighbours]
    mixing = np.zeros((num_rows, num_rows), dtype=np.float32)
    np.put_along_axis(mixing, nearest, np.float32(1.0 / neighbours), axis=1)
    return mixing @ updates


class _HonestMajorityStep:
    """A pre-aggregation step with ``f`` (``pre-aggregation-f``) that needs ``n > 2f`` and keeps the
    number of rows; with ``r`` replies rejected in the round it runs with ``f - r`` (each rejection
    was one of the f faulty clients)."""

    name = ""

    def __init__(self, f: int) -> None:
        self.f = _check_count("pre-aggregation-f", f, 0)

    def _f(self, faults: int) -> int:
        return max(0, self.f - faults)

    def output_rows(self, num_rows: int) -> int:
        return num_rows

    def cannot_run(self, num_rows: int, faults: int = 0) -> str:
        return _honest_majority(self.name, "pre-aggregation-f", self._f(faults), num_rows)

    def _round_f(self, num_rows: int, faults: int) -> int:
        """This round's f; ValueError with :meth:`cannot_run`'s reason when the step cannot run."""
        reason = self.cannot_run(num_rows, faults)
        if reason:
            raise ValueError(reason)
        return self._f(faults)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(f={self.f})"


class NearestNeighbourMixing(_HonestMajorityStep):
    """:func:`nearest_neighbour_mixing` with ``f`` (``pre-aggregation-f``); needs ``n > 2f``.
    Weights pass unchanged."""

    name = "nnm"

    def __call__(
        self, updates: np.ndarray, weights: np.ndarray, faults: int = 0
    ) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
        f = self._round_f(updates.shape[0], faults)
        if f == 0:  # every row's n neighbours are all rows: each becomes the mean
            mixed = np.broadcast_to(updates.mean(axis=0, dtype=np.float32), updates.shape).copy()
        else:
            mixed = nearest_neighbour_mixing(updates, f)
        return mixed, weights, {"nnm-f": f}


def bucket_means(updates: np.ndarray, size: int, permutation: np.ndarray) -> np.ndarray:
    """Means of buckets of ``size`` consecutive rows of ``updates[permutation]`` (the last bucket
    holds the ``K mod size`` rows left over, if any): a ceil(K / size) x P float32 matrix."""
    num_rows = updates.shape[0]
    num_buckets = -(-num_rows // size)
    bucket_of = np.empty(num_rows, dtype=np.intp)
    bucket_of[permutation] = np.arange(num_rows) // size
    counts = np.bincount(bucket_of, minlength=num_buckets)
    averaging = np.zeros((num_buckets, num_rows), dtype=np.float32)
    averaging[bucket_of, np.arange(num_rows)] = (1.0 / counts[bucket_of]).astype(np.float32)
    return averaging @ updates


class Bucketing:
    """Bucketing (Karimireddy, He & Jaggi, ICLR 2022, "Byzantine-Robust Learning on Heterogeneous
    Datasets via Bucketing", Algorithm 1).

    Draws a random permutation ``pi`` of the K rows, splits it into ``ceil(K / s)`` buckets of
    ``s = bucketing-size`` rows (the last one smaller when ``s`` does not divide K) and hands the
    rule the buckets' means ``y_b = 1/|B_b| sum_{i in B_b} x_{pi(i)}`` instead of the rows. A
    bucket's weight is the sum of its rows' weights. Averaging s random rows divides the honest
    rows' heterogeneity (their spread around the honest mean) by about sqrt(s) while at most f
    buckets hold a Byzantine row, so the rule needs its f at most ``K / (2 s)`` or so: the paper
    uses ``s <= n / (2 f)``. The permutation comes from ``rng`` (default: a generator seeded from
    the OS's CSPRNG once, so that clients cannot predict their bucket). Cost: one K/s x K by K x P
    product and a K/s x P output.
    """

    def __init__(self, size: int, rng: np.random.Generator | None = None) -> None:
        self.size = _check_count("bucketing-size", size, 1)
        self.rng = rng if rng is not None else random_generator()

    def __call__(
        self, updates: np.ndarray, weights: np.ndarray, faults: int = 0
    ) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
        num_rows = updates.shape[0]
        permutation = self.rng.permutation(num_rows)
        bucket_weights = np.add.reduceat(
            np.asarray(weights, np.float64)[permutation], np.arange(0, num_rows, self.size)
        )
        return bucket_means(updates, self.size, permutation), bucket_weights, {"buckets": len(bucket_weights)}

    def output_rows(self, num_rows: int) -> int:
        return -(-num_rows // self.size)

    def cannot_run(self, num_rows: int, faults: int = 0) -> str:
        return "" if num_rows >= 1 else "bucketing needs at least one update"

    def __repr__(self) -> str:
        return f"Bucketing(size={self.size})"


def adaptive_robust_clipping(updates: np.ndarray, f: int) -> tuple[float, int]:
    """Adaptive robust clipping, ARC (Allouah, Guerraoui, Gupta, Jellouli, Rizk & Stephan, ICLR
    2025, "Adaptive Gradient Clipping for Robust Federated Learning", Algorithm 2).

    With ``k = floor(2 (f / n) (n - f))``, computed exactly as ``(2 f (n - f)) // n``, clips, in
    place, the ``k`` rows of largest L2 norm to the norm of the ``(k + 1)``-th largest:
    ``x_i <- x_i * min(1, C / |x_i|)`` with ``C = |x_(k+1)|`` (norms sorted in decreasing order).
    The threshold adapts to the round's honest norms: ``k >= f`` whenever ``f <= n/2``, so among
    the ``k + 1`` largest rows at least one is honest and ``C`` is at most the largest honest norm:
    no row keeps a norm above every honest one. Rows tied at ``C`` are left as
    they are; a zero ``C`` sets the clipped rows to zero. The result does not depend on the order
    of the rows. Returns ``(C, number of rows clipped)``. Cost: one pass for the norms and one over
    the clipped rows.
    """
    num_rows = updates.shape[0]
    k = (2 * f * (num_rows - f)) // num_rows
    if k == 0:
        return math.inf, 0
    norms = row_norms(updates)
    threshold = float(np.partition(norms, num_rows - k - 1)[num_rows - k - 1])
    if threshold == 0:
        over = norms > 0
        updates[over] = 0
        return 0.0, int(over.sum())
    clip_rows(updates, threshold)
    return threshold, int(np.sum(norms > threshold))


class AdaptiveRobustClipping(_HonestMajorityStep):
    """:func:`adaptive_robust_clipping` with ``f`` (``pre-aggregation-f``, lowered by the round's
    rejected replies); needs ``n > 2f``. Weights pass unchanged; measures ``arc-clip-norm``
    (C) and ``arc-clipped-replies``."""

    name = "arc"

    def __call__(
        self, updates: np.ndarray, weights: np.ndarray, faults: int = 0
    ) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
        threshold, clipped = adaptive_robust_clipping(updates, self._round_f(updates.shape[0], faults))
        measurements: dict[str, float] = {"arc-clipped-replies": clipped}
        if math.isfinite(threshold):
            measurements["arc-clip-norm"] = threshold
        return updates, weights, measurements


PRE_AGGREGATION_STEPS = ("nnm", "bucketing", "arc")
"""The names ``pre-aggregation`` accepts, in a comma-separated list applied in its order."""


def parse_pre_aggregation(value: str) -> tuple[str, ...]:
    """The step names of a ``pre-aggregation`` value (``""``: none); ValueError naming the key for an
    unknown or repeated name."""
    names = tuple(name.strip() for name in value.split(",") if name.strip())
    for name in names:
        if name not in PRE_AGGREGATION_STEPS:
            raise ValueError(
                f"pre-aggregation must be a comma-separated list of {', '.join(PRE_AGGREGATION_STEPS)}; got '{name}'"
            )
    if len(set(names)) != len(names):
        raise ValueError(f"pre-aggregation names a step twice: '{value}'")
    return names


def build_pre_aggregation(value: str, f: int, bucketing_size: int) -> list[PreAggregationStep]:
    """The steps of a ``pre-aggregation`` value, in its order, with ``pre-aggregation-f`` and
    ``bucketing-size``."""
    steps: list[PreAggregationStep] = []
    for name in parse_pre_aggregation(value):
        if name == "nnm":
            steps.append(NearestNeighbourMixing(f))
        elif name == "bucketing":
            steps.append(Bucketing(bucketing_size))
        else:
            steps.append(AdaptiveRobustClipping(f))
    return steps
