"""Simulated Byzantine clients, for robustness experiments (pure NumPy).

Update-level attacks share one signature::

    attack(honest_update, *, rng, honest_updates, **params) -> np.ndarray

``honest_update`` is the attacker's own honestly computed update (flat float32 vector, client
weights minus global weights); ``honest_updates`` is a K_h x P matrix of the honest clients'
updates for omniscient attacks (ALIE, IPM), ``None`` otherwise. The result is the flat float32
update the attacker sends instead. Inputs are never modified.

Besides those, :func:`flip_labels` poisons a client's training data, :func:`wrong_shapes` and
:func:`float64_arrays` corrupt the list of arrays a client sends, and :func:`negative_examples`
forges the example count it reports. :data:`ATTACKS` names them all (the names the run config accepts are
:data:`fl_app.config.choices.ATTACK_NAMES`; a test keeps the two equal).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, Literal

import numpy as np


def _check_number(key: str, value: Any, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        raise ValueError(f"{key} must be a number, got {value!r}")
    if not math.isfinite(value) or (positive and value <= 0):
        kind = "a positive" if positive else "a finite"
        raise ValueError(f"{key} must be {kind} number, got {value!r}")
    return float(value)


def _flat(update: np.ndarray) -> np.ndarray:
    vector = np.asarray(update, dtype=np.float32)
    if vector.ndim != 1:
        raise ValueError(f"honest_update must be a flat vector, got shape {vector.shape}")
    return vector


def _honest_matrix(honest_updates: np.ndarray | None, num_params: int, attack: str) -> np.ndarray:
    if honest_updates is None:
        raise ValueError(f"the {attack} attack is omniscient: it needs honest_updates, got None")
    matrix = np.asarray(honest_updates, dtype=np.float32)
    if matrix.ndim != 2 or matrix.shape[0] < 1 or matrix.shape[1] != num_params:
        raise ValueError(f"honest_updates must be a K_h x {num_params} matrix with K_h >= 1, got shape {matrix.shape}")
    return matrix


def sign_flip(
    honest_update: np.ndarray,
    *,
    rng: np.random.Generator,
    honest_updates: np.ndarray | None = None,
    scale: float = 1.0,
) -> np.ndarray:
    """Sign flipping: send ``-scale * update`` (e.g. Allen-Zhu et al., 2021; Karimireddy et al.,
    2021 use it as a baseline attack)."""
    scale = _check_number("scale", scale)
    return _flat(honest_update) * np.float32(-scale)


def gaussian_noise(
    honest_update: np.ndarray,
    *,
    rng: np.random.Generator,
    honest_updates: np.ndarray | None = None,
    sigma: float = 1.0,
) -> np.ndarray:
    """Gaussian attack: replace the update by pure noise ``N(0, sigma^2 I)`` (Blanchard et al.,
    2017, "Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent")."""
    sigma = _check_number("sigma", sigma, positive=True)
    size = _flat(honest_update).shape[0]
    return np.asarray(rng.normal(0.0, sigma, size), dtype=np.float32)


def scaling(
    honest_update: np.ndarray,
    *,
    rng: np.random.Generator,
    honest_updates: np.ndarray | None = None,
    factor: float = 10.0,
) -> np.ndarray:
    """Model replacement by boosting: send ``factor * update`` (Bagdasaryan et al., 2020, "How
    To Backdoor Federated Learning"; the paper takes ``factor = n / eta`` so that the attacker's
    model replaces the averaged global model)."""
    factor = _check_number("factor", factor)
    return _flat(honest_update) * np.float32(factor)


def alie_z(num_clients: int, num_attackers: int) -> float:
    """ALIE's z for n clients of which f are attackers (Baruch et al., 2019, Sec. 3).

    ``s = floor(n/2 + 1) - f`` honest clients must be won over, and z is the largest value such
    that ``s`` of them sit farther than z standard deviations from the mean:
    ``z = Phi^-1((n - s) / n)`` with Phi the standard normal CDF.
    """
    if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)):
        raise ValueError(f"num_clients must be an integer, got {num_clients!r}")
    if isinstance(num_attackers, bool) or not isinstance(num_attackers, (int, np.integer)):
        raise ValueError(f"num_attackers must be an integer, got {num_attackers!r}")
    supporters = math.floor(num_clients / 2 + 1) - num_attackers
    if not (1 <= num_attackers < num_clients and supporters >= 1):
        raise ValueError(
            "ALIE needs 1 <= num_attackers < num_clients and num_attackers < "
            f"floor(num_clients/2 + 1); got num_clients={num_clients}, "
            f"num_attackers={num_attackers}"
        )
    return NormalDist().inv_cdf((num_clients - supporters) / num_clients)


def alie(
    honest_update: np.ndarray,
    *,
    rng: np.random.Generator,
    honest_updates: np.ndarray | None,
    num_clients: int | None = None,
    num_attackers: int | None = None,
    z: float | None = None,
) -> np.ndarray:
    """ "A Little Is Enough" (Baruch et al., 2019): ``mu - z * sigma`` per coordinate.

    ``mu`` and ``sigma`` are the coordinate-wise mean and (population) standard deviation of the
    honest updates; ``z`` is given, or computed by :func:`alie_z` from ``num_clients`` (n) and
    ``num_attackers`` (f). Small enough to pass distance- and median-based defences, the shift
    accumulates over rounds.
    """
    size = _flat(honest_update).shape[0]
    honest = _honest_matrix(honest_updates, size, "alie")
    if z is None:
        if num_clients is None or num_attackers is None:
            raise ValueError("alie needs z, or num_clients and num_attackers to compute it")
        z = alie_z(num_clients, num_attackers)
    z = _check_number("z", z)
    mean = honest.mean(axis=0, dtype=np.float64)
    std = honest.std(axis=0, dtype=np.float64)
    return (mean - z * std).astype(np.float32)


def ipm(
    honest_update: np.ndarray,
    *,
    rng: np.random.Generator,
    honest_updates: np.ndarray | None,
    epsilon: float = 0.1,
) -> np.ndarray:
    """Inner-product manipulation (Xie et al., 2019, "Fall of Empires: Breaking Byzantine-tolerant
    SGD by Inner Product Manipulation"): send ``-epsilon * mean(honest updates)``, so that the
    aggregate's inner product with the true mean becomes negative (small epsilon fools median
    and Krum, large epsilon the mean)."""
    epsilon = _check_number("epsilon", epsilon, positive=True)
    size = _flat(honest_update).shape[0]
    honest = _honest_matrix(honest_updates, size, "ipm")
    return (-epsilon * honest.mean(axis=0, dtype=np.float64)).astype(np.float32)


def nan_update(
    honest_update: np.ndarray,
    *,
    rng: np.random.Generator,
    honest_updates: np.ndarray | None = None,
) -> np.ndarray:
    """Faulty client: an update of NaNs (what a diverged or corrupted client sends)."""
    return np.full(_flat(honest_update).shape[0], np.nan, dtype=np.float32)


def flip_labels(y: np.ndarray, num_classes: int) -> np.ndarray:
    """Label flipping (data poisoning, e.g. Tolpegin et al., 2020, "Data Poisoning Attacks
    Against Federated Learning Systems"): ``y -> num_classes - 1 - y``."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes}")
    labels = np.asarray(y)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes - 1}], got range [{labels.min()}, {labels.max()}]")
    return (num_classes - 1 - labels).astype(labels.dtype)


def wrong_shapes(arrays: list[np.ndarray]) -> list[np.ndarray]:
    """Shape-corrupting fault: a reply whose arrays do not match the model.

    Drops the last array and reshapes the first one (flattened, or to one row when it is
    already flat), so both the number of arrays and a shape differ from the model's.
    """
    if not arrays:
        raise ValueError("wrong_shapes needs at least one array")
    first = np.asarray(arrays[0])
    reshaped = first.reshape(1, -1) if first.ndim <= 1 else first.reshape(-1)
    return [reshaped.copy(), *(np.array(array, copy=True) for array in arrays[1:-1])]


def float64_arrays(arrays: list[np.ndarray]) -> list[np.ndarray]:
    """Dtype fault: the client's arrays sent as float64 (what a client built with another
    framework default or a careless cast sends): right names and shapes, twice the bytes, and a
    dtype no float32 model has."""
    return [np.asarray(array, dtype=np.float64) for array in arrays]


NEGATIVE_EXAMPLES = -5


def negative_examples(num_examples: int) -> int:
    """Forged weight: report ``num-examples = -5`` whatever the client trained on. FedAvg weighs
    by the reported count, so a negative one subtracts the client's model from the average (or,
    with a total near zero, blows it up)."""
    return NEGATIVE_EXAMPLES


AttackLevel = Literal["data", "update", "arrays", "examples"]


@dataclass(frozen=True)
class Attack:
    """A registered attack.

    ``level`` says where it applies: ``"data"`` to the training labels (:func:`flip_labels`),
    ``"update"`` to the flat update (the common signature above), ``"arrays"`` to the list of
    arrays sent (:func:`wrong_shapes`, :func:`float64_arrays`), ``"examples"`` to the
    ``num-examples`` reported (:func:`negative_examples`). ``omniscient`` update attacks need
    ``honest_updates``.
    """

    fn: Callable[..., Any]
    level: AttackLevel
    omniscient: bool = False


ATTACKS: dict[str, Attack] = {
    "label-flip": Attack(flip_labels, "data"),
    "sign-flip": Attack(sign_flip, "update"),
    "gaussian": Attack(gaussian_noise, "update"),
    "scaling": Attack(scaling, "update"),
    "alie": Attack(alie, "update", omniscient=True),
    "ipm": Attack(ipm, "update", omniscient=True),
    "nan": Attack(nan_update, "update"),
    "wrong-shapes": Attack(wrong_shapes, "arrays"),
    "float64": Attack(float64_arrays, "arrays"),
    "negative-examples": Attack(negative_examples, "examples"),
}
