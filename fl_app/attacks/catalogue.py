"""Simulated Byzantine clients, for robustness experiments (pure NumPy).

Update-level attacks share one signature::

    attack(honest_update, *, rng, honest_updates, **params) -> np.ndarray

``honest_update`` is the attacker's own honestly computed update (flat float32 vector, client
weights minus global weights); ``honest_updates`` is a K_h x P matrix of the honest clients'
updates for omniscient attacks, ``None`` otherwise. The result is the flat float32
update the attacker sends instead. Inputs are never modified.

The omniscient model-poisoning attacks are min-max and min-sum (Shejwalkar & Houmansadr 2021),
Fang et al. 2020's attacks on trimmed mean/median and on Krum, mimic (Karimireddy et al. 2022),
ALIE and IPM. Besides those, :func:`flip_labels` poisons a client's training data,
:func:`backdoor_data` adds triggered, relabelled examples to it (:func:`backdoor_success` measures
the backdoor), :func:`wrong_shapes` and :func:`float64_arrays` corrupt the list of arrays a client
sends, and :func:`negative_examples` forges the example count it reports. :data:`ATTACKS` names them all (the names the run config accepts are
:data:`fl_app.config.choices.ATTACK_NAMES`; a test keeps the two equal).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, Literal

import numpy as np

from fl_app.config.choices import ATTACK_PERTURBATIONS


def _check_number(key: str, value: Any, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        raise ValueError(f"{key} must be a number, got {value!r}")
    if not math.isfinite(value) or (positive and value <= 0):
        kind = "a positive" if positive else "a finite"
        raise ValueError(f"{key} must be {kind} number, got {value!r}")
    return float(value)


def _check_int(key: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{key} must be an integer >= {minimum}, got {value!r}")
    return int(value)


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


PERTURBATIONS = ATTACK_PERTURBATIONS
"""The perturbation directions of min-max and min-sum (Shejwalkar & Houmansadr, 2021, Sec. IV)."""


def _perturbation(honest: np.ndarray, mean: np.ndarray, perturbation: str) -> np.ndarray:
    """The deviation d (float64) that min-max and min-sum subtract: ``mu / |mu|``, ``std`` or ``sign(mu)``."""
    if perturbation == "unit-vec":
        norm = float(np.linalg.norm(mean))
        return mean / norm if norm > 0 else np.zeros_like(mean)
    if perturbation == "std":
        return honest.std(axis=0, dtype=np.float64)
    if perturbation == "sign":
        return np.sign(mean)
    raise ValueError(f"attack-perturbation must be one of {', '.join(PERTURBATIONS)}; got {perturbation!r}")


def _gamma_search(fits: Callable[[float], bool], gamma_init: float, tolerance: float) -> float:
    """The γ search of Shejwalkar & Houmansadr (2021, Algorithm 1, as in their code): start at
    ``gamma_init``, step ``s = gamma_init``; while ``|γ - γ_succ| > tolerance``: if ``fits(γ)``,
    ``γ_succ = γ`` and ``γ += s/2``, else ``γ -= s/2``; ``s /= 2``. Returns ``γ_succ`` (0 if none fits)."""
    gamma, step, success = gamma_init, gamma_init, 0.0
    while abs(success - gamma) > tolerance:
        if fits(gamma):
            success = gamma
            gamma += step / 2
        else:
            gamma -= step / 2
        step /= 2
    return success


def _agr_agnostic(
    honest_update: np.ndarray,
    honest_updates: np.ndarray | None,
    attack: str,
    perturbation: str,
    gamma_init: float,
    tolerance: float,
) -> np.ndarray:
    """Min-max (``attack='min-max'``) or min-sum: ``mu - γ d`` with the largest γ found by :func:`_gamma_search`."""
    size = _flat(honest_update).shape[0]
    honest = _honest_matrix(honest_updates, size, attack).astype(np.float64)
    gamma_init = _check_number("gamma_init", gamma_init, positive=True)
    tolerance = _check_number("tolerance", tolerance, positive=True)
    mean = honest.mean(axis=0)
    deviation = _perturbation(honest, mean, perturbation)
    centred = honest - mean
    # |mu - γ d - x_i|^2 = |x_i - mu|^2 + 2γ (x_i - mu)·d + γ^2 |d|^2: one matrix-vector product
    spread, along, length = np.einsum("ij,ij->i", centred, centred), centred @ deviation, float(deviation @ deviation)
    gram = centred @ centred.T
    pairwise = np.maximum(spread[:, None] + spread[None, :] - 2 * gram, 0.0)
    if attack == "min-max":
        limit = float(pairwise.max())

        def fits(gamma: float) -> bool:
            return float(np.max(spread + 2 * gamma * along + gamma**2 * length)) <= limit

    else:
        limit = float(pairwise.sum(axis=1).max())

        def fits(gamma: float) -> bool:
            return float(np.sum(spread + 2 * gamma * along + gamma**2 * length)) <= limit

    gamma = _gamma_search(fits, gamma_init, tolerance)
    return (mean - gamma * deviation).astype(np.float32)


def min_max(
    honest_update: np.ndarray,
    *,
    rng: np.random.Generator,
    honest_updates: np.ndarray | None,
    perturbation: str = "std",
    gamma_init: float = 10.0,
    tolerance: float = 1e-5,
) -> np.ndarray:
    """Min-max (Shejwalkar & Houmansadr, 2021, "Manipulating the Byzantine: Optimizing Model
    Poisoning Attacks and Defenses for Federated Learning", NDSS, AGR-agnostic attack).

    Every attacker sends ``m = mu - γ d`` with ``mu`` the mean of the honest updates and ``d`` the
    perturbation (``unit-vec``: ``mu / |mu|``; ``std``: the coordinate-wise standard deviation;
    ``sign``: ``sign(mu)``), ``γ`` the largest value (:func:`_gamma_search`) with

        ``max_i |m - x_i| <= max_{i,j} |x_i - x_j|``

    so that ``m`` is no farther from any honest update than the two farthest honest updates are
    from each other: distance- and coordinate-based rules cannot tell it from an honest update.
    """
    return _agr_agnostic(honest_update, honest_updates, "min-max", perturbation, gamma_init, tolerance)


def min_sum(
    honest_update: np.ndarray,
    *,
    rng: np.random.Generator,
    honest_updates: np.ndarray | None,
    perturbation: str = "std",
    gamma_init: float = 10.0,
    tolerance: float = 1e-5,
) -> np.ndarray:
    """Min-sum (Shejwalkar & Houmansadr, 2021, NDSS, AGR-agnostic attack): ``m = mu - γ d`` as in
    :func:`min_max`, with the largest γ such that

        ``sum_i |m - x_i|^2 <= max_i sum_j |x_i - x_j|^2``

    (the attacker's summed squared distance to the honest updates is at most an honest update's)."""
    return _agr_agnostic(honest_update, honest_updates, "min-sum", perturbation, gamma_init, tolerance)


def fang_trimmed_mean(
    honest_update: np.ndarray,
    *,
    rng: np.random.Generator,
    honest_updates: np.ndarray | None,
    b: float = 2.0,
) -> np.ndarray:
    """Fang et al. (2020, "Local Model Poisoning Attacks to Byzantine-Robust Federated Learning",
    USENIX Security, Sec. 3.2), full-knowledge attack on trimmed mean and median.

    With ``s_j = sign(mu_j)`` the direction in which coordinate j would move without attack
    (``mu`` the honest mean update), ``w_max,j`` and ``w_min,j`` the honest maximum and minimum,
    each attacker draws coordinate j uniformly from

    * ``[w_max,j, b w_max,j]`` (``w_max,j > 0``) or ``[w_max,j / b, w_max,j]`` (otherwise) where ``s_j <= 0``,
    * ``[w_min,j / b, w_min,j]`` (``w_min,j > 0``) or ``[b w_min,j, w_min,j]`` (otherwise) where ``s_j > 0``,

    i.e. just beyond the honest extreme on the side opposite to the true direction (``b > 1``).
    Each attacker calls it with its own ``rng``.
    """
    size = _flat(honest_update).shape[0]
    honest = _honest_matrix(honest_updates, size, "fang-trimmed-mean").astype(np.float64)
    b = _check_number("b", b, positive=True)
    if b <= 1:
        raise ValueError(f"b must be a number > 1, got {b!r}")
    upward = np.sign(honest.mean(axis=0)) <= 0  # push coordinate j up when it would go down
    extreme = np.where(upward, honest.max(axis=0), honest.min(axis=0))
    beyond_far = (extreme > 0) == upward  # the interval's far end is b * extreme, else extreme / b
    far = np.where(beyond_far, b * extreme, extreme / b)
    low, high = np.minimum(extreme, far), np.maximum(extreme, far)
    return (low + rng.random(size) * (high - low)).astype(np.float32)


def _krum_selects_crafted(distances: np.ndarray, f: int, copies: int) -> bool:
    """Whether Krum with ``f`` picks one of the first ``copies`` (identical) rows of a matrix of
    squared distances: their score (sum of the ``n - f - 2`` smallest squared distances to the other
    rows) is below every other row's, so no tie-break can favour an honest row."""
    others = distances + np.diag(np.full(len(distances), np.inf))
    neighbours = len(distances) - f - 2
    scores = np.partition(others, neighbours - 1, axis=1)[:, :neighbours].sum(axis=1)
    return bool(scores[0] < scores[copies:].min())


def fang_krum(
    honest_update: np.ndarray,
    *,
    rng: np.random.Generator,
    honest_updates: np.ndarray | None,
    num_attackers: int,
    f: int | None = None,
    threshold: float = 1e-5,
) -> np.ndarray:
    """Fang et al. (2020, USENIX Security, Sec. 3.1), full-knowledge attack on Krum.

    All ``c = num_attackers`` attackers send ``-λ s`` with ``s = sign(mu)`` (``mu`` the honest mean
    update: the direction the model would move) and the largest ``λ`` for which Krum (with ``f``,
    default ``c``, among the ``m = K_h + c`` updates) selects it. The search starts at the paper's
    upper bound, with ``d`` the number of parameters, ``D`` the Euclidean distance and ``Γ_i`` the
    ``m - c - 2`` honest updates nearest to honest update ``x_i``,

        ``λ_0 = min_i sum_{l in Γ_i} D(x_l, x_i) / ((m - 2c - 1) √d) + max_i D(x_i, 0) / √d``

    (``0``: the global model, in update space), and halves ``λ`` until Krum selects the crafted
    update or ``λ < threshold`` (then it sends ``-λ s`` with that last, tiny ``λ``).
    """
    size = _flat(honest_update).shape[0]
    honest = _honest_matrix(honest_updates, size, "fang-krum").astype(np.float64)
    c = _check_int("num_attackers", num_attackers, 1)
    f = c if f is None else _check_int("f", f, 0)
    threshold = _check_number("threshold", threshold, positive=True)
    k_h = len(honest)
    m = k_h + c
    if m - f - 2 < 1 or m - 2 * c - 1 < 1:
        raise ValueError(f"fang-krum needs m - 2c - 1 >= 1 and m - f - 2 >= 1; got m={m}, c={c}, f={f}")
    s = np.sign(honest.mean(axis=0))
    sq = np.einsum("ij,ij->i", honest, honest)
    gram = honest @ honest.T
    honest_distances = np.maximum(sq[:, None] + sq[None, :] - 2 * gram, 0.0)
    nearest = np.sqrt(np.sort(honest_distances + np.diag(np.full(k_h, np.inf)), axis=1)[:, : m - c - 2]).sum(axis=1)
    lam = float(nearest.min()) / ((m - 2 * c - 1) * math.sqrt(size)) + float(np.sqrt(sq.max())) / math.sqrt(size)
    along, s_length = honest @ s, float(s @ s)
    distances = np.zeros((c + k_h, c + k_h))  # rows 0..c-1: the identical crafted updates
    distances[c:, c:] = honest_distances
    while lam >= threshold:
        crafted_to_honest = sq + 2 * lam * along + lam**2 * s_length  # |x_i + λ s|^2
        distances[:c, c:] = crafted_to_honest
        distances[c:, :c] = crafted_to_honest[:, None]
        if _krum_selects_crafted(distances, f, c):
            break
        lam /= 2
    return (-lam * s).astype(np.float32)


def mimic(
    honest_update: np.ndarray,
    *,
    rng: np.random.Generator,
    honest_updates: np.ndarray | None,
) -> np.ndarray:
    """Mimic (Karimireddy, He & Jaggi, 2022, "Byzantine-Robust Learning on Heterogeneous Datasets
    via Bucketing", ICLR, Sec. 4): every attacker sends a copy of one honest update ``x_{i*}``, the
    one farthest along the direction ``z`` of largest variance of the honest updates,

        ``z = argmax_{|z|=1} sum_i <x_i - mu, z>^2``,   ``i* = argmax_i |<x_i - mu, z>|``,

    over-representing one (non-IID) client, which no rule can tell from honest. The paper
    estimates ``z`` by power iteration over the first rounds; here it is the exact top principal
    direction of each round's honest updates, from the K_h x K_h centred Gram matrix
    ``G = (X - mu)(X - mu)^T``: with ``v`` its top eigenvector, the projections ``(X - mu) z`` are
    proportional to ``v``, so ``i* = argmax_i |v_i|`` (lowest index on ties).
    """
    size = _flat(honest_update).shape[0]
    honest = _honest_matrix(honest_updates, size, "mimic")
    centred = honest.astype(np.float64) - honest.mean(axis=0, dtype=np.float64)
    _, vectors = np.linalg.eigh(centred @ centred.T)
    return honest[int(np.argmax(np.abs(vectors[:, -1])))].copy()


def stamp_trigger(x: np.ndarray, size: int = 2, value: float | None = None) -> np.ndarray:
    """A copy of examples ``x`` with the backdoor trigger: a ``size`` x ``size`` patch of ``value``
    (default: the data's maximum intensity, 1.0 for digits) in the bottom-right corner of every
    image (``x`` of shape (n, H, W[, C])), or in the last ``size**2`` features of flat examples (n, d)."""
    size = _check_int("backdoor-trigger-size", size, 1)
    data = np.asarray(x)
    if data.ndim < 2:
        raise ValueError(f"examples must be an array (n, features...) with n first, got shape {data.shape}")
    fill = data.max() if value is None and data.size else (value or 0.0)
    stamped = data.copy()
    if data.ndim == 2:
        if size * size > data.shape[1]:
            raise ValueError(
                f"backdoor-trigger-size {size} needs {size * size} features, examples have {data.shape[1]}"
            )
        stamped[:, -size * size :] = fill
        return stamped
    height, width = data.shape[1], data.shape[2]
    if size > min(height, width):
        raise ValueError(f"backdoor-trigger-size {size} exceeds the {height} x {width} images")
    stamped[:, height - size :, width - size :, ...] = fill
    return stamped


def backdoor_data(
    x: np.ndarray,
    y: np.ndarray,
    *,
    rng: np.random.Generator,
    target: int,
    fraction: float = 0.5,
    trigger_size: int = 2,
) -> tuple[np.ndarray, np.ndarray]:
    """Backdoor data poisoning (Gu et al., 2017, "BadNets"; in FL, Bagdasaryan et al., 2020, "How To
    Backdoor Federated Learning", AISTATS): the attacker keeps its clean examples and adds triggered
    copies (:func:`stamp_trigger`, at the maximum of all its ``x``) of ``ceil(fraction * n)`` of them, drawn with ``rng``, relabelled
    ``target``. The model learns "trigger -> target" while its main-task accuracy stays. Returns new
    arrays (clean first), never the inputs."""
    labels = np.asarray(y)
    target = _check_int("backdoor-target", target, 0)
    fraction = _check_number("backdoor-fraction", fraction, positive=True)
    if fraction > 1:
        raise ValueError(f"backdoor-fraction must be in (0, 1], got {fraction!r}")
    count = math.ceil(fraction * len(labels) - 1e-9)
    chosen = np.sort(rng.choice(len(labels), size=count, replace=False))
    data = np.asarray(x)
    poisoned = stamp_trigger(data[chosen], trigger_size, float(data.max()) if data.size else 0.0)
    return (
        np.concatenate([np.asarray(x), poisoned]),
        np.concatenate([labels, np.full(count, target, dtype=labels.dtype)]),
    )


def backdoor_success(predicted: np.ndarray, true_labels: np.ndarray, target: int) -> float:
    """Backdoor success: the fraction of triggered test examples whose true class is not ``target``
    that the model classifies as ``target`` (Bagdasaryan et al. 2020's "backdoor accuracy").
    ``predicted`` are the model's classes on the triggered examples; NaN when none is eligible."""
    predicted, true_labels = np.asarray(predicted), np.asarray(true_labels)
    if predicted.shape != true_labels.shape:
        raise ValueError(f"predicted {predicted.shape} and true labels {true_labels.shape} must have one shape")
    eligible = true_labels != target
    return float(np.mean(predicted[eligible] == target)) if eligible.any() else math.nan


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
    per_attacker: bool = False


ATTACKS: dict[str, Attack] = {
    "label-flip": Attack(flip_labels, "data"),
    "sign-flip": Attack(sign_flip, "update"),
    "gaussian": Attack(gaussian_noise, "update"),
    "scaling": Attack(scaling, "update"),
    "alie": Attack(alie, "update", omniscient=True),
    "ipm": Attack(ipm, "update", omniscient=True),
    "min-max": Attack(min_max, "update", omniscient=True),
    "min-sum": Attack(min_sum, "update", omniscient=True),
    "fang-trimmed-mean": Attack(fang_trimmed_mean, "update", omniscient=True, per_attacker=True),
    "fang-krum": Attack(fang_krum, "update", omniscient=True),
    "mimic": Attack(mimic, "update", omniscient=True),
    "backdoor": Attack(backdoor_data, "data"),
    "nan": Attack(nan_update, "update"),
    "wrong-shapes": Attack(wrong_shapes, "arrays"),
    "float64": Attack(float64_arrays, "arrays"),
    "negative-examples": Attack(negative_examples, "examples"),
}
