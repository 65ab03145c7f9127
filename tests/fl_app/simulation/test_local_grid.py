"""The in-process grid runs the real ClientApp handlers and turns their failures into error replies."""

import numpy as np

from fl_app.simulation.local_grid import run_local_federation


def test_local_federation_learns_and_reports_failures(tmp_path):
    arrays, history = run_local_federation(
        {
            "num-partitions": 3,
            "partitioner": "iid",
            "local-epochs": 1,
            "num-server-rounds": 2,
            "min-train-clients": 3,
            "min-evaluate-clients": 3,
            "min-available-clients": 3,
            "strategy": "robust",
            "attack": "wrong-shapes",
            "attack-ids": "2",
        }
    )
    assert [r.round for r in history] == [0, 1, 2]
    assert history[2].centralized_accuracy > history[0].centralized_accuracy + 0.2
    assert history[1].extra["rejected-replies"] == 1
    assert any("node 3: rejected" in line for line in history[1].failures)
    assert all(np.isfinite(a).all() for a in arrays.to_numpy_ndarrays())
