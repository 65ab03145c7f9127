"""One-run privacy audits of the app's DP modes, on the mechanisms as the app runs them.

An audit inserts ``m`` canaries, each included with probability 1/2, runs the mechanism once,
scores every canary from what the mechanism released, and turns the guesses into an empirical
lower bound on epsilon (:mod:`strategies.private.auditing`, Steinke, Nasr, Jagielski 2023). Here:

* **user-level DP** (``strategy='dp-fedavg'``): the canaries are *clients*. :class:`CanaryGrid`
  puts them beside the ordinary nodes of a grid and answers their train messages with a canary
  update: a "Dirac" update ``a e_c`` (``a`` past the clip norm, ``c`` the canary's own
  coordinate). The real :class:`strategies.private.dp_fedavg.DpFedAvgStrategy` (from
  :func:`~strategies.private.dp_fedavg.build_dp_strategy`) samples, clips, averages, noises and
  accounts them through its own ``configure_train`` / ``aggregate_train`` on real Flower
  Messages, in :func:`fl_app.server.round_loop.run_rounds`.

  - central modes (fixed or adaptive clipping): an included canary is a connected client, an
    excluded one never connects (add/remove-one-client, the relation the accountant uses). The
    score of canary ``i`` is ``(w_T - w_0)[c_i]``: the sum over rounds of the released aggregates
    in its direction (the inner strategy adds each release, ``server-learning-rate`` 1, no
    momentum).
  - ``local-gaussian``: every canary client takes part and its update goes through the client's
    own transform (:func:`fl_app.client.update_privacy.private_weights`, clip and noise on the
    device); an included canary sends ``+a e_c``, an excluded one ``-a e_c`` (local DP protects any
    two inputs of a client). The server sees each report, so the score is the sum of the
    canary's reports in its direction.

  Canary coordinates should be ones that the ordinary clients never move (:func:`dead_input_coordinates`:
  the first layer's weights of input features that are 0 in every example), so that only the
  canary and the noise land there: the audit then measures the mechanism, not the data.

* **example-level DP-SGD** (:func:`audit_dp_sgd`): the canaries are *examples* in one client's
  data, trained with the app's DP-SGD client (:func:`fl_app.client.node_client.compiled_model`
  with TF Privacy's optimizer, Poisson batches, :class:`fl_app.task.keras_client.KerasClient`).
  Canary ``i`` is the input ``a e_{d+i}`` (an extra input feature that only it uses) with a random
  label, on a logistic regression: its gradient lies in its own row of the kernel, where no other
  example's gradient goes. The server sees the client's trained weights; the score of canary ``i``
  is how far its row moved toward its label (its label's weight minus the mean of the others).
  This audits one client's local training (its example-level guarantee, as the server sees the
  update), with gradient canaries on a purpose-built model, not the federation.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fl_app.client.update_privacy import private_weights
from fl_app.config.settings import Settings
from fl_app.server.round_loop import EvaluateFn, run_rounds
from fl_app.server.run_directory import RoundRecord
from strategies.core.grid_wrapper import GridWrapper
from strategies.core.update_matrix import ModelLayout
from strategies.private.auditing import AuditResult, audit_scores
from strategies.private.dp_fedavg import DpFedAvgStrategy, build_dp_strategy


@dataclasses.dataclass(frozen=True)
class Canaries:
    """``m`` Dirac canaries: canary ``i`` pushes flat coordinate ``coordinates[i]`` by ``magnitude``.

    Attributes:
        coordinates: one distinct flat parameter index per canary.
        included: ``S_i = +1`` (True) or ``-1``, each with probability 1/2 (:meth:`draw`).
        magnitude: ``a``, the canary update's norm (choose it past the clip norm).
    """

    coordinates: np.ndarray
    included: np.ndarray
    magnitude: float

    def __post_init__(self) -> None:
        if self.coordinates.ndim != 1 or self.coordinates.shape != self.included.shape:
            raise ValueError("need one coordinate and one inclusion bit per canary")
        if np.unique(self.coordinates).size != self.coordinates.size:
            raise ValueError("canary coordinates must be distinct")
        if not self.magnitude > 0:
            raise ValueError(f"canary magnitude must be > 0, got {self.magnitude}")

    @classmethod
    def draw(cls, coordinates: np.ndarray, magnitude: float, rng: np.random.Generator) -> Canaries:
        """Canaries on ``coordinates``, each included independently with probability 1/2."""
        coordinates = np.asarray(coordinates, dtype=np.int64)
        return cls(coordinates, rng.random(coordinates.size) < 0.5, float(magnitude))

    @property
    def count(self) -> int:
        return int(self.coordinates.size)


def dead_input_coordinates(x: np.ndarray, kernel_shape: tuple[int, int], offset: int = 0) -> np.ndarray:
    """Flat indices of the first dense kernel's weights that see an input feature 0 in every example.

    ``x`` is the data pool (examples first, features flattened in the model's order),
    ``kernel_shape`` the (inputs, units) shape of the first dense kernel, stored row-major at
    ``offset`` in the flat parameter vector. A gradient step never moves these weights (their
    gradient is the feature times the backpropagated error), so a canary there meets only noise.
    """
    features = np.asarray(x).reshape(len(x), -1)
    if features.shape[1] != kernel_shape[0]:
        raise ValueError(f"{features.shape[1]} input features but a kernel of shape {kernel_shape}")
    dead = np.flatnonzero(~np.any(features != 0, axis=0))
    units = kernel_shape[1]
    return (offset + dead[:, None] * units + np.arange(units)[None, :]).ravel()


class CanaryGrid(GridWrapper):
    """The ordinary nodes of ``inner`` plus canary clients that answer with Dirac updates.

    Canary ``i`` is node ``first_canary_id + i``. With ``settings.dp_mode`` central (or
    client-clipping), only included canaries are connected and each sends ``w + a e_{c_i}``;
    with a local mode every canary is connected, sends ``w + sign_i a e_{c_i}`` through the
    client's own DP transform, and :attr:`report_scores` accumulates the reports' coordinate
    ``c_i`` (what the server received).
    """

    def __init__(self, inner: Grid, canaries: Canaries, settings: Settings, first_canary_id: int) -> None:
        super().__init__(inner)
        self.canaries = canaries
        self.settings = settings
        self.local = settings.dp_mode.startswith("local")
        self.first_canary_id = int(first_canary_id)
        self.report_scores = np.zeros(canaries.count)

    def canary_ids(self) -> list[int]:
        """The connected canaries' node ids."""
        connected = np.ones(self.canaries.count, bool) if self.local else self.canaries.included
        return [self.first_canary_id + int(i) for i in np.flatnonzero(connected)]

    def get_node_ids(self) -> Iterable[int]:
        return [*self.inner.get_node_ids(), *self.canary_ids()]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        ordinary = [m for m in messages if m.metadata.dst_node_id < self.first_canary_id]
        replies = list(self.inner.send_and_receive(ordinary, timeout=timeout)) if ordinary else []
        for message in messages:
            if message.metadata.dst_node_id >= self.first_canary_id:
                replies.append(self._canary_reply(message))
        return replies

    def _canary_reply(self, message: Message) -> Message:
        index = message.metadata.dst_node_id - self.first_canary_id
        if message.metadata.message_type != MessageType.TRAIN:
            return Message(RecordDict({"metrics": MetricRecord({"num-examples": 1})}), reply_to=message)
        global_weights = next(iter(message.content.array_records.values())).to_numpy_ndarrays()
        layout = ModelLayout.of_arrays(global_weights)
        update = np.zeros(layout.size, np.float32)
        sign = 1.0 if self.canaries.included[index] or not self.local else -1.0
        update[self.canaries.coordinates[index]] = sign * self.canaries.magnitude
        weights = layout.unflatten_arrays(layout.flatten_arrays(global_weights) + update)
        config = dict(next(iter(message.content.config_records.values()), ConfigRecord()))
        sent = private_weights(self.settings, global_weights, weights, config)
        if self.local:
            report = layout.flatten_arrays(sent, minus=layout.flatten_arrays(global_weights))
            self.report_scores[index] += float(report[self.canaries.coordinates[index]])
        content = RecordDict({"arrays": ArrayRecord(sent), "metrics": MetricRecord({"num-examples": 1})})
        return Message(content, reply_to=message)


@dataclasses.dataclass(frozen=True)
class FederatedAudit:
    """A user-level audit's outcome: the bound, the claim, and the run it came from."""

    result: AuditResult
    claimed_epsilon: float
    history: list[RoundRecord]
    scores: np.ndarray


def audit_federation(
    settings: Settings,
    ordinary: Grid,
    initial: list[np.ndarray],
    canaries: Canaries,
    *,
    evaluate_fn: EvaluateFn | None = None,
    strategy: DpFedAvgStrategy | None = None,
) -> FederatedAudit:
    """Run ``settings.num_server_rounds`` rounds of the app's DP-FedAvg strategy on ``ordinary``'s
    nodes plus ``canaries`` (a :class:`CanaryGrid`) and audit the released models.

    ``settings.num_partitions`` is the population the strategy expects (ordinary nodes plus
    canaries); ``strategy`` defaults to :func:`build_dp_strategy` of ``settings``. The claimed
    epsilon is the history's last ``epsilon`` (the accountant's, at ``settings.dp_delta``).
    """
    if settings.strategy != "dp-fedavg":
        raise ValueError(f"the audit needs strategy='dp-fedavg', got '{settings.strategy}'")
    strategy = strategy or build_dp_strategy(settings.aggregation_params(), settings.dp_params())
    first_canary_id = max(ordinary.get_node_ids(), default=0) + 1
    grid = CanaryGrid(ordinary, canaries, settings, first_canary_id)
    final, history = run_rounds(
        grid,
        strategy,
        ArrayRecord(initial),
        num_rounds=settings.num_server_rounds,
        timeout=settings.round_timeout,
        evaluate_fn=evaluate_fn,
    )
    if grid.local:
        scores = grid.report_scores
    else:
        layout = ModelLayout.of_arrays(initial)
        moved = layout.flatten_arrays(final.to_numpy_ndarrays(), minus=layout.flatten_arrays(initial))
        scores = moved[canaries.coordinates].astype(np.float64)
    claimed = float(history[-1].extra.get("epsilon", math.inf))
    result = audit_scores(scores, canaries.included, settings.dp_delta)
    return FederatedAudit(result, claimed, history, scores)


@dataclasses.dataclass(frozen=True)
class DpSgdAudit:
    """An example-level audit of one DP-SGD client's fit."""

    result: AuditResult
    claimed_epsilon: float
    accuracy: float
    examples: int
    scores: np.ndarray


def padded_features(x: np.ndarray, extra: int) -> np.ndarray:
    """``x`` flattened to (examples, features) float32, with ``extra`` zero features appended."""
    features = np.asarray(x, np.float32).reshape(len(x), -1)
    return np.hstack([features, np.zeros((len(features), extra), np.float32)])


def dp_sgd_canary_data(
    x: np.ndarray, y: np.ndarray, canaries: Canaries, labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The client's training set: ``x`` with one zero feature per canary (:func:`padded_features`),
    and the included canaries ``a e_{d+i}`` with label ``labels[i]`` appended."""
    padded = padded_features(x, canaries.count)
    d = padded.shape[1] - canaries.count
    chosen = np.flatnonzero(canaries.included)
    canary_x = np.zeros((chosen.size, d + canaries.count), np.float32)
    canary_x[np.arange(chosen.size), d + chosen] = canaries.magnitude
    return np.vstack([padded, canary_x]), np.concatenate([np.asarray(y, np.int64), labels[chosen]])


def dp_sgd_canary_scores(
    kernel_before: np.ndarray, kernel_after: np.ndarray, features: int, labels: np.ndarray
) -> np.ndarray:
    """Canary ``i``'s row ``features + i`` of the (inputs, classes) kernel: how far its label's
    weight moved minus the mean move of the other classes' (a gradient step on the canary raises
    the first and lowers the others)."""
    moved = (kernel_after - kernel_before)[features : features + labels.size].astype(np.float64)
    own = moved[np.arange(labels.size), labels]
    others = (moved.sum(axis=1) - own) / (moved.shape[1] - 1)
    return own - others


def audit_dp_sgd(
    settings: Settings,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    canaries: Canaries,
    labels: np.ndarray,
    *,
    num_classes: int,
) -> DpSgdAudit:
    """Train one DP-SGD client (the app's compiled DP model and :class:`KerasClient`, ``model``
    forced to ``logreg``) for ``settings.local_epochs`` epochs on ``x_train`` plus the included
    canaries (:func:`dp_sgd_canary_data`), and audit its update.

    The claim is :func:`fl_app.task.dp_sgd.example_level_epsilon` for the examples it trained on,
    ``batch-size``, the noise multiplier and the epochs, as the client reports it. The accuracy
    is the trained model's on ``x_test`` (padded with zero canary features).
    """
    from fl_app.client.node_client import compiled_model, dp_sgd_key
    from fl_app.task.data import ClientData
    from fl_app.task.dp_sgd import example_level_epsilon
    from fl_app.task.keras_client import KerasClient

    dp_sgd = dp_sgd_key(settings)
    if dp_sgd is None or settings.dp_sgd_sampling != "poisson":
        raise ValueError("the DP-SGD audit needs dp-sgd-noise-multiplier > 0 and dp-sgd-sampling='poisson'")
    features = int(np.prod(x_train.shape[1:]))
    x, y = dp_sgd_canary_data(x_train, y_train, canaries, labels)
    test_x = padded_features(x_test, canaries.count)
    model, _ = compiled_model(
        "logreg",
        (x.shape[1],),
        num_classes,
        settings.optimizer,
        settings.learning_rate,
        settings.seed,
        settings.client_threads,
        dp_sgd,
    )
    client = KerasClient(
        model,
        ClientData(x, y, test_x, np.asarray(y_test, np.int64), num_classes),
        local_epochs=settings.local_epochs,
        batch_size=settings.batch_size,
        epoch_batches=model.optimizer.poisson_batches,
    )
    initial = [w.copy() for w in model.get_weights()]
    weights, examples, _ = client.fit(initial, {"server-round": 1})
    _, _, metrics = client.evaluate(weights, {})
    scores = dp_sgd_canary_scores(initial[0], weights[0], features, labels)
    claimed = example_level_epsilon(
        examples,
        settings.batch_size,
        settings.dp_sgd_noise_multiplier,
        settings.local_epochs,
        settings.dp_delta,
        method=settings.dp_accounting,
        sampling="poisson",
    )
    result = audit_scores(scores, canaries.included, settings.dp_delta)
    return DpSgdAudit(result, float(claimed), float(metrics["accuracy"]), int(examples), scores)
