"""Integration: a real simulation survives clients that send NaN and wrong shapes."""

import numpy as np
import pytest

from tests.helpers import run_to_completion

pytestmark = pytest.mark.integration


def test_nan_and_wrong_shape_clients_are_rejected_and_every_round_finishes(tmp_path):
    run = run_to_completion(
        tmp_path / "outputs",
        5,
        "num-server-rounds=2 local-epochs=1 min-train-clients=5 min-available-clients=5 "
        "partitioner='iid' strategy='median' attack='nan,wrong-shapes' attack-ids='0,1'",
    )
    run_dir, history = run.run_dir, run.history
    assert [r["round"] for r in history] == [0, 1, 2]
    for record in history[1:]:
        assert record["clients_replied"] == 5
        assert record["extra"]["accepted-replies"] == 3
        assert record["extra"]["rejected-replies"] == 2
        reasons = " ".join(record["failures"])
        assert "NaN or infinite" in reasons and "expected" in reasons
    assert history[-1]["centralized_accuracy"] > history[0]["centralized_accuracy"] + 0.2

    import tensorflow as tf

    model = tf.keras.models.load_model(run_dir / "model.keras")
    assert all(np.isfinite(w).all() for w in model.get_weights())
