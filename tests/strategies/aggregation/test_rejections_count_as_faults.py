"""Rejected replies count against f (faulty clients cannot stall Krum or Bulyan by shrinking n);
honest client errors do not (they cannot make a rule average an attacker in)."""

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord

from strategies.aggregation.steps import round_params
from strategies.aggregation.strategy import build_aggregation_strategy
from strategies.robust.rules import bulyan, multi_krum
from tests.fakes import FakeGrid, error_reply, reply, settings_of

SHAPES = [(3, 2), (2,)]


def flat(arrays):
    return np.concatenate([np.asarray(a).ravel() for a in arrays])


def run_round(strategy, global_arrays, replies):
    list(strategy.configure_train(1, ArrayRecord(global_arrays), ConfigRecord({}), FakeGrid(range(20), lambda m: m)))
    return strategy.aggregate_train(1, replies)


def test_round_params_lower_f_by_the_rejected_replies():
    assert round_params("bulyan", {"f": 4}, 16, faults=4) == {"f": 0}
    assert round_params("krum", {"f": 2}, 9, faults=1) == {"f": 1}
    assert round_params("multi-krum", {"f": 2, "m": None}, 9, faults=1) == {"f": 1, "m": 8}
    assert round_params("krum", {"f": 1}, 3, faults=5) == {"f": 0}
    assert round_params("trimmed-mean", {"beta": 0.2}, 8, faults=2) == {"beta": 0.2}


def test_bulyan_aggregates_the_valid_replies_when_faulty_ones_are_rejected():
    rng = np.random.default_rng(0)
    g = [np.zeros(s, np.float32) for s in SHAPES]
    honest = [[rng.standard_normal(s).astype(np.float32) for s in SHAPES] for _ in range(7)]
    nan = [np.full(s, np.nan, np.float32) for s in SHAPES]
    replies = [reply(i, w) for i, w in enumerate(honest)] + [reply(7, nan), error_reply(8, "crashed")]
    strategy = build_aggregation_strategy(
        "bulyan", settings_of({"bulyan-f": 2, "num-partitions": 11, "min-train-clients": 11}).aggregation_params()
    )
    new, metrics = run_round(strategy, g, replies)
    # the NaN reply lowers f to 1 (7 >= 4f + 3 holds); the crash does not lower it further
    assert new is not None and metrics["rejected-replies"] == 2 and metrics["rule-f"] == 1
    updates = np.stack([flat(w) for w in honest])
    np.testing.assert_allclose(flat(new.to_numpy_ndarrays()), bulyan(updates, np.ones(7), 1), rtol=1e-6, atol=1e-6)


def test_an_honest_client_error_does_not_let_multi_krum_average_the_attacker_in():
    rng = np.random.default_rng(2)
    g = [np.zeros(s, np.float32) for s in SHAPES]
    honest = [[0.1 * rng.standard_normal(s).astype(np.float32) for s in SHAPES] for _ in range(5)]
    attacker = [np.full(s, 100.0, np.float32) for s in SHAPES]
    replies = [reply(i, w) for i, w in enumerate(honest)] + [reply(5, attacker), error_reply(6, "crashed")]
    strategy = build_aggregation_strategy(
        "multi-krum", settings_of({"krum-f": 1, "num-partitions": 7, "min-train-clients": 7}).aggregation_params()
    )
    new, metrics = run_round(strategy, g, replies)
    assert "rule-f" not in metrics  # f stays 1: Multi-Krum averages n - f = 5 updates, the honest ones
    assert np.abs(flat(new.to_numpy_ndarrays())).max() < 1.0


def test_multi_krum_keeps_f_for_the_faults_it_has_not_seen():
    rng = np.random.default_rng(1)
    g = [np.zeros(s, np.float32) for s in SHAPES]
    clients = [[rng.standard_normal(s).astype(np.float32) for s in SHAPES] for _ in range(8)]
    replies = [reply(i, w) for i, w in enumerate(clients)] + [reply(8, [g[0].ravel(), g[1]])]
    strategy = build_aggregation_strategy(
        "multi-krum", settings_of({"krum-f": 2, "num-partitions": 9, "min-train-clients": 9}).aggregation_params()
    )
    new, metrics = run_round(strategy, g, replies)
    assert metrics["rule-f"] == 1
    updates = np.stack([flat(w) for w in clients])
    np.testing.assert_allclose(
        flat(new.to_numpy_ndarrays()), multi_krum(updates, np.ones(8), 1, 7), rtol=1e-6, atol=1e-6
    )
