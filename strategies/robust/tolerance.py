"""How many Byzantine clients each built-in rule tolerates, and its parameters derived from one fraction.

A user who names a rule states one assumption, the fraction ρ of Byzantine clients
(``byzantine-fraction``); with ``n`` clients per round the expected count is
``a = floor(ρ n + 1e-9)`` (the floor :func:`fl_app.config.choices.select_attackers` takes), and

* Krum and Multi-Krum (Blanchard et al. 2017): ``f = min(a, (n - 3) // 2)``, since they need ``n >= 2f + 3``;
  Multi-Krum averages ``m = n - f`` (then no attacker within the assumption is averaged in);
* Bulyan (El Mhamdi et al. 2018): ``f = min(a, (n - 3) // 4)``, since it needs ``n >= 4f + 3``;
* trimmed mean (Yin et al. 2018): ``beta = min(a, (n - 1) // 2) / n``, which trims exactly that count
  at each end (:func:`strategies.robust.rules.trimmed_count`).

:func:`tolerated` says how many Byzantine updates a rule with given parameters is designed for, so
that a simulation can refuse an attack its rule cannot be expected to hold.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from strategies.robust.rules import FLOOR_TOLERANCE, trimmed_count


def byzantine_count(num_clients: int, fraction: float) -> int:
    """``floor(fraction * n + 1e-9)``: the Byzantine clients among ``n`` that ``fraction`` assumes."""
    if not 0 <= fraction < 0.5:
        raise ValueError(f"byzantine-fraction must be in [0, 0.5), got {fraction!r}")
    return math.floor(fraction * num_clients + FLOOR_TOLERANCE)


@dataclasses.dataclass(frozen=True)
class DerivedParams:
    """The rules' parameters that ``byzantine-fraction`` decides for ``n`` clients per round.

    Attributes:
        count: the Byzantine clients assumed, ``floor(rho n + 1e-9)``.
        krum_f: f of Krum and Multi-Krum, ``min(count, (n - 3) // 2)`` (``n >= 2f + 3``).
        bulyan_f: f of Bulyan, ``min(count, (n - 3) // 4)`` (``n >= 4f + 3``).
        trimmed_mean_beta: ``min(count, (n - 1) // 2) / n``.
        majority_f: f of DnC and of the ``nnm`` and ``arc`` pre-aggregation steps,
            ``min(count, (n - 1) // 2)`` (they assume an honest majority, ``n > 2f``).
    """

    count: int
    krum_f: int
    bulyan_f: int
    trimmed_mean_beta: float
    majority_f: int


def derived_params(num_clients: int, fraction: float) -> DerivedParams:
    """The parameters of :class:`DerivedParams` for ``num_clients`` per round and Byzantine ``fraction``."""
    if num_clients < 1:
        raise ValueError(f"the clients per round must be at least 1, got {num_clients}")
    count = byzantine_count(num_clients, fraction)
    return DerivedParams(
        count=count,
        krum_f=max(0, min(count, (num_clients - 3) // 2)),
        bulyan_f=max(0, min(count, (num_clients - 3) // 4)),
        trimmed_mean_beta=min(count, (num_clients - 1) // 2) / num_clients,
        majority_f=min(count, (num_clients - 1) // 2),
    )


def tolerated(rule: str, num_clients: int, params: Mapping[str, Any]) -> int | None:
    """The most Byzantine updates among ``num_clients`` that built-in ``rule`` with keyword
    ``params`` is designed for (None: the rule states no such count, e.g. centered clipping, whose
    bound depends on tau, or a user's rule).

    mean: 0 (one update moves it arbitrarily far); median and geometric median: ``(n - 1) // 2``
    (breakdown point 1/2); trimmed mean: the count trimmed at each end; Krum, Multi-Krum, Bulyan,
    DnC: f.
    """
    if rule == "mean":
        return 0
    if rule in ("median", "geometric-median"):
        return (num_clients - 1) // 2
    if rule == "trimmed-mean":
        return trimmed_count(num_clients, float(params["beta"]))
    if rule in ("krum", "multi-krum", "bulyan", "dnc"):
        return int(params["f"])
    return None
