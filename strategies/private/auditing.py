"""Empirical lower bounds on epsilon from one training run (Steinke, Nasr, Jagielski 2023).

"Privacy Auditing with One (1) Training Run" (NeurIPS 2023, arXiv:2305.08846): insert ``m``
canaries, each independently included with probability 1/2 (``S_i = +1``) or left out (``S_i =
-1``), run the mechanism once, and let an auditor who sees only its output guess ``T_i in {-1, 0,
+1}`` for every canary (0: abstain). With ``r = #{i : T_i != 0}`` guesses of which ``v = #{i :
T_i = S_i}`` are correct, Theorem 5.2 of the paper bounds the chance of that many correct guesses
for any mechanism that is (epsilon, delta)-DP with respect to each canary:

    P[W >= v]  <=  f(v) + 2 m delta * max_{i = 1..v} (f(v - i) - f(v)) / i  =:  p(epsilon),
    f(k) = P[Binomial(r, e^epsilon / (1 + e^epsilon)) >= k]

(``e^eps / (1 + e^eps)`` is the accuracy of epsilon-DP randomised response: without delta, the
correct guesses are stochastically dominated by that binomial). An observed ``v`` with ``p(epsilon)
< alpha`` rejects "(epsilon, delta)-DP" at significance ``alpha``; since a mechanism that is
(epsilon, delta)-DP is (epsilon', delta)-DP for every epsilon' > epsilon,

    epsilon_lower = sup { epsilon >= 0 : p(epsilon) < alpha }

holds, with probability at least ``1 - alpha`` over the canaries' inclusion and the mechanism's
randomness, as a lower bound on the mechanism's true epsilon at ``delta``. It is 0 when the
guesses are no better than chance. A lower bound: a real epsilon far above it is not a bug, one
below it is (the claimed epsilon is wrong, or the mechanism is not the one accounted).

The auditor here ranks canaries by a score (higher: more likely included) and guesses the top
``k+`` as included and the bottom ``k-`` as excluded (:func:`guesses_from_scores`). Picking the
best of several ``(k+, k-)`` after seeing the scores is multiple testing: :func:`audit_scores`
pays for it with a Bonferroni correction (each of ``K`` choices is tested at ``alpha / K``).

Pure functions of NumPy arrays (SciPy's binomial); nothing here runs a mechanism.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
from scipy import special, stats

DEFAULT_SIGNIFICANCE = 0.05
"""``alpha``: the bound holds with probability at least 95%."""

DEFAULT_GUESS_FRACTIONS = (0.05, 0.1, 0.2, 0.5, 1.0)
"""The fractions ``f`` of the canaries that :func:`audit_scores` guesses: ``k+ = k- = ceil(f m / 2)``
(1.0: every canary)."""

_SEARCH_POINTS = 257
"""Grid points of the scan for the last ``epsilon`` with ``p(epsilon) < alpha``."""


def _check_counts(m: int, r: int, v: int, delta: float) -> None:
    if not (0 <= v <= r <= m):
        raise ValueError(f"need 0 <= correct guesses v <= guesses r <= canaries m, got v={v}, r={r}, m={m}")
    if not 0.0 <= delta <= 1.0:
        raise ValueError(f"delta must be in [0, 1], got {delta}")


def one_run_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """``p(epsilon)``: the largest chance of ``>= v`` correct guesses out of ``r`` under (epsilon, delta)-DP.

    Theorem 5.2 of Steinke, Nasr, Jagielski (2023), with ``m`` canaries each included with
    probability 1/2 and ``q = e^epsilon / (1 + e^epsilon)``::

        p = f(v) + 2 m delta * max_{i = 1..v} (f(v - i) - f(v)) / i,   f(k) = P[Binomial(r, q) >= k]

    capped at 1. ``f(v - i) - f(v) = P[v - i <= Binomial(r, q) <= v - 1]`` is summed from the
    binomial's probability mass, so no difference of two tails near 1 loses precision.
    """
    _check_counts(m, r, v, delta)
    if not (epsilon >= 0 and math.isfinite(epsilon)):
        raise ValueError(f"epsilon must be finite and >= 0, got {epsilon}")
    if v == 0:
        return 1.0
    q = float(special.expit(epsilon))
    beta = float(stats.binom.sf(v - 1, r, q))
    if delta == 0:
        return min(beta, 1.0)
    below = stats.binom.pmf(np.arange(v - 1, -1, -1), r, q)  # P[B = v - 1], P[B = v - 2], ..., P[B = 0]
    alpha = float(np.max(np.cumsum(below) / np.arange(1, v + 1)))
    return min(beta + 2.0 * m * delta * alpha, 1.0)


def one_run_epsilon_lower_bound(
    m: int, r: int, v: int, delta: float, significance: float = DEFAULT_SIGNIFICANCE
) -> float:
    """``sup {epsilon >= 0 : p(epsilon) < significance}`` with ``p`` of :func:`one_run_p_value`.

    The empirical lower bound on epsilon at ``delta`` of one-run auditing (Steinke, Nasr,
    Jagielski 2023, Theorem 5.2), valid with probability ``>= 1 - significance``: 0 when ``v``
    correct guesses of ``r`` are what chance (``p(0) >= significance``) explains. ``p`` is scanned
    on a grid up to the first point past the last crossing (``p`` tends to 1 as ``epsilon`` grows,
    since then ``f(v) -> 1``), and the last grid interval where ``p`` crosses ``significance`` is
    bisected, so a ``p`` that is not monotone in ``epsilon`` still gives the supremum (to the
    grid's resolution). Never NaN: a finite float >= 0.
    """
    _check_counts(m, r, v, delta)
    if not 0.0 < significance < 1.0:
        raise ValueError(f"significance must be in (0, 1), got {significance}")
    if one_run_p_value(m, r, v, 0.0, 0.0) >= significance:  # even pure DP at epsilon 0 explains v
        return 0.0
    high = 1.0
    while one_run_p_value(m, r, v, high, delta) < significance:
        high *= 2.0
    grid = np.linspace(0.0, high, _SEARCH_POINTS)
    rejected = [one_run_p_value(m, r, v, float(e), delta) < significance for e in grid]
    if not any(rejected):
        return 0.0
    last = max(i for i, ok in enumerate(rejected) if ok)
    low, high = float(grid[last]), float(grid[last + 1])  # p(low) < significance <= p(high)
    for _ in range(50):
        middle = 0.5 * (low + high)
        if one_run_p_value(m, r, v, middle, delta) < significance:
            low = middle
        else:
            high = middle
    return low


def guesses_from_scores(scores: np.ndarray, k_plus: int, k_minus: int) -> np.ndarray:
    """``T``: +1 for the ``k_plus`` highest scores, -1 for the ``k_minus`` lowest, 0 for the rest.

    Ties are broken by position (a stable sort), which does not depend on the canaries' inclusion.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if not (k_plus >= 0 and k_minus >= 0 and k_plus + k_minus <= scores.size):
        raise ValueError(f"need k+ + k- <= {scores.size} canaries, got k+={k_plus}, k-={k_minus}")
    if not np.isfinite(scores).all():
        raise ValueError("canary scores must be finite")
    order = np.argsort(-scores, kind="stable")
    guesses = np.zeros(scores.size, dtype=np.int8)
    guesses[order[:k_plus]] = 1
    if k_minus:
        guesses[order[-k_minus:]] = -1
    return guesses


@dataclasses.dataclass(frozen=True)
class AuditResult:
    """One audit's lower bound and the guesses it came from.

    Attributes:
        epsilon_lower: the empirical lower bound on epsilon at ``delta`` (Bonferroni-corrected).
        canaries: ``m``.
        guesses: ``r`` of the best ``(k+, k-)``.
        correct: ``v`` of the best ``(k+, k-)``.
        k_plus, k_minus: the best choice.
        choices: how many ``(k+, k-)`` were tried (the Bonferroni factor).
        delta, significance: of the bound.
    """

    epsilon_lower: float
    canaries: int
    guesses: int
    correct: int
    k_plus: int
    k_minus: int
    choices: int
    delta: float
    significance: float


def audit_scores(
    scores: np.ndarray,
    included: np.ndarray,
    delta: float,
    *,
    significance: float = DEFAULT_SIGNIFICANCE,
    guess_fractions: Sequence[float] = DEFAULT_GUESS_FRACTIONS,
) -> AuditResult:
    """The best lower bound over ``k+ = k- = ceil(f m / 2)`` for ``f`` in ``guess_fractions``.

    ``scores[i]`` is the auditor's score of canary ``i`` (computed from the mechanism's output
    only), ``included[i]`` whether it was included (``S_i = +1``), used only to count correct
    guesses. Each choice is tested at ``significance / len(guess_fractions)`` (Bonferroni), so the
    maximum over them is a lower bound with probability ``>= 1 - significance``.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    included = np.asarray(included, dtype=bool).ravel()
    if scores.shape != included.shape or scores.size == 0:
        raise ValueError(f"need one score per canary, got {scores.size} scores for {included.size} canaries")
    if not guess_fractions or not all(0 < f <= 1 for f in guess_fractions):
        raise ValueError(f"guess fractions must be in (0, 1], got {list(guess_fractions)}")
    m = scores.size
    truth = np.where(included, 1, -1)
    level = significance / len(guess_fractions)
    results = []
    for fraction in guess_fractions:
        k = min(math.ceil(fraction * m / 2), m // 2) or 1
        k_minus = min(k, m - k)
        guesses = guesses_from_scores(scores, k, k_minus)
        r = int(np.count_nonzero(guesses))
        v = int(np.count_nonzero(guesses == truth))
        bound = one_run_epsilon_lower_bound(m, r, v, delta, level)
        results.append(AuditResult(bound, m, r, v, k, k_minus, len(guess_fractions), delta, significance))
    return max(results, key=lambda result: result.epsilon_lower)  # the first of equal bounds
