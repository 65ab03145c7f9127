"""Private federations end to end through the real ClientApp handlers (in-process LocalGrid)."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting import pld, rdp

from fl_app.client.update_privacy import private_weights
from fl_app.config.settings import Settings
from fl_app.simulation.local_grid import run_local_federation
from fl_app.task.data import client_data
from strategies.private.mechanisms import insecure_seeded_generator

BASE = {
    "num-partitions": 3,
    "partitioner": "iid",
    "local-epochs": 1,
    "min-train-clients": 3,
    "min-available-clients": 3,
    "min-evaluate-clients": 0,
    "fraction-evaluate": 1e-6,
}


def test_dp_fedavg_with_client_clipping_learns_and_stops_at_the_budget():
    """Ten clients, so that the server's noise (std z C / m = 0.06 per coordinate, norm ~8 over the
    MLP's ~17k weights) leaves the clipped mean visible: over 6 runs the accuracy went from 0.09 to
    0.59-0.75. With 3 clients (std 0.2, norm ~26) it went up or down by chance."""
    config = {
        **BASE,
        "num-partitions": 10,
        "min-train-clients": 10,
        "min-available-clients": 10,
        "strategy": "dp-fedavg",
        "dp-mode": "client-clipping",
        "dp-sampling": "poisson",  # q = fraction-train = 1: every client every round, add/remove
        "dp-noise-multiplier": 0.3,
        "dp-clip-norm": 2.0,
        "dp-target-epsilon": 40.0,
        "num-server-rounds": 10,
    }
    _, history = run_local_federation(config)
    trained = [r for r in history if r.round > 0]
    assert 1 <= len(trained) < 10  # z = 0.3 with every client every round spends epsilon 40 in 2 rounds
    assert all(r.extra["epsilon"] <= 40.0 for r in trained)
    assert "clipped-replies" not in trained[-1].extra and "train-loss" not in trained[-1].extra  # not released
    assert history[-1].centralized_accuracy > history[0].centralized_accuracy


def test_dp_sgd_clients_report_their_example_level_epsilon():
    config = {**BASE, "dp-sgd-noise-multiplier": 1.1, "dp-sgd-l2-clip": 1.0, "num-server-rounds": 2}
    _, history = run_local_federation(config)
    eps = [r.extra["dp-sgd-epsilon-max"] for r in history if r.round > 0]
    assert 0 < eps[0] < eps[1] < math.inf
    assert history[-1].centralized_accuracy > history[0].centralized_accuracy


def independent_dp_sgd_epsilon(n: int, batch: int, z: float, epochs: int, sampling: str, method: str) -> float:
    """Epsilon of DP-SGD on n examples as run, straight from dp_accounting: Poisson sampling at
    q = B / n for epochs x ceil(n / B) steps (add/remove), or one Gaussian of multiplier z / 2 per
    epoch (shuffled fixed-size batches, replace-one)."""
    if sampling == "poisson":
        relation = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
        step = dp_accounting.PoissonSampledDpEvent(batch / n, dp_accounting.GaussianDpEvent(z))
        event = dp_accounting.SelfComposedDpEvent(step, epochs * math.ceil(n / batch))
    else:
        relation = dp_accounting.NeighboringRelation.REPLACE_ONE
        event = dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z / 2), epochs)
    if method == "rdp":
        accountant = rdp.RdpAccountant(neighboring_relation=relation)
    else:
        accountant = pld.PLDAccountant(neighboring_relation=relation, value_discretization_interval=1e-3)
    return accountant.compose(event).get_epsilon(1e-5)


@pytest.mark.parametrize(("sampling", "method"), [("poisson", "rdp"), ("poisson", "pld"), ("shuffle", "rdp")])
def test_dp_sgd_epsilon_in_the_history_is_that_of_the_sampling_that_ran(sampling, method):
    config = {
        **BASE,
        "dp-sgd-noise-multiplier": 1.1,
        "dp-sgd-sampling": sampling,
        "dp-accounting": method,
        "batch-size": 16,
        "local-epochs": 2,
        "num-server-rounds": 2,
    }
    _, history = run_local_federation(config, evaluate_centrally=False)
    settings = Settings.from_run_config(config)
    sizes = [len(client_data(settings, i).y_train) for i in range(settings.num_partitions)]
    for record in (r for r in history if r.round > 0):
        expected = max(independent_dp_sgd_epsilon(n, 16, 1.1, 2 * record.round, sampling, method) for n in sizes)
        assert record.extra["dp-sgd-epsilon-max"] == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("mode", ["client-clipping", "local-gaussian", "local-laplace"])
def test_client_side_transforms(mode):
    settings = Settings.from_run_config(
        {
            "strategy": "dp-fedavg",
            "dp-mode": mode,
            "dp-clip-norm": 1.0,
            "dp-noise-multiplier": 0.5,
            "dp-local-epsilon": 2.0,
        }
    )
    g = [np.ones((30, 10), np.float32), np.zeros(10, np.float32)]
    w = [a + 3.0 for a in g]
    out = private_weights(settings, g, w, {}, insecure_seeded_generator(0))
    update = np.concatenate([(o - a).ravel() for o, a in zip(out, g)])
    if mode == "client-clipping":
        assert np.linalg.norm(update) <= 1.0 and np.linalg.norm(update) > 0.999
    elif mode == "local-gaussian":
        assert np.std(update) == pytest.approx(0.5, rel=0.1)  # N(0, (z C)^2) dominates the clipped part
    else:
        assert np.mean(np.abs(update)) == pytest.approx(2 * 1.0 / 2.0, rel=0.15)  # Laplace scale 2C/eps
    assert [o.shape for o in out] == [a.shape for a in g]
    plain = private_weights(Settings(), g, w, {})
    assert plain is w


def test_dp_ftrl_federation_learns_and_reports_the_epsilon_of_the_epochs_that_ran():
    """Six digits clients, three asked per round, no sampling: epochs of two rounds (every node
    once), the tree restarting each epoch. The history's epsilon is dp_accounting's for the
    epochs that ran, one SingleEpochTreeAggregationDpEvent each (REPLACE_SPECIAL). z = 0.1 (epsilon
    415) so that 6 rounds learn visibly: two runs went from 0.109 to 0.825 and 0.819; at z = 0.5
    (epsilon 34) the tree noise of three clients per round left 0.40-0.63 after 6 rounds."""
    config = {
        **BASE,
        "num-partitions": 6,
        "min-available-clients": 6,
        "min-train-clients": 3,
        "fraction-train": 0.5,
        "model": "logreg",
        "strategy": "dp-ftrl",
        "learning-rate": 0.1,
        "dp-noise-multiplier": 0.1,
        "dp-clip-norm": 2.0,
        "num-server-rounds": 6,
    }
    _, history = run_local_federation(config)
    trained = [r for r in history if r.round > 0]
    assert [r.extra["dp-ftrl-epoch"] for r in trained] == [1, 1, 2, 2, 3, 3]
    assert all(r.clients_replied == 3 and not r.failures for r in trained)
    accountant = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_SPECIAL)
    for record in trained:
        epochs = [2] * (record.round // 2) + [1] * (record.round % 2)
        event = dp_accounting.ComposedDpEvent([dp_accounting.SingleEpochTreeAggregationDpEvent(0.1, s) for s in epochs])
        expected = (
            rdp.RdpAccountant(neighboring_relation=accountant.neighboring_relation).compose(event).get_epsilon(1e-5)
        )
        assert record.extra["epsilon"] == pytest.approx(expected, rel=1e-12)
    assert "train-loss" not in trained[-1].extra  # user-level DP: clients send no train metrics
    assert history[-1].centralized_accuracy > history[0].centralized_accuracy + 0.4
