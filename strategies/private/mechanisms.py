"""Differential-privacy mechanisms over the K x P update matrix (pure NumPy).

Rows are clients, columns are parameters, dtype float32. Every function here draws its noise from
a :class:`numpy.random.Generator` passed in by the caller; production code gets that generator
from :func:`secure_generator`, never from NumPy's global state. Clipping to an L2 norm is
:func:`strategies.core.clipping.clip_rows`.

Mechanisms:

* Central user-level DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private Recurrent
  Language Models"): clip each client's update to L2 norm ``C``, sum, divide by the *expected*
  number of clients ``m`` and add ``N(0, (z C / m)^2)`` per coordinate --
  :class:`strategies.private.central_mechanism.CentralGaussianMechanism`, built on
  :func:`gaussian_noise`.
* Adaptive clipping (Andrew et al. 2021, "Differentially Private Learning with Adaptive
  Clipping"): the clip norm follows a target quantile of the update norms, estimated from a
  noised count -- :class:`AdaptiveClipState`.
* Local DP, each client noising its own update before it leaves the device --
  :func:`local_dp_gaussian`, :func:`local_dp_laplace`.

The privacy these mechanisms give is computed in :mod:`strategies.private.accounting`.

Noise is drawn in floating point; the floating-point attacks on textbook samplers (Mironov 2012,
"On Significance of the Least Significant Bits for Differential Privacy") are out of scope here,
as they are for TF Privacy and Opacus.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from typing import Any

import numpy as np

from strategies.core.clipping import ROUNDING_MARGIN, clip_rows

FloatVector = np.ndarray


def secure_generator() -> np.random.Generator:
    """A fresh PCG64 generator seeded with 128 bits from the OS's CSPRNG (``secrets``).

    Use this for every noise draw that protects privacy: its seed cannot be guessed or replayed,
    and it shares no state with ``np.random.*``.
    """
    return np.random.Generator(np.random.PCG64(secrets.randbits(128)))


def insecure_seeded_generator(seed: int) -> np.random.Generator:
    """A PCG64 generator with a fixed seed, for reproducible tests and benchmarks only.

    Anyone who knows the seed can subtract the noise; never use it to protect real data.
    """
    return np.random.Generator(np.random.PCG64(seed))


def _check_nonnegative(name: str, value: float) -> float:
    value = float(value)
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value


def _check_positive(name: str, value: float) -> float:
    value = float(value)
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def gaussian_noise(shape: int | tuple[int, ...], std: float, rng: np.random.Generator) -> np.ndarray:
    """float32 samples of ``N(0, std^2)``; zeros when ``std == 0``."""
    std = _check_nonnegative("noise std", std)
    if std == 0.0:
        return np.zeros(shape, dtype=np.float32)
    noise = rng.standard_normal(shape, dtype=np.float32)
    noise *= np.float32(std)
    return noise


def laplace_noise(shape: int | tuple[int, ...], scale: float, rng: np.random.Generator) -> np.ndarray:
    """float32 samples of ``Laplace(0, scale)`` (density ``exp(-|x|/scale) / (2 scale)``)."""
    scale = _check_nonnegative("laplace scale", scale)
    if scale == 0.0:
        return np.zeros(shape, dtype=np.float32)
    return rng.laplace(0.0, scale, shape).astype(np.float32)


@dataclasses.dataclass
class AdaptiveClipState:
    """Clip norm that tracks a quantile of the update norms (Andrew et al. 2021, Algorithm 1).

    After each round, with ``m`` the expected number of clients and ``b_i = 1[||u_i|| <= C]``:

        S  = sum_i (b_i - 1/2) + N(0, sigma_b^2)         (the released, centred, noised count)
        b~ = S / m + 1/2                                 (noised fraction of unclipped updates)
        C  <- C * exp(-eta * (b~ - gamma))               (geometric update)

    so ``C`` grows while fewer than a fraction ``gamma`` of the updates fit under it and shrinks
    otherwise. Each client contributes ``b_i - 1/2 in {-1/2, +1/2}``, so adding or removing one
    client moves ``S`` by at most ``1/2`` (replacing one by at most 1): the count is a Gaussian
    mechanism with noise multiplier ``2 sigma_b`` under add/remove, as in TensorFlow Privacy's
    ``quantile_estimator_query.py`` (the un-centred count ``sum_i b_i`` would have sensitivity 1
    and cost four times as much RDP). ``b~`` only post-processes ``S`` (``m`` is public). The
    noised count costs privacy: the round is accounted with
    ``DpFedAvgRound(..., count_noise_multiplier=2 sigma_b)`` and the update noised with
    :func:`strategies.private.accounting.adaptive_clipping_update_noise_multiplier`. The paper
    suggests ``gamma = 0.5``, ``eta = 0.2`` and ``sigma_b = m / 20``.

    Attributes:
        clip_norm: current clip norm ``C`` (> 0); use it to clip this round, then call
            :meth:`update` with the same round's pre-clipping norms.
        target_quantile: ``gamma`` in [0, 1].
        learning_rate: ``eta`` (>= 0).
        count_noise_std: ``sigma_b`` (>= 0), std of the noise on the *count* of unclipped updates.
    """

    clip_norm: float
    target_quantile: float = 0.5
    learning_rate: float = 0.2
    count_noise_std: float = 0.0

    def __post_init__(self) -> None:
        self.clip_norm = _check_positive("clip_norm", self.clip_norm)
        self.target_quantile = float(self.target_quantile)
        if not 0.0 <= self.target_quantile <= 1.0:
            raise ValueError(f"target_quantile must be in [0, 1], got {self.target_quantile}")
        self.learning_rate = _check_nonnegative("learning_rate", self.learning_rate)
        self.count_noise_std = _check_nonnegative("count_noise_std", self.count_noise_std)

    def noised_centred_count(self, norms: np.ndarray, rng: np.random.Generator) -> float:
        """``S = sum_i (1[||u_i|| <= C] - 1/2) + N(0, sigma_b^2)`` for the current ``C``: the value
        the mechanism releases (add/remove sensitivity 1/2)."""
        norms = np.asarray(norms, dtype=np.float64).ravel()
        centred = float(np.count_nonzero(norms <= self.clip_norm)) - 0.5 * norms.size
        noise = float(rng.normal(0.0, self.count_noise_std)) if self.count_noise_std > 0 else 0.0
        return centred + noise

    def noised_unclipped_fraction(self, norms: np.ndarray, expected_clients: float, rng: np.random.Generator) -> float:
        """``b~ = S / m + 1/2`` (:meth:`noised_centred_count`), the noised fraction of updates within ``C``."""
        expected_clients = _check_positive("expected_clients", expected_clients)
        return self.noised_centred_count(norms, rng) / expected_clients + 0.5

    def update(self, norms: np.ndarray, expected_clients: float, rng: np.random.Generator) -> float:
        """Move ``C`` one geometric step toward the target quantile; returns the new ``C``."""
        fraction = self.noised_unclipped_fraction(norms, expected_clients, rng)
        self.clip_norm = self.clip_norm * math.exp(-self.learning_rate * (fraction - self.target_quantile))
        return self.clip_norm

    def state_dict(self) -> dict[str, float]:
        """JSON-able state, for checkpoints."""
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` (validated like the constructor)."""
        restored = AdaptiveClipState(**{f.name: state[f.name] for f in dataclasses.fields(self)})
        for field in dataclasses.fields(self):
            setattr(self, field.name, getattr(restored, field.name))


def local_dp_gaussian(update: FloatVector, clip_norm: float, noise_std: float, rng: np.random.Generator) -> FloatVector:
    """Local DP, Gaussian: ``clip_L2(u, C) + N(0, noise_std^2 I)``, run by the client itself.

    Neighbouring relation: any two inputs of this client (local DP), so the L2 sensitivity is
    ``2C`` and one call is the Gaussian mechanism with noise multiplier ``noise_std / (2C)``
    (see :class:`strategies.private.accounting.LocalGaussianRound`).
    """
    clipped = np.array(update, dtype=np.float32)
    if clipped.ndim != 1:
        raise ValueError(f"update must be 1-D, got shape {clipped.shape}")
    clip_rows(clipped[None, :], clip_norm)
    clipped += gaussian_noise(clipped.shape, noise_std, rng)
    return clipped


def clip_l1(vector: FloatVector, clip_norm: float) -> FloatVector:
    """Scale a 1-D vector to L1 norm at most ``C``: ``v * min(1, C / ||v||_1)`` (a copy)."""
    vector = np.asarray(vector, dtype=np.float32)
    if vector.ndim != 1:
        raise ValueError(f"vector must be 1-D, got shape {vector.shape}")
    clip_norm = _check_positive("clip_norm", clip_norm)
    norm = float(np.sum(np.abs(vector), dtype=np.float64))
    if not math.isfinite(norm):
        raise ValueError("update is not finite (NaN or Inf); cannot clip it")
    if norm <= clip_norm:
        return vector.copy()
    # shrunk by the margin of the L2 clip: the factor's and each product's float32 rounding
    # (2**-24 relative each) can then never leave the L1 norm above C
    return vector * np.float32(clip_norm / norm * ROUNDING_MARGIN)


def local_dp_laplace(update: FloatVector, clip_norm: float, epsilon: float, rng: np.random.Generator) -> FloatVector:
    """Local epsilon-DP, Laplace: ``clip_L1(u, C) + Laplace(0, 2C / epsilon)`` per coordinate.

    The Laplace mechanism is calibrated to the *L1* sensitivity, so the update is clipped in L1
    norm (an L2 clip would leave the L1 sensitivity as large as ``2C sqrt(P)``). Neighbouring
    relation: local DP protects the client's whole input, i.e. *any* two inputs ``u, u'`` (the
    replace-one relation on a one-record data set). After L1 clipping
    ``||clip(u) - clip(u')||_1 <= 2C``, so the sensitivity is ``2C`` and the scale
    ``b = 2C / epsilon`` gives pure epsilon-DP for the report. (Under add/remove of the record,
    i.e. comparing with a zero update, the sensitivity would be ``C``; that relation does not
    hide *what* a participating client sent, so it is not used here.)
    """
    epsilon = _check_positive("epsilon", epsilon)
    clipped = clip_l1(update, clip_norm)
    clipped += laplace_noise(clipped.shape, 2.0 * float(clip_norm) / epsilon, rng)
    return clipped
