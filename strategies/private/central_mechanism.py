"""The central Gaussian mechanism of user-level DP-FedAvg: sampling, clipping, noise, accounting, budget.

One round, as :class:`CentralGaussianMechanism` runs it for every server path (the Message-API
:class:`strategies.private.dp_fedavg.DpFedAvgStrategy` and the SecAgg+ strategy of
:mod:`fl_app.secagg.server`):

1. **sample** the round's clients: Poisson (each of the ``N`` connected nodes with probability
   ``q``) or fixed-size (``m`` of them without replacement), from a :mod:`secrets`-seeded
   generator, so that the amplification by sampling the accountant assumes is real;
2. **check the budget** (:meth:`~CentralGaussianMechanism.check_budget`): if the round would take
   epsilon at ``delta`` above the target, raise :class:`strategies.core.errors.PrivacyBudgetExhausted`
   *before* any client trains;
3. **clip** every update to L2 norm ``C`` (:func:`strategies.core.clipping.clip_rows`);
4. **release** (:meth:`~CentralGaussianMechanism.release`) the aggregate plus Gaussian noise and
   account the round:

       mean (fixed denominator):  Delta = (1/m) sum_i clip(u_i, C) + N(0, sigma^2 I),  s = C / m
       any other rule:            Delta = clip(rule(...), C)      + N(0, sigma^2 I),  s = 2C

       sigma = z_u * s

   with ``m`` the *expected* number of clients (``q N``, or the fixed sample size), never the
   number that replied, so that one client's presence changes the mean by at most ``C / m``
   (McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models"); any other
   rule's output lies in the ball of radius ``C``, so two outputs differ by at most its diameter
   ``2C``. ``z_u = z`` with a fixed clip norm. With adaptive clipping (Andrew et al. 2021,
   "Differentially Private Learning with Adaptive Clipping") ``C`` follows a target quantile of
   the update norms through a noised *centred* count ``sum_i (1[||u_i|| <= C] - 1/2) + N(0, sigma_b^2)``
   (add/remove sensitivity 1/2, as TF Privacy's quantile estimator), which spends part of the
   budget: the update gets ``z_u = (z^-2 - (2 sigma_b)^-2)^-1/2`` (Sec. 3 of the paper) and the
   round is accounted as ``ComposedDpEvent([GaussianDpEvent(z_u), GaussianDpEvent(2 sigma_b)])``
   under the round's sampling, which costs what one Gaussian round at the total ``z`` costs.

Every round is one :class:`strategies.private.accounting.DpFedAvgRound` in a
:class:`strategies.private.accounting.PrivacyAccountant` (or, for local DP, the clients' own
round spec: the server then adds nothing and its aggregate is post-processing). The accountant
and the adaptive clip norm are the mechanism's :meth:`~CentralGaussianMechanism.state_dict`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

from strategies.core.clipping import clip_rows
from strategies.core.errors import PrivacyBudgetExhausted
from strategies.private.accounting import (
    METHODS,
    PLD_MIN_NOISE_MULTIPLIER,
    SAMPLINGS,
    AccountingMethod,
    DpFedAvgRound,
    PrivacyAccountant,
    RoundSpec,
    adaptive_clipping_update_noise_multiplier,
    gaussian_noise_multipliers,
)
from strategies.private.mechanisms import AdaptiveClipState, gaussian_noise, secure_generator

T = TypeVar("T")


def poisson_sample(items: Sequence[T], rate: float, rng: np.random.Generator) -> list[T]:
    """Each item independently with probability ``rate`` (the sample size varies)."""
    keep = rng.random(len(items)) < rate
    return [item for item, k in zip(items, keep) if k]


def fixed_size_sample(items: Sequence[T], size: int, rng: np.random.Generator) -> list[T]:
    """``min(size, len(items))`` items without replacement, in their original order."""
    m = min(int(size), len(items))
    return [items[i] for i in sorted(rng.choice(len(items), size=m, replace=False))]


class CentralGaussianMechanism:
    """User-level central DP: sampling, clip, Gaussian noise, accountant and budget of one run.

    Parameters
    ----------
    noise_multiplier : ``z`` (total, including the adaptive clipping count's share)
    clip_norm : ``C``; with ``clip_quantile`` the initial clip norm
    num_clients : ``N``, the population the run config expects
    sampling : ``poisson`` (rate ``sampling_rate``) or ``fixed-size`` (``clients_per_round``)
    mean : True when the released aggregate is the fixed-denominator mean (sensitivity ``C / m``);
        False for any other rule whose output is clipped to ``C`` (sensitivity ``2C``)
    delta, accounting : epsilon is reported at this delta; ``rdp`` or ``pld`` decides the stop
    target_epsilon : stop before a round that would exceed it (None or 0: no budget)
    clip_quantile, clip_learning_rate, count_noise_std : adaptive clipping (gamma, eta, sigma_b;
        ``count_noise_std`` None: ``m / 20`` as Andrew et al. suggest)
    local_round : local DP: the clients' own mechanism, accounted per round instead of the
        server's (which then adds no noise)
    rng : noise and sampling generator (default :func:`secure_generator`; tests may pass a seeded one)
    """

    def __init__(
        self,
        *,
        noise_multiplier: float,
        clip_norm: float,
        num_clients: int,
        sampling: str = "poisson",
        sampling_rate: float = 1.0,
        clients_per_round: int | None = None,
        mean: bool = True,
        delta: float = 1e-5,
        accounting: str = "rdp",
        target_epsilon: float | None = None,
        clip_quantile: float | None = None,
        clip_learning_rate: float = 0.2,
        count_noise_std: float | None = None,
        local_round: RoundSpec | None = None,
        rng: np.random.Generator | None = None,
    ) -> None:
        if sampling not in SAMPLINGS:
            raise ValueError(f"dp-sampling must be one of {', '.join(SAMPLINGS)}; got '{sampling}'")
        if accounting not in METHODS:
            raise ValueError(f"dp-accounting must be one of {', '.join(METHODS)}; got '{accounting}'")
        if not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
            raise ValueError(f"dp-noise-multiplier must be >= 0, got {noise_multiplier}")
        if not clip_norm > 0:
            raise ValueError(f"dp-clip-norm must be > 0, got {clip_norm}")
        if not 0 < delta < 1:
            raise ValueError(f"dp-delta must be in (0, 1), got {delta}")
        if sampling == "fixed-size":
            if clients_per_round is None or not 1 <= clients_per_round <= num_clients:
                raise ValueError(
                    f"fixed-size sampling needs 1 <= clients per round <= num-partitions = {num_clients}, "
                    f"got {clients_per_round}"
                )
        elif not 0 < sampling_rate <= 1:
            raise ValueError(f"Poisson sampling needs a rate in (0, 1] (fraction-train), got {sampling_rate}")
        self.noise_multiplier = float(noise_multiplier)
        self.fixed_clip_norm = float(clip_norm)
        self.num_clients = int(num_clients)
        self.sampling = sampling
        self.sampling_rate = float(sampling_rate)
        self.clients_per_round = clients_per_round
        self.mean_rule = mean
        self.delta = float(delta)
        self.accounting: AccountingMethod = "pld" if accounting == "pld" else "rdp"
        self.target_epsilon = target_epsilon if target_epsilon and target_epsilon > 0 else None
        self.local_round = local_round
        self.adaptive: AdaptiveClipState | None = None
        if clip_quantile:
            sigma_b = self.expected_clients / 20.0 if count_noise_std is None else float(count_noise_std)
            self.adaptive = AdaptiveClipState(clip_norm, clip_quantile, clip_learning_rate, sigma_b)
            # fails early if the count would use the whole budget
            adaptive_clipping_update_noise_multiplier(self.noise_multiplier, sigma_b)
        self.accountant = PrivacyAccountant()
        self.rng = rng if rng is not None else secure_generator()
        self.stop_reason: str | None = None
        self._check_accounting_supported()

    # ----------------------------------------------------------------------------- quantities

    @property
    def expected_clients(self) -> float:
        """``m``: ``q N`` under Poisson sampling, the sample size under fixed-size sampling."""
        if self.sampling == "fixed-size":
            return float(self.clients_per_round or 0)
        return self.sampling_rate * self.num_clients

    @property
    def clip_norm(self) -> float:
        """The clip norm ``C`` of the next round."""
        return self.adaptive.clip_norm if self.adaptive is not None else self.fixed_clip_norm

    @property
    def update_noise_multiplier(self) -> float:
        """``z_u``: the update's share of ``z`` (all of it without adaptive clipping)."""
        if self.adaptive is None:
            return self.noise_multiplier
        return adaptive_clipping_update_noise_multiplier(self.noise_multiplier, self.adaptive.count_noise_std)

    @property
    def sensitivity(self) -> float:
        """Add/remove-one-client L2 sensitivity of the released aggregate: ``C / m`` for the mean,
        ``2C`` (the diameter of the ball the output is clipped to) for any other rule."""
        return self.clip_norm / self.expected_clients if self.mean_rule else 2.0 * self.clip_norm

    def noise_std(self) -> float:
        """``sigma = z_u * sensitivity``, the std of the noise on this round's aggregate (0 for local DP)."""
        if self.local_round is not None:
            return 0.0
        return self.update_noise_multiplier * self.sensitivity

    def round_spec(self, connected: int | None = None) -> RoundSpec:
        """What one round of this mechanism is, for the accountant.

        ``connected``: nodes connected now (fixed-size sampling draws ``m`` of them, so the
        amplification is ``m / connected``); default ``num_clients``.
        """
        if self.local_round is not None:
            return self.local_round
        population = max(int(connected or self.num_clients), 1)
        # adaptive clipping: the centred count (sensitivity 1/2) with noise sigma_b is released too
        count_z = 2.0 * self.adaptive.count_noise_std if self.adaptive is not None else 0.0
        if self.sampling == "poisson":
            q = self.sampling_rate
            return DpFedAvgRound(self.noise_multiplier, population, q * population, "poisson", count_z)
        m = min(int(self.clients_per_round or 0), population)
        return DpFedAvgRound(self.noise_multiplier, population, m, "fixed-size", count_z)

    def _check_accounting_supported(self) -> None:
        if self.accounting == "pld":
            smallest = min(gaussian_noise_multipliers(self.round_spec().to_dp_event()), default=math.inf)
            if smallest < PLD_MIN_NOISE_MULTIPLIER:
                raise ValueError(
                    f"dp-accounting='pld' needs every Gaussian's noise multiplier >= {PLD_MIN_NOISE_MULTIPLIER} "
                    f"(its grid grows as 1/z^2), this run's is {smallest:.3g} (dp-noise-multiplier "
                    f"{self.noise_multiplier:g}): use dp-accounting='rdp' or more noise"
                )
        if self.accounting == "pld" and self.local_round is None and self.sampling == "fixed-size":
            raise ValueError(
                "dp-accounting='pld' cannot account dp-sampling='fixed-size' (dp_accounting has no PLD "
                "bound for sampling without replacement, which any round with more connected nodes than "
                "m runs): use dp-accounting='rdp' or dp-sampling='poisson'"
            )

    # ----------------------------------------------------------------------------- one round

    def check_budget(self, server_round: int, connected: int | None = None) -> RoundSpec:
        """The spec of the coming round, after checking that it fits the budget.

        Raises :class:`PrivacyBudgetExhausted` (and keeps the reason in :attr:`stop_reason`) when
        the round would take epsilon at ``delta`` above ``target_epsilon``.
        """
        spec = self.round_spec(connected)
        if self.target_epsilon is None:
            return spec
        after = self.accountant.epsilon_if_added(spec, delta=self.delta, method=self.accounting)
        if after > self.target_epsilon:
            now = self.accountant.epsilon(self.delta, self.accounting)
            self.stop_reason = (
                f"privacy budget: round {server_round} would take epsilon from {now:.4g} to {after:.4g} "
                f"> dp-target-epsilon {self.target_epsilon:g} (delta {self.delta:g}); training stops "
                f"after {self.accountant.rounds} private rounds"
            )
            raise PrivacyBudgetExhausted(self.stop_reason)
        return spec

    def sample(self, items: Sequence[T]) -> list[T]:
        """Poisson: each item independently with probability ``q``; fixed-size: ``m`` without replacement."""
        if self.sampling == "poisson":
            return poisson_sample(items, self.sampling_rate, self.rng)
        return fixed_size_sample(items, int(self.clients_per_round or 0), self.rng)

    def clip(self, updates: np.ndarray) -> np.ndarray:
        """Clip the rows of the K x P float32 ``updates`` to ``C`` in place; their norms before."""
        if updates.shape[0] == 0:
            return np.zeros(0)
        return clip_rows(updates, self.clip_norm)

    def mean(self, clipped: np.ndarray) -> np.ndarray:
        """``(1/m) sum_i clipped_i`` with the expected ``m`` (float64 sum, float32 result)."""
        if clipped.shape[0] == 0:
            return np.zeros(clipped.shape[1], np.float32)
        total = np.einsum("ij->j", clipped, dtype=np.float64)
        return (total / self.expected_clients).astype(np.float32)

    def release(self, aggregate: np.ndarray, spec: RoundSpec, norms: np.ndarray | None = None) -> np.ndarray:
        """Add ``N(0, sigma^2 I)`` to the float32 ``aggregate`` in place and account the round.

        ``spec`` is the round's spec from :meth:`check_budget`; ``norms`` (the round's norms
        before clipping) moves an adaptive clip norm one step. The noise uses this round's
        ``C``; the mechanism ran whoever replied, so a round without replies is accounted too.
        """
        std = self.noise_std()
        if std > 0:
            aggregate += gaussian_noise(aggregate.shape, std, self.rng)
        if self.adaptive is not None and norms is not None:
            self.adaptive.update(norms, self.expected_clients, self.rng)
        self.accountant.add_round(spec)
        return aggregate

    # ----------------------------------------------------------------------------- reports and state

    def epsilons(self) -> dict[str, float]:
        """Epsilon so far at ``delta``: ``epsilon`` (the configured method), ``epsilon-rdp`` and,
        where dp_accounting supports it, ``epsilon-pld``."""
        out = {"epsilon-rdp": self.accountant.epsilon(self.delta, "rdp")}
        try:
            out["epsilon-pld"] = self.accountant.epsilon(self.delta, "pld")
        except ValueError:  # fixed-size sampling: no PLD bound
            pass
        out["epsilon"] = out[f"epsilon-{self.accounting}"]
        return out

    def metrics(self) -> dict[str, float]:
        """What a round reports after :meth:`release`: the epsilons, ``delta``, ``dp-rounds`` and
        ``dp-target-epsilon`` when there is a budget."""
        out: dict[str, float] = {**self.epsilons(), "delta": self.delta, "dp-rounds": self.accountant.rounds}
        if self.target_epsilon is not None:
            out["dp-target-epsilon"] = self.target_epsilon
        return out

    def state_dict(self) -> dict[str, Any]:
        """The privacy accountant and the adaptive clip norm (JSON-able; restore both on resume)."""
        state: dict[str, Any] = {"privacy-accountant": self.accountant.state_dict()}
        if self.adaptive is not None:
            state["adaptive-clip"] = self.adaptive.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (keys that are absent leave their part as it is)."""
        if "privacy-accountant" in state:
            self.accountant = PrivacyAccountant.from_state_dict(state["privacy-accountant"])
        if "adaptive-clip" in state and self.adaptive is not None:
            self.adaptive.load_state_dict(dict(state["adaptive-clip"]))
