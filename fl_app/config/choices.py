"""The names the run config accepts for its choice keys, and how lists of them are parsed.

The registries that implement them (Keras models in :mod:`fl_app.task.models`, attacks in
:mod:`fl_app.attacks.catalogue`, export formats in :mod:`fl_app.delivery.export`) live on the side
that runs them; a test keeps their keys equal to these names, so that the config can be checked
without importing TensorFlow or the attack code.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

DATASETS = ("digits", "synthetic", "local-file", "huggingface")
PARTITIONERS = ("iid", "dirichlet", "shards")
OPTIMIZERS = ("sgd", "adam")
MODEL_NAMES = ("logreg", "mlp", "cnn")
TASKS = ("multiclass", "binary", "multilabel", "regression")
TASK_CHOICES = ("auto", *TASKS)
ATTACK_NAMES = (
    "label-flip",
    "sign-flip",
    "gaussian",
    "scaling",
    "nan",
    "wrong-shapes",
    "float64",
    "negative-examples",
    "alie",
    "ipm",
    "min-max",
    "min-sum",
    "fang-trimmed-mean",
    "fang-krum",
    "mimic",
    "backdoor",
)
REJECTED_ATTACKS = ("nan", "wrong-shapes", "float64", "negative-examples")
"""Attacks whose replies the server's validation rejects: they never reach the aggregation rule."""
ATTACK_PERTURBATIONS = ("unit-vec", "std", "sign")
"""The perturbation directions of min-max and min-sum (Shejwalkar & Houmansadr, 2021, Sec. IV)."""
FLOWER_MEANS = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad")
"""Flower's strategies whose aggregate is a weighted mean of the updates: no Byzantine client is tolerated."""
EXPORT_FORMATS = ("keras", "savedmodel", "tflite")
TFLITE_TYPES = ("float32", "int8")


def parse_choices(key: str, text: str, allowed: tuple[str, ...], *, all_word: str | None = "all") -> tuple[str, ...]:
    """``"a,b"`` → ``("a", "b")`` in ``allowed``'s order; ``"all"`` → every choice; ``""`` → none.

    Raises ``ValueError`` naming ``key``, the bad value and what is allowed.
    """
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if all_word is not None and parts == [all_word]:
        return allowed
    bad = [p for p in parts if p not in allowed]
    if bad:
        extra = f", or '{all_word}'" if all_word else ""
        raise ValueError(
            f"{key} must be a comma-separated list of {', '.join(allowed)}{extra} (or empty); "
            f"got '{text}' ('{bad[0]}' is unknown)"
        )
    return tuple(a for a in allowed if a in parts)


def select_attackers(
    num_partitions: int,
    fraction: float | None = None,
    ids: Iterable[int] | None = None,
    seed: int = 0,
) -> frozenset[int]:
    """The partition ids of the Byzantine clients.

    Either ``floor(fraction * num_partitions)`` partitions drawn without replacement by a
    generator seeded with ``seed`` (the same seed always gives the same set), or the explicit
    ``ids``; neither means no attackers. Errors name the run-config keys ``attack-fraction`` and
    ``attack-ids``.
    """
    if isinstance(num_partitions, bool) or not isinstance(num_partitions, (int, np.integer)):
        raise ValueError(f"num-partitions must be an integer >= 1, got {num_partitions!r}")
    if num_partitions < 1:
        raise ValueError(f"num-partitions must be an integer >= 1, got {num_partitions}")
    if fraction is not None and ids is not None:
        raise ValueError("set either attack-fraction or attack-ids, not both")
    if ids is not None:
        listed = list(ids)
        bad: list[object] = [i for i in listed if isinstance(i, bool) or not isinstance(i, (int, np.integer))]
        bad += [i for i in listed if i not in bad and not 0 <= i < num_partitions]
        if bad:
            raise ValueError(f"attack-ids must be partition ids in [0, {num_partitions - 1}], got {bad}")
        if len(set(listed)) != len(listed):
            raise ValueError(f"attack-ids must not repeat an id, got {listed}")
        return frozenset(int(i) for i in listed)
    if fraction is None:
        return frozenset()
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.number)):
        raise ValueError(f"attack-fraction must be a number in [0, 1], got {fraction!r}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"attack-fraction must be in [0, 1], got {fraction!r}")
    count = math.floor(fraction * num_partitions + 1e-9)
    drawn = np.random.default_rng(seed).choice(num_partitions, size=count, replace=False)
    return frozenset(int(i) for i in drawn)
