"""Tree aggregation: Gaussian noise for every prefix sum of a stream, with O(log T) memory (pure NumPy).

The binary-tree mechanism for continual counting (Dwork, Naor, Pitassi, Rothblum 2010, "Differential
privacy under continual observation"; Chan, Shi, Song 2011, "Private and continual release of
statistics"), in the form DP-FTRL uses it (Kairouz, McMahan, Song, Thakkar, Thakurta, Xu 2021,
"Practical and private (deep) learning without sampling or shuffling", ICML, Sec. 3 and App. B).

Leaves ``x_0, x_1, ...`` (here: the round sums of clipped client updates) arrive one per step. Every
node of the binary tree over the leaves -- the dyadic interval ``[j 2^l, (j + 1) 2^l)`` at level
``l`` -- gets its own independent noise ``n_(l, j) ~ N(0, sigma^2 I)``. The prefix sum of leaves
``0 .. t`` is released as

    s~_t = sum_(k <= t) x_k + sum_(nodes (l, j) of the dyadic decomposition of [0, t + 1)) n_(l, j)

i.e. the exact prefix sum plus the noise of the ``popcount(t + 1)`` nodes whose intervals tile
``[0, t + 1)`` (one per set bit of ``t + 1``). That equals the sum of the noised node values
``x_(l, j) + n_(l, j)`` over the same nodes, so every release is post-processing of the noised tree.
A leaf lies in one node per level, at most ``ceil(log2(T + 1))`` nodes of a tree of ``T`` leaves:
if one user changes one leaf by at most ``C`` in L2 norm, the noised tree is the Gaussian mechanism
with sensitivity ``C sqrt(depth)``, and with ``sigma = z C`` its RDP is ``alpha depth / (2 z^2)``
(``dp_accounting``'s ``SingleEpochTreeAggregationDpEvent(z, T)``; the accounting lives in
:mod:`strategies.private.accounting`).

:class:`TreeNoise` keeps only the nodes of the current decomposition (the "left children" of
TensorFlow Privacy's ``tree_aggregation.TreeAggregator``, whose order of draws it follows): at most
``floor(log2 T) + 1`` noise vectors of size ``P``. Going from leaf ``t - 1`` to leaf ``t``, the
decomposition of ``t + 1`` replaces the nodes below level ``k`` (``k`` = the trailing ones of ``t``)
by one fresh node at level ``k``, which covers ``[t + 1 - 2^k, t + 1)``. :meth:`TreeNoise.restart`
begins a new tree (DP-FTRL's restarts, Kairouz et al. App. D).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from strategies.private.mechanisms import gaussian_noise


def trailing_ones(t: int) -> int:
    """The number of trailing 1 bits of ``t >= 0`` (the level of the node that leaf ``t`` completes)."""
    return ((t + 1) & -(t + 1)).bit_length() - 1


def tree_depth(steps: int) -> int:
    """``ceil(log2(steps + 1))``: the most nodes of a tree of ``steps`` leaves that hold one leaf
    (``dp_accounting``'s ``max_depth`` for ``SingleEpochTreeAggregationDpEvent``)."""
    if int(steps) != steps or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps}")
    return math.ceil(math.log2(int(steps) + 1))


class TreeNoise:
    """The noise of every prefix sum of a stream of ``size``-vectors, node noise ``N(0, std^2 I)``.

    ``next()`` returns the noise of the prefix sum that ends at the next leaf; the caller adds it
    to the exact prefix sum. Memory: the nodes of the current dyadic decomposition, at most
    ``floor(log2 T) + 1`` float32 vectors of ``size``.

    Parameters
    ----------
    size : length ``P`` of every leaf (the model's parameter count)
    std : ``sigma``, the noise std of every tree node (``z C`` for leaves clipped to ``C``)
    rng : the noise generator (:func:`strategies.private.mechanisms.secure_generator` in production)
    """

    def __init__(self, size: int, std: float, rng: np.random.Generator) -> None:
        if int(size) != size or size < 1:
            raise ValueError(f"size must be an integer >= 1, got {size}")
        if not (math.isfinite(std) and std >= 0):
            raise ValueError(f"std must be a finite number >= 0, got {std}")
        self.size = int(size)
        self.std = float(std)
        self.rng = rng
        self.steps = 0
        self._levels: list[int] = []  # ascending: the levels of the nodes in the decomposition of `steps`
        self._nodes: list[np.ndarray] = []

    @property
    def levels(self) -> list[int]:
        """The levels of the nodes whose noise the last prefix sum carries (the set bits of ``steps``)."""
        return list(self._levels)

    def next(self) -> np.ndarray:
        """Advance to the next leaf ``t = steps`` and return the float32 noise of the prefix sum
        ``0 .. t``: the sum of the ``popcount(t + 1)`` nodes that tile ``[0, t + 1)``."""
        level = trailing_ones(self.steps)
        keep = [i for i, node_level in enumerate(self._levels) if node_level > level]
        self._levels = [level, *(self._levels[i] for i in keep)]
        self._nodes = [gaussian_noise(self.size, self.std, self.rng), *(self._nodes[i] for i in keep)]
        self.steps += 1
        return self.noise()

    def noise(self) -> np.ndarray:
        """The noise of the last released prefix sum (zeros before the first leaf)."""
        total = np.zeros(self.size, np.float64)
        for node in self._nodes:
            total += node
        return total.astype(np.float32)

    def restart(self) -> None:
        """Begin a new tree: the next leaf is leaf 0 again, with all-new node noise."""
        self.steps = 0
        self._levels, self._nodes = [], []

    def state_dict(self) -> dict[str, Any]:
        """``steps``, ``levels`` and the node noise (a ``len(levels) x size`` float32 array).

        The node noise is what hides the exact prefix sums: keep it as secret as the raw updates."""
        nodes = np.stack(self._nodes) if self._nodes else np.zeros((0, self.size), np.float32)
        return {"steps": self.steps, "levels": list(self._levels), "nodes": nodes}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; the levels must be the set bits of ``steps`` and the nodes fit ``size``."""
        steps = int(state["steps"])
        levels = [int(level) for level in state["levels"]]
        nodes = np.asarray(state["nodes"], dtype=np.float32).reshape(len(levels), -1) if levels else None
        expected = [level for level in range(max(steps, 1).bit_length()) if steps >> level & 1]
        if steps < 0 or levels != expected:
            raise ValueError(f"tree state: levels {levels} are not the set bits of steps = {steps} ({expected})")
        if nodes is not None and nodes.shape[1] != self.size:
            raise ValueError(f"tree state: nodes of size {nodes.shape[1]}, the model has {self.size} parameters")
        self.steps = steps
        self._levels = levels
        self._nodes = [] if nodes is None else [row.copy() for row in nodes]
