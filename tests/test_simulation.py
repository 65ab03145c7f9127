"""Integration: a real Flower simulation through ``flwr run`` (via the launcher)."""

import json

import numpy as np
import pytest

from tests.helpers import assert_launcher_cleaned_up, run_launcher, run_to_completion

pytestmark = pytest.mark.integration


def test_flwr_run_simulation_writes_history_and_model(tmp_path):
    run = run_to_completion(
        tmp_path / "outputs",
        3,
        "num-server-rounds=2 local-epochs=1 min-train-clients=3 min-available-clients=3 "
        "partitioner='iid' strategy='strategies.examples:MinExamplesFedAvg'",
    )
    history = run.history
    assert [r["round"] for r in history] == [0, 1, 2]
    for record in history[1:]:
        assert record["clients_replied"] == 3 and record["clients_failed"] == 0
        assert record["bytes_received"] > 3 * 4 * 10_000  # three MLP replies of ~17k float32 each
        assert 0.0 <= record["centralized_accuracy"] <= 1.0
        assert record["federated_accuracy"] is not None
    assert history[2]["centralized_accuracy"] > history[0]["centralized_accuracy"] + 0.2
    csv_lines = (run.run_dir / "history.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 4 and csv_lines[0].startswith("round,")

    import tensorflow as tf

    model = tf.keras.models.load_model(run.run_dir / "model.keras")
    assert model.output_shape == (None, 10)
    summary = json.loads((run.run_dir / "summary.json").read_text())
    assert summary["rounds"] == 2
    assert np.isclose(summary["final centralized accuracy"], history[-1]["centralized_accuracy"])
    assert (run.run_dir / "metrics.png").stat().st_size > 1000


def test_bad_run_config_fails_before_training(tmp_path):
    proc = run_launcher(
        [
            "--clients",
            "2",
            "--output-dir",
            str(tmp_path),
            "--",
            "-c",
            "dirichlet-alpha=-1.0",
        ]
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "dirichlet-alpha must be in [0.001, 1000], got -1.0" in output
    assert_launcher_cleaned_up(output)
    assert not (tmp_path / "latest").exists()
