"""A pipeline of a pre-aggregation step and a rule trains on non-IID digits under attack."""

import numpy as np

from fl_app.simulation.local_grid import run_local_federation


def test_nnm_then_median_trains_on_dirichlet_digits_with_two_sign_flippers():
    arrays, history = run_local_federation(
        {
            "dataset": "digits",
            "num-partitions": 10,
            "partitioner": "dirichlet",
            "dirichlet-alpha": 0.3,
            "local-epochs": 1,
            "num-server-rounds": 3,
            "min-train-clients": 10,
            "min-available-clients": 10,
            "fraction-evaluate": 0.1,
            "min-evaluate-clients": 1,
            "strategy": "robust",
            "aggregation-rule": "median",
            "pre-aggregation": "nnm",
            "pre-aggregation-f": 2,
            "attack": "sign-flip",
            "attack-ids": "0,1",
        }
    )
    assert [r.round for r in history] == [0, 1, 2, 3]
    assert history[1].extra["nnm-f"] == 2 and history[1].extra["accepted-replies"] == 10
    assert history[3].centralized_accuracy > history[0].centralized_accuracy + 0.4
    assert all(np.isfinite(a).all() for a in arrays.to_numpy_ndarrays())
