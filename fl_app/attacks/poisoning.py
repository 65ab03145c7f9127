"""Wiring simulated Byzantine clients into a run (the attack math is in :mod:`fl_app.attacks.catalogue`).

``attack`` in the run config names an attack (or several, comma-separated: the j-th attacker in
partition-id order runs the (j mod len)-th, e.g. ``attack='nan,wrong-shapes' attack-ids='0,1'``);
``attack-fraction`` or ``attack-ids`` says which partitions are Byzantine
(:meth:`~fl_app.config.settings.Settings.attackers`). Where an attack acts:

* on the client, in the message it really sends: ``label-flip`` poisons the training labels;
  ``sign-flip`` (-s u), ``scaling`` (s u), ``gaussian`` (N(0, sigma^2)) and ``nan`` replace the
  update; ``wrong-shapes`` and ``float64`` corrupt the arrays; ``negative-examples`` reports
  ``num-examples = -5``. The server's validation sees them as they are.
* on the server, for the omniscient attacks ``alie`` and ``ipm``, which need the honest clients'
  updates of the round (the papers assume omniscience): :class:`OmniscientAttack` is an update
  hook of :class:`~strategies.aggregation.strategy.AggregationStrategy` that rewrites the attackers' rows after
  validation, before any defence. Attackers are told apart by the ``partition-id`` that every
  client reports in its train metrics. Simulation only: in deployment nothing attacks.
"""

from __future__ import annotations

from collections.abc import Mapping

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


def poison_labels(settings: Settings, partition_id: int, y: np.ndarray, num_classes: int) -> np.ndarray:
    """The training labels partition ``partition_id`` trains on (flipped for label-flip attackers;
    integer class labels only)."""
    if settings.attack_of(partition_id) == "label-flip":
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise ValueError(
                f"attack 'label-flip' flips integer class labels; this data set's targets have dtype {y.dtype} "
                f"and shape {y.shape[1:]} per example (one-hot, multi-label or regression): use an update attack"
            )
        return ATTACKS["label-flip"].fn(y, num_classes)
    return y


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


class OmniscientAttack:
    """Server-side stand-in for omniscient attackers (ALIE, IPM): rewrites their rows in place."""

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
            if name == "alie":
                params = {"z": self.settings.alie_z or alie_z(len(ids), int(byzantine.sum()))}
            else:
                params = {"epsilon": self.settings.ipm_epsilon}
            collected.updates[rows] = ATTACKS[name].fn(honest[0], rng=rng, honest_updates=honest, **params)
