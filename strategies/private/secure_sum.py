"""DP over SecAgg+'s quantised sum: central noise, or distributed discrete Gaussian noise (pure NumPy).

Flower's SecAgg+ (``secaggplus_mod``) maps every value ``w`` a client sends to an integer
``round((clip(w, -r, r) + r) / h)`` with ``h = 2r / L`` (``r`` = ``secagg-clipping-range``, ``L`` =
``secagg-quantization-range``; stochastic rounding), masks it, and the server unmasks the exact
integer sum of the ``k`` clients whose masked vectors arrived (the survivors).

**Sensitivity of the quantised sum** (both modes). A client clips its update to L2 norm ``C``.
Stochastic rounding of ``y`` has the law of ``floor(y / h + U)`` with ``U ~ Uniform[0, 1)``; under
the coupling that uses one ``U`` per coordinate for two inputs ``y, y'``,
``|floor(y/h + U) - floor(y'/h + U)| < |y - y'| / h + 1``, so the two quantised vectors differ by
at most ``||y - y'||_2 + sqrt(P) h`` in L2 (``P`` values). The clamp to ``[-r, r]`` is a projection
onto a box, which never moves two points further apart. Replacing one client (the relation of
fixed-size sampling) moves its clipped update by at most ``2C``, so the sum moves by at most

    Delta = 2C + sqrt(P) * 2r / L                                 (:func:`quantised_sensitivity`)

whatever the rounding coins, and by joint convexity (hockey-stick divergence) and joint
quasi-convexity (Renyi divergence) the mixture over the coins is as private as the worst
coupled pair. The *central* mode (the server adds ``N(0, (zC)^2)`` to the unmasked sum) is
therefore the Gaussian mechanism with noise multiplier ``zC / Delta``.

**Distributed DP** (Kairouz, Liu, Steinke 2021, "The distributed discrete Gaussian mechanism for
federated learning with secure aggregation", ICML): every sampled client rounds its clipped update
onto SecAgg+'s grid itself, ``x_int = floor(x / h + U)`` (a ``secrets``-seeded generator), adds
discrete Gaussian noise ``N_Z(0, s^2)`` per coordinate (:func:`discrete_gaussian`, Canonne, Kamath,
Steinke 2020, Algorithm 3) with

    s = z C / (h sqrt(m_min))                                     (:func:`client_noise_std`)

and hands SecAgg+ ``v h`` (:func:`client_noise_share`), a value on the grid, which SecAgg+'s
quantisation maps back to ``v + L/2`` exactly when ``r`` and ``L`` are powers of two. The server
only ever unmasks ``sum_i v_i``, which already holds the noise of the ``k`` survivors: it never
sees an un-noised sum. With ``k`` survivors the sum of their discrete Gaussians has variance
``k s^2`` (``k >= m_min``: at least the ``(zC)^2`` of the central mode; fewer: a shortfall that the
accounting charges). Proposition 14 of the paper, third bound, with ``Delta_2 = Delta / h`` and
``tau = 10 sum_{j=1}^{k-1} exp(-2 pi^2 s^2 j / (j + 1))``: the sum is ``eps^2 / 2``-concentrated DP,

    eps = Delta_2 / (sqrt(k) s) + sqrt(P) tau,

i.e. at every Renyi order exactly what a Gaussian with noise multiplier ``1 / eps`` gives
(:func:`distributed_noise_multiplier`). The relation is replace-one, so the differing client is
present (with its own noise) in both neighbouring sums and all ``k`` noises count.

**The clamp**: a value with ``|v| > L/2`` is clamped by SecAgg+, which would break the sum. Since
``|x_int| <= ceil(C / h)`` and the discrete Gaussian is sub-Gaussian (Canonne et al. 2020),
``P(|v| > L/2) <= 2 exp(-t^2 / (2 s^2))`` with ``t = L/2 - ceil(C / h)``; a round of ``k`` clients
clamps nothing except with probability ``beta <= 2 k P exp(-t^2 / (2 s^2))``
(:func:`clamp_probability`). The mechanism without clamp is ``(eps, delta)``-DP; the one run
differs from it with probability ``<= sum beta`` over the rounds, so it is
``(eps, delta + (1 + e^eps) sum beta)``-DP: that extra ``secagg-clamp-delta`` is reported beside
epsilon, and a configuration whose clamp bound is not negligible is refused.
"""

from __future__ import annotations

import math

import numpy as np

from strategies.private.accounting import DpFedAvgRound
from strategies.private.central_mechanism import CentralGaussianMechanism

PLACEMENTS: tuple[str, ...] = ("central", "distributed")
"""Where SecAgg+'s DP noise is added: by the server to the unmasked sum, or by the clients before masking."""

CLAMP_PROBABILITY_LIMIT = 1e-12
"""The largest clamp probability bound (summed over a run's rounds, relative to ``dp-delta``) a
distributed run may start with; in practice the bound is below 1e-100."""


def is_power_of_two(value: float) -> bool:
    """Whether ``value`` is ``2**e`` for an integer ``e`` (exact in binary floating point)."""
    mantissa, _ = math.frexp(float(value))
    return value > 0 and mantissa == 0.5


def quantisation_step(clipping_range: float, quantization_range: int) -> float:
    """``h = 2r / L``: SecAgg+'s grid step."""
    return 2.0 * float(clipping_range) / int(quantization_range)


def quantised_sensitivity(clip_norm: float, num_params: int, clipping_range: float, quantization_range: int) -> float:
    """``Delta = 2C + sqrt(P) 2r / L``: replace-one L2 sensitivity of SecAgg+'s quantised sum of
    updates clipped to ``C`` (the clipped difference ``2C`` plus at most one grid step per value)."""
    return 2.0 * float(clip_norm) + math.sqrt(num_params) * quantisation_step(clipping_range, quantization_range)


def client_noise_std(
    noise_multiplier: float, clip_norm: float, clipping_range: float, quantization_range: int, min_survivors: int
) -> float:
    """``s = z C / (h sqrt(m_min))``: each client's discrete Gaussian std in grid units, so that
    ``m_min`` survivors together add the variance ``(zC)^2`` of the central mode."""
    return (
        noise_multiplier
        * clip_norm
        / (quantisation_step(clipping_range, quantization_range) * math.sqrt(min_survivors))
    )


def ddg_tau(local_std: float, survivors: int) -> float:
    """``tau = 10 sum_{j=1}^{k-1} exp(-2 pi^2 s^2 j / (j + 1))`` (Kairouz et al. 2021, Prop. 14): how
    far the sum of ``k`` discrete Gaussians of std ``s`` is from one discrete Gaussian."""
    return 10.0 * sum(math.exp(-2.0 * math.pi**2 * local_std**2 * j / (j + 1)) for j in range(1, survivors))


def distributed_noise_multiplier(
    clip_norm: float,
    num_params: int,
    clipping_range: float,
    quantization_range: int,
    local_std: float,
    survivors: int,
) -> float:
    """``1 / eps`` with ``eps = Delta_2 / (sqrt(k) s) + sqrt(P) tau`` (Kairouz et al. 2021, Prop. 14):
    the Gaussian noise multiplier whose Renyi DP bounds, at every order, that of the sum of ``k``
    survivors' discrete Gaussians of std ``s`` (grid units) over updates clipped to ``C``. 0 (no
    privacy) without survivors."""
    if survivors < 1:
        return 0.0
    if local_std < 0.5:
        raise ValueError(
            f"the distributed discrete Gaussian needs a per-client std >= 1/2 grid step, got {local_std:g}"
        )
    step = quantisation_step(clipping_range, quantization_range)
    delta_2 = quantised_sensitivity(clip_norm, num_params, clipping_range, quantization_range) / step
    eps = delta_2 / (math.sqrt(survivors) * local_std) + math.sqrt(num_params) * ddg_tau(local_std, survivors)
    return 1.0 / eps


def clamp_probability(
    clip_norm: float, num_params: int, clipping_range: float, quantization_range: int, local_std: float, clients: int
) -> float:
    """``beta = 2 k P exp(-t^2 / (2 s^2))``, ``t = L/2 - ceil(C / h)``: a bound on the probability
    that any of ``k`` clients' ``P`` noised values leaves SecAgg+'s range ``[-L/2, L/2]`` (clamped);
    1 when ``t <= 0``."""
    step = quantisation_step(clipping_range, quantization_range)
    headroom = quantization_range / 2 - math.ceil(clip_norm / step)
    if headroom <= 0:
        return 1.0
    return min(1.0, 2.0 * clients * num_params * math.exp(-(headroom**2) / (2.0 * local_std**2)))


def discrete_gaussian(shape: int | tuple[int, ...], sigma: float, rng: np.random.Generator) -> np.ndarray:
    """int64 samples of the discrete Gaussian ``N_Z(0, sigma^2)`` (``P(y) ~ exp(-y^2 / (2 sigma^2))``).

    Canonne, Kamath, Steinke 2020 ("The discrete Gaussian for differential privacy", Algorithm 3),
    vectorised: propose ``Y`` from the discrete Laplace of scale ``t = floor(sigma) + 1`` (the
    difference of two geometric variables with success ``1 - e^{-1/t}``), accept with probability
    ``exp(-(|Y| - sigma^2 / t)^2 / (2 sigma^2))``; redraw the rejected ones. The acceptance tests
    use floating point, not the paper's exact arithmetic (see docs/privacy.md).
    """
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"discrete Gaussian sigma must be a finite number > 0, got {sigma}")
    t = math.floor(sigma) + 1
    success = -math.expm1(-1.0 / t)
    out = np.empty(shape, dtype=np.int64).ravel()
    todo = np.arange(out.size)
    while todo.size:
        y = rng.geometric(success, todo.size) - rng.geometric(success, todo.size)
        accept = rng.random(todo.size) < np.exp(-((np.abs(y) - sigma**2 / t) ** 2) / (2.0 * sigma**2))
        out[todo[accept]] = y[accept]
        todo = todo[~accept]
    return out.reshape(shape)


def client_noise_share(
    update: np.ndarray,
    *,
    clipping_range: float,
    quantization_range: int,
    local_std: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """``v h`` (float64) with ``v = floor(x / h + U) + N_Z(0, s^2)``: a client's clipped update ``x``
    rounded onto SecAgg+'s grid and noised with its share of the distributed discrete Gaussian.

    ``rng`` must be :func:`strategies.private.mechanisms.secure_generator`'s (tests pass a seeded
    one). Values with ``|v| > L/2`` are kept at ``+-L/2`` (what SecAgg+'s clamp would make of them;
    their probability is :func:`clamp_probability`). With ``r`` and ``L`` powers of two every value
    is a float64 that SecAgg+ quantises to exactly ``v + L/2``.
    """
    step = quantisation_step(clipping_range, quantization_range)
    x = np.asarray(update, dtype=np.float64) / step
    grid = np.floor(x + rng.random(x.shape))
    noised = grid + discrete_gaussian(x.shape, local_std, rng)
    half = quantization_range // 2
    return np.clip(noised, -half, half) * step


class SecureSumMechanism(CentralGaussianMechanism):
    """DP-FedAvg over SecAgg+'s quantised sum of ``m`` of ``N`` clients (fixed-size sampling, replace-one).

    ``placement='central'``: the server adds ``N(0, (zC/m)^2)`` to the mean (the parent's noise),
    accounted with noise multiplier ``zC / Delta`` (:func:`quantised_sensitivity`).
    ``placement='distributed'``: the clients add the noise (:func:`client_noise_share`), the server
    adds none (:meth:`noise_std` is 0) and a round with ``k`` survivors is accounted with
    :func:`distributed_noise_multiplier` of those ``k``.

    Either way a round is the spec ``DpFedAvgRound(2 z_eff, N, m, 'fixed-size')``, whose event is
    ``SampledWithoutReplacementDpEvent(N, m, GaussianDpEvent(z_eff))`` (``GaussianDpEvent(z_eff)``
    when ``m = N``): the spec's ``z`` is noise / ``C`` and replace-one halves it, so ``2 z_eff``
    makes the event's multiplier ``z_eff`` = noise / ``Delta``. Only RDP is reported for the
    distributed mode (the discrete sum is bounded in Renyi DP, not as a Gaussian's PLD).
    """

    def __init__(
        self,
        *,
        num_params: int,
        clipping_range: float,
        quantization_range: int,
        placement: str = "central",
        min_survivors: int | None = None,
        **kwargs,
    ) -> None:
        if placement not in PLACEMENTS:
            raise ValueError(f"secagg-dp must be one of {', '.join(PLACEMENTS)}; got '{placement}'")
        super().__init__(sampling="fixed-size", **kwargs)
        self.num_params = int(num_params)
        self.clipping_range = float(clipping_range)
        self.quantization_range = int(quantization_range)
        self.placement = placement
        m = int(self.clients_per_round or 0)
        self.min_survivors = int(min_survivors or m)
        self.clamp_probability_sum = 0.0
        if placement == "distributed":
            self._check_distributed(m)

    def _check_distributed(self, m: int) -> None:
        if not 1 <= self.min_survivors <= m:
            raise ValueError(f"secagg-dp-min-clients must be in [1, clients per round = {m}], got {self.min_survivors}")
        if self.noise_multiplier <= 0:
            raise ValueError(
                "secagg-dp='distributed' needs dp-noise-multiplier > 0 (the clients noise with it; "
                "calibration to dp-target-epsilon is not available for distributed noise)"
            )
        if self.adaptive is not None:
            raise ValueError("secagg-dp='distributed' needs a fixed clip norm (dp-clip-quantile=0)")
        if self.local_std() < 0.5:
            raise ValueError(
                f"secagg-dp='distributed': each client's noise would be {self.local_std():.3g} grid steps "
                "(< 1/2, where the discrete Gaussian analysis stops): raise dp-noise-multiplier or "
                "secagg-quantization-range"
            )
        rounds_bound = self.clamp_probability(m) * 100_000  # MAX_ROUNDS of the run config
        if rounds_bound > CLAMP_PROBABILITY_LIMIT * self.delta:
            raise ValueError(
                f"secagg-dp='distributed': noised values may reach SecAgg+'s clamp at +-secagg-clipping-range "
                f"(probability bound {self.clamp_probability(m):.3g} per round, limit "
                f"{CLAMP_PROBABILITY_LIMIT:g} x dp-delta / 1e5 rounds): raise secagg-clipping-range "
                f"({self.clipping_range:g}) well above dp-clip-norm plus 10 noise stds "
                f"({self.local_std() * quantisation_step(self.clipping_range, self.quantization_range):.3g})"
            )

    @property
    def sensitivity_with_quantisation(self) -> float:
        """``Delta = 2C + sqrt(P) 2r / L`` (replace-one, float units)."""
        return quantised_sensitivity(self.clip_norm, self.num_params, self.clipping_range, self.quantization_range)

    def local_std(self) -> float:
        """Each client's discrete Gaussian std ``s`` in grid units (:func:`client_noise_std`)."""
        return client_noise_std(
            self.noise_multiplier, self.clip_norm, self.clipping_range, self.quantization_range, self.min_survivors
        )

    def clamp_probability(self, clients: int) -> float:
        """:func:`clamp_probability` of one distributed round of ``clients`` survivors."""
        return clamp_probability(
            self.clip_norm, self.num_params, self.clipping_range, self.quantization_range, self.local_std(), clients
        )

    def effective_noise_multiplier(self, survivors: int | None = None) -> float:
        """``z_eff`` = noise in the released sum / ``Delta``: ``zC / Delta`` (central), or
        :func:`distributed_noise_multiplier` of ``survivors`` (default ``m_min``, the planned round)."""
        if self.placement == "central":
            return self.noise_multiplier * self.clip_norm / self.sensitivity_with_quantisation
        k = self.min_survivors if survivors is None else int(survivors)
        return distributed_noise_multiplier(
            self.clip_norm, self.num_params, self.clipping_range, self.quantization_range, self.local_std(), k
        )

    def round_spec(self, connected: int | None = None, survivors: int | None = None) -> DpFedAvgRound:
        """``DpFedAvgRound(2 z_eff, N, m, 'fixed-size')`` for ``N = connected`` nodes and (distributed)
        ``survivors`` noise shares in the sum (default ``m_min``: the budget check's plan)."""
        population = max(int(connected or self.num_clients), 1)
        m = min(int(self.clients_per_round or 0), population)
        return DpFedAvgRound(2.0 * self.effective_noise_multiplier(survivors), population, m, "fixed-size")

    def noise_std(self) -> float:
        """The server's noise std on the mean: ``zC / m`` (central); 0 (distributed: the clients noise)."""
        return 0.0 if self.placement == "distributed" else super().noise_std()

    def account_survivors(self, survivors: int) -> None:
        """Add a distributed round's clamp probability bound for ``survivors`` clients."""
        if self.placement == "distributed":
            self.clamp_probability_sum += self.clamp_probability(survivors)

    def epsilons(self) -> dict[str, float]:
        """The parent's epsilons; RDP only in the distributed mode."""
        if self.placement == "central":
            return super().epsilons()
        rdp = self.accountant.epsilon(self.delta, "rdp")
        return {"epsilon-rdp": rdp, "epsilon": rdp}

    def metrics(self) -> dict[str, float]:
        """The parent's metrics, the sensitivity ``Delta`` and (distributed) ``secagg-clamp-delta`` =
        ``(1 + e^eps) sum beta``, the delta to add to ``delta`` for the clamp."""
        out = {**super().metrics(), "secagg-sensitivity": self.sensitivity_with_quantisation}
        if self.placement == "distributed":
            eps = out["epsilon"]
            out["secagg-clamp-delta"] = (1.0 + math.exp(min(eps, 700.0))) * self.clamp_probability_sum
        return out

    def state_dict(self) -> dict:
        """The parent's state and the clamp probability bound so far."""
        return {**super().state_dict(), "secagg-clamp-probability": self.clamp_probability_sum}

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        self.clamp_probability_sum = float(state.get("secagg-clamp-probability", 0.0))
