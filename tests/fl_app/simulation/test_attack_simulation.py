"""Integration: the new attacks run in a real (in-process) federation of 20 digits clients.

Fang et al.'s attack on Krum takes Krum to chance while the median holds, and a boosted backdoor
(model replacement in the last round) is measured in the history: FedAvg learns it, the median not.
"""

from __future__ import annotations

import math

import pytest

from fl_app.simulation.local_grid import run_local_federation

pytestmark = pytest.mark.integration

BASE = {
    "dataset": "digits",
    "partitioner": "iid",
    "num-partitions": 20,
    "min-train-clients": 20,
    "min-available-clients": 20,
    "fraction-evaluate": 0.01,
    "min-evaluate-clients": 0,
    "local-epochs": 1,
    "batch-size": 16,
    "num-server-rounds": 5,
    "strategy": "robust",
    "seed": 42,
}


def final_round(config):
    _, history = run_local_federation({**BASE, **config})
    assert [r.round for r in history] == list(range(BASE["num-server-rounds"] + 1))
    return history


def test_fang_krum_breaks_krum_but_not_the_median():
    attack = {"attack": "fang-krum", "attack-fraction": 0.2}  # 4 of 20, within byzantine-fraction 0.2
    krum = final_round({**attack, "aggregation-rule": "krum"})[-1].centralized_accuracy
    median = final_round({**attack, "aggregation-rule": "median"})[-1].centralized_accuracy
    assert krum < 0.2 < 0.8 < median, (krum, median)


def test_backdoor_success_is_recorded_and_model_replacement_plants_it_in_fedavg_only():
    attack = {
        "attack": "backdoor",
        "attack-fraction": 0.1,
        "backdoor-boost-rounds": "5",  # model replacement in the last round
        "attack-allow-excess": True,  # FedAvg tolerates no attacker: measured beyond its assumption
    }
    fedavg = final_round({**attack, "aggregation-rule": "mean", "client-weighting": "num-examples"})
    median = final_round({**attack, "aggregation-rule": "median"})
    for history in (fedavg, median):
        assert all(0.0 <= r.extra["backdoor-success"] <= 1.0 for r in history)  # round 0 included
        assert not any(math.isnan(r.extra["backdoor-success"]) for r in history)
    assert fedavg[-1].extra["backdoor-success"] > 0.5 > 0.2 > median[-1].extra["backdoor-success"]
    assert median[-1].centralized_accuracy > 0.8
