"""What a client does for privacy before its update leaves the device, and its DP-SGD report.

* ``dp-mode='client-clipping'`` (with ``strategy='dp-fedavg'``, or under secure aggregation): the
  update ``u = w - w_global`` is clipped to L2 norm ``C`` (the ``dp-clip-norm`` of the round's
  train config, else of the run config), so the server never receives an unclipped update; the
  server adds the Gaussian noise (as Flower's client-side fixed clipping).
* ``dp-mode='local-gaussian'``: ``clip_L2(u, C) + N(0, (z C)^2 I)`` on the device.
* ``dp-mode='local-laplace'``: ``clip_L1(u, C) + Laplace(0, 2C / epsilon)`` per coordinate, the
  classic ``Laplace(0, sensitivity / epsilon)`` with the L1 sensitivity ``2C`` of any two inputs.

Noise comes from :func:`strategies.private.mechanisms.secure_generator` (seeded by ``secrets``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fl_app.config.settings import Settings
from strategies.core.clipping import clip_rows, row_norms
from strategies.core.update_matrix import ModelLayout
from strategies.private.mechanisms import local_dp_gaussian, local_dp_laplace, secure_generator

CLIENT_MODES = ("client-clipping", "local-gaussian", "local-laplace")


def client_dp_mode(settings: Settings) -> str | None:
    """The client-side DP transform this run needs, or None."""
    if settings.dp_mode in CLIENT_MODES and (settings.strategy == "dp-fedavg" or settings.secure_aggregation):
        return settings.dp_mode
    return None


def private_weights(
    settings: Settings,
    global_weights: list[np.ndarray],
    weights: list[np.ndarray],
    config: dict,
    rng: np.random.Generator | None = None,
) -> list[np.ndarray]:
    """``global + transform(weights - global)`` for the run's client-side DP mode (identity if none)."""
    mode = client_dp_mode(settings)
    if mode is None:
        return weights
    clip = float(config.get("dp-clip-norm", settings.dp_clip_norm))
    layout = ModelLayout.of_arrays(global_weights)
    flat_global = layout.flatten_arrays(global_weights)
    update = layout.flatten_arrays(weights, minus=flat_global)
    if mode == "client-clipping":
        clip_rows(update[None, :], clip)
    elif mode == "local-gaussian":
        update = local_dp_gaussian(update, clip, settings.dp_noise_multiplier * clip, rng or secure_generator())
    else:
        update = local_dp_laplace(update, clip, settings.dp_local_epsilon, rng or secure_generator())
    out = layout.unflatten_arrays(flat_global + update)
    if mode == "client-clipping":
        # g + u rounds to float32: while the update the server reconstructs (w - g in float32, as
        # strategies.core.update_matrix does) has a norm above C, clip u to a bound shrunk by the overshoot
        bound = clip
        for _ in range(8):
            norm = float(row_norms(layout.flatten_arrays(out, minus=flat_global)[None, :])[0])
            if norm <= clip:
                break
            bound *= clip / norm * (1 - 2.0**-20)
            clip_rows(update[None, :], bound)
            out = layout.unflatten_arrays(flat_global + update)
    return out


def released_train_metrics(
    settings: Settings, metrics: dict[str, Any], num_examples: int, partition_id: int
) -> dict[str, Any]:
    """The metrics of a train reply, as the run's privacy allows (:mod:`fl_app.config.privacy_scope`).

    * user-level DP (``strategy='dp-fedavg'``, any mode): ``num-examples`` = 1 (the private mean
      weighs clients uniformly, so the true count has no use and would leak the data set's size)
      and nothing else; in a simulated attack, also the ``partition-id`` that tells the server's
      attack simulation who the attackers are (an experiment, outside the guarantee);
    * DP-SGD (example-level): ``num-examples``, ``partition-id`` and the ``dp-sgd-*`` report, no
      train loss, accuracy or timing (functions of the examples);
    * no DP: everything, with ``num-examples`` and ``partition-id``.

    ``num-examples`` is what :func:`fl_app.attacks.poisoning.poison_num_examples` makes of it for
    a simulated attacker.
    """
    from fl_app.attacks.poisoning import poison_num_examples
    from fl_app.config.privacy_scope import example_level_dp, user_level_dp

    if user_level_dp(settings):
        released: dict[str, Any] = {"num-examples": poison_num_examples(settings, partition_id, 1)}
        if settings.attackers():
            released["partition-id"] = partition_id
        return released
    if example_level_dp(settings):
        metrics = {key: value for key, value in metrics.items() if key.startswith("dp-sgd")}
    return {
        **metrics,
        "partition-id": partition_id,
        "num-examples": poison_num_examples(settings, partition_id, num_examples),
    }


def dp_sgd_report(settings: Settings, num_examples: int, server_round: int) -> dict[str, float]:
    """``{"dp-sgd-epsilon": ...}``: the example-level epsilon of this client's DP-SGD so far.

    An upper bound: the client is assumed to have trained ``local-epochs`` epochs in every round
    up to ``server_round``, accounted for the ``dp-sgd-sampling`` that ran
    (:func:`fl_app.task.dp_sgd.example_level_epsilon`: Poisson-sampled Gaussian steps under
    add/remove-one, or, for shuffled fixed-size batches, one unamplified Gaussian per epoch under
    replace-one). Empty when DP-SGD is off.
    """
    if settings.dp_sgd_noise_multiplier <= 0:
        return {}
    from fl_app.task.dp_sgd import example_level_epsilon

    epsilon = example_level_epsilon(
        num_examples,
        settings.batch_size,
        settings.dp_sgd_noise_multiplier,
        settings.local_epochs * max(1, server_round),
        settings.dp_delta,
        num_microbatches=settings.dp_sgd_microbatches or None,
        method=settings.dp_accounting,
        sampling=settings.dp_sgd_sampling,
    )
    return {"dp-sgd-epsilon": float(epsilon)}


class InjectedFault(RuntimeError):
    """Raised by a client that the run config's fault-injection keys tell to fail (tests only)."""


def maybe_fail(settings: Settings, partition_id: int, server_round: int) -> None:
    """Raise :class:`InjectedFault` if ``fault-partition-ids`` holds this partition and
    ``server_round == fault-round`` (a client that drops out mid-round, for dropout tests)."""
    if settings.fault_round and server_round == settings.fault_round and partition_id in settings.fault_partitions():
        raise InjectedFault(
            f"partition {partition_id} fails in round {server_round} (fault-partition-ids / fault-round)"
        )
