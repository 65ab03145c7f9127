"""Wiring simulated Byzantine clients into a run (the attack math is in :mod:`fl_app.attacks.catalogue`).

``attack`` in the run config names an attack (or several, comma-separated: the j-th attacker in
partition-id order runs the (j mod len)-th, e.g. ``attack='nan,wrong-shapes' attack-ids='0,1'``);
``attack-fraction`` or ``attack-ids`` says which partitions are Byzantine
(:meth:`~fl_app.config.settings.Settings.attackers`). Where an attack acts:

* on the client, in the message it really sends: ``label-flip`` poisons the training labels;
  ``backdoor`` adds triggered examples relabelled ``backdoor-target`` to its training data and, in
  ``backdoor-boost-rounds``, boosts its update (model replacement);
  ``sign-flip`` (-s u), ``scaling`` (s u), ``gaussian`` (N(0, sigma^2)) and ``nan`` replace the
  update; ``wrong-shapes`` and ``float64`` corrupt the arrays; ``negative-examples`` reports
  ``num-examples = -5``. The server's validation sees them as they are.
* on the server, for the omniscient attacks ``alie``, ``ipm``, ``min-max``, ``min-sum``,
  ``fang-trimmed-mean``, ``fang-krum`` and ``mimic``, which need the honest clients' updates of the
  round (the papers assume omniscience): :class:`OmniscientAttack` is an update
  hook of :class:`~strategies.aggregation.strategy.AggregationStrategy` that rewrites the attackers' rows after
  validation, before any defence. Attackers are told apart by the ``partition-id`` that every
  client reports in its train metrics. Simulation only: in deployment nothing attacks.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fl_app.attacks.catalogue import ATTACKS, alie_z
from fl_app.config.settings import Settings
from strategies.core.update_matrix import CollectedUpdates, ModelLayout


def _update_params(settings: Settings, name: str) -> dict[str, float]:
    return {
        "sign-flip": {"scale": settings.attack_scale},
        "scaling": {"factor": settings.attack_scale},
        "gaussian": {"sigma": settings.attack_noise_std},
    }.get(name, {})


def _rng(settings: Settings, partition_id: int, server_round: int) -> np.random.Generator:
    return np.random.default_rng([settings.seed, partition_id + 1, server_round])  # server: -1


def poison_data(
    settings: Settings, partition_id: int, x: np.ndarray, y: np.ndarray, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """The training examples and labels partition ``partition_id`` trains on: its own, with flipped
    labels for ``label-flip`` attackers, with triggered copies relabelled ``backdoor-target`` for
    ``backdoor`` attackers."""
    name = settings.attack_of(partition_id)
    if name in ("label-flip", "backdoor") and (y.ndim != 1 or not np.issubdtype(y.dtype, np.integer)):
        raise ValueError(
            f"attack '{name}' relabels integer class labels; this data set's targets have dtype {y.dtype} "
            f"and shape {y.shape[1:]} per example (one-hot, multi-label or regression): use an update attack"
        )
    if name == "label-flip":
        return x, ATTACKS["label-flip"].fn(y, num_classes)
    if name == "backdoor":
        if settings.backdoor_target >= num_classes:
            raise ValueError(
                f"backdoor-target must be a class in [0, {num_classes - 1}], got {settings.backdoor_target}"
            )
        return ATTACKS["backdoor"].fn(
            x,
            y,
            rng=_rng(settings, partition_id, 0),
            target=settings.backdoor_target,
            fraction=settings.backdoor_fraction,
            trigger_size=settings.backdoor_trigger_size,
        )
    return x, y


def boost_factor(settings: Settings) -> float:
    """``backdoor-boost``, or Bagdasaryan et al.'s model-replacement factor ``gamma = n / eta`` shared by
    the c backdoor attackers: ``n / (eta c)`` with n the clients per round and eta the server learning rate."""
    if settings.backdoor_boost:
        return settings.backdoor_boost
    clients = settings.sampling_params().clients_per_round()
    boosting = sum(settings.attack_of(pid) == "backdoor" for pid in settings.attackers())
    return clients / (settings.server_learning_rate * max(1, boosting))


def poison_num_examples(settings: Settings, partition_id: int, num_examples: int) -> int:
    """The ``num-examples`` partition ``partition_id`` reports: the true count, or its attack's forgery."""
    name = settings.attack_of(partition_id)
    if name != "none" and ATTACKS[name].level == "examples":
        return ATTACKS[name].fn(num_examples)
    return num_examples


def poison_weights(
    settings: Settings,
    partition_id: int,
    global_weights: list[np.ndarray],
    weights: list[np.ndarray],
    server_round: int,
) -> list[np.ndarray]:
    """The arrays a client sends: its trained ``weights``, or what its client-side attack makes of them."""
    name = settings.attack_of(partition_id)
    if name == "none":
        return weights
    attack = ATTACKS[name]
    if attack.level == "arrays":
        return attack.fn(weights)
    if name == "backdoor" and server_round in settings.boost_rounds():  # model replacement
        factor = np.float32(boost_factor(settings))
        return [g + factor * (w - g) for g, w in zip(global_weights, weights)]
    if attack.level != "update" or attack.omniscient:
        return weights  # data attacks acted before training, examples attacks forge the count; omniscient: server
    layout = ModelLayout.of_arrays(global_weights)
    flat_global = layout.flatten_arrays(global_weights)
    update = layout.flatten_arrays(weights, minus=flat_global)
    poisoned = attack.fn(
        update,
        rng=_rng(settings, partition_id, server_round),
        honest_updates=None,
        **_update_params(settings, name),
    )
    return layout.unflatten_arrays(flat_global + poisoned)


def _partition_id(metrics: object) -> int:
    """The ``partition-id`` a reply's train metrics report (-1 when there is none)."""
    value = metrics.get("partition-id", -1) if isinstance(metrics, Mapping) else -1
    return int(value) if isinstance(value, (int, float)) else -1


def omniscient_params(settings: Settings, name: str, num_clients: int, num_attackers: int) -> dict[str, Any]:
    """The run config's parameters of omniscient attack ``name`` in a round of ``num_clients`` replies,
    ``num_attackers`` of them Byzantine."""
    if name == "alie":
        return {"z": settings.alie_z or alie_z(num_clients, num_attackers)}
    if name == "ipm":
        return {"epsilon": settings.ipm_epsilon}
    if name in ("min-max", "min-sum"):
        return {"perturbation": settings.attack_perturbation, "gamma_init": settings.attack_gamma_init}
    if name == "fang-trimmed-mean":
        return {"b": settings.fang_b}
    if name == "fang-krum":
        return {"num_attackers": num_attackers}
    return {}


class OmniscientAttack:
    """Server-side stand-in for omniscient attackers: rewrites their rows in place (one vector for
    all the rows of an attack, or one per attacker with its own generator for ``per_attacker`` attacks)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.omniscient = {
            pid: settings.attack_of(pid) for pid in settings.attackers() if ATTACKS[settings.attack_of(pid)].omniscient
        }

    def __call__(self, server_round: int, collected: CollectedUpdates) -> None:
        ids = [_partition_id(m) for m in collected.metrics]
        attack_of_row = [self.omniscient.get(pid) for pid in ids]
        byzantine = np.array([pid in self.settings.attackers() for pid in ids])
        if byzantine.all() or not any(attack_of_row):
            return
        assert collected.updates is not None  # hooks run on the update matrix, never on a streamed mean
        honest = collected.updates[~byzantine]
        rng = _rng(self.settings, -1, server_round)
        for name in sorted({a for a in attack_of_row if a}):
            rows = np.array([a == name for a in attack_of_row])
            params = omniscient_params(self.settings, name, len(ids), int(byzantine.sum()))
            attack = ATTACKS[name]
            if not attack.per_attacker:
                collected.updates[rows] = attack.fn(honest[0], rng=rng, honest_updates=honest, **params)
                continue
            for row in np.flatnonzero(rows):
                own = _rng(self.settings, ids[row], server_round)
                collected.updates[row] = attack.fn(honest[0], rng=own, honest_updates=honest, **params)
