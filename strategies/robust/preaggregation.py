"""Norm bounds: pre-aggregation steps on the K x P matrix of client updates, composing with any rule.

A bound is called on the round's matrix, clips its rows in place (the matrix is the strategy's
per-round buffer) and returns its measurements (:class:`NormBound`): :class:`FixedNormBound`
(Sun et al. 2019) or :class:`QuantileNormBound` (Andrew et al. 2021, without noise).
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import numpy as np

from strategies.core.checks import positive_number
from strategies.core.clipping import clip_rows


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
