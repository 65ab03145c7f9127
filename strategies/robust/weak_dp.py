"""Weak differential-privacy noise on the aggregate, the second half of the backdoor defence of
Sun, Kairouz, Suresh & McMahan (2019, "Can You Really Backdoor Federated Learning?").

Their defence is norm bounding (``norm-bound``, :class:`strategies.robust.preaggregation.FixedNormBound`)
followed by Gaussian noise of a small standard deviation on the aggregated update. The norm bound
limits how far a boosted (model-replacement) update can pull the aggregate; the noise then drowns
the small, targeted component that a bounded backdoor update still adds, at the price of some
main-task accuracy. It gives no differential-privacy guarantee (no clipping of the aggregate's
sensitivity to a calibrated noise multiplier, no accountant): use ``strategy='dp-fedavg'`` for that.
"""

from __future__ import annotations

import numpy as np

from strategies.core.checks import positive_number
from strategies.robust.rules import random_generator


class WeakDpNoise:
    """Adds ``N(0, sigma^2 I)`` to the aggregate: ``v <- v + sigma * xi``, ``xi ~ N(0, I_P)``
    (``sigma = weak-dp-noise-std``; Sun et al. 2019 use 0.025 on EMNIST with a norm bound of 3-5).

    The noise comes from ``rng`` (default: a generator seeded from the OS's CSPRNG, so that no
    client can predict and cancel it). Cost: P Gaussian draws and one addition per round (about
    10 ms at P = 1M), and accuracy: each round moves the model by a random vector of norm about
    ``sigma sqrt(P)``, which Sun et al. found to lower main-task accuracy by a few points at the
    noise levels that stop backdoors.
    """

    def __init__(self, std: float, rng: np.random.Generator | None = None) -> None:
        self.std = positive_number("weak-dp-noise-std", std)
        self.rng = rng if rng is not None else random_generator()

    def __call__(self, aggregate: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
        """The noised aggregate (a new float32 vector) and the measurement ``weak-dp-noise-std``."""
        noise = self.rng.standard_normal(aggregate.shape, dtype=np.float32)
        noise *= np.float32(self.std)
        noise += aggregate
        return noise, {"weak-dp-noise-std": self.std}

    def __repr__(self) -> str:
        return f"WeakDpNoise(std={self.std:g})"
