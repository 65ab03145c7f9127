"""Integration: a compressed run with no TensorFlow on the server, and the quickstart-style baseline,
both through a real ``flwr run`` (via the launcher)."""

import json

import numpy as np
import pytest

from tests.helpers import ROOT, assert_launcher_cleaned_up, run_launcher, run_to_completion

pytestmark = pytest.mark.integration


def test_compressed_run_without_tensorflow_on_the_server(tmp_path):
    run = run_to_completion(
        tmp_path / "outputs",
        3,
        "num-server-rounds=2 local-epochs=1 min-train-clients=3 min-available-clients=3 "
        "partitioner='iid' strategy='robust' client-weighting='num-examples' "
        "compression='top-k' compression-topk-fraction=0.05 centralized-evaluation=false",
    )
    run_dir, history = run.run_dir, run.history
    assert [r["round"] for r in history] == [1, 2]  # no round 0: nothing evaluated on the server
    for record in history:
        assert record["clients_replied"] == 3 and not record["failures"]
        assert record["centralized_accuracy"] is None and record["federated_accuracy"] is not None
        # 5% of ~17k values as int32 index + float32 value, vs 4 bytes per value uncompressed
        assert 0 < record["bytes_received"] < record["bytes_sent"] / 8
    # Flower's simulation runtime imports TensorFlow into the process that hosts the ServerApp (and
    # the in-process backend's clients use it), so the flag is true in simulation; our server code
    # built no Keras model (no model.keras)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "tensorflow on the server" in summary
    assert not (run_dir / "model.keras").exists()
    weights = np.load(run_dir / "weights.npz")
    assert len(weights.files) == 6 and all(np.isfinite(weights[k]).all() for k in weights.files)


def test_quickstart_style_baseline_app_runs(tmp_path):
    proc = run_launcher(
        ["--clients", "2", "--output-dir", str(tmp_path), "--", "-c", "num-server-rounds=1 local-epochs=1"],
        app=ROOT / "scripts" / "baseline_app",
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert_launcher_cleaned_up(output)
    times = json.loads((tmp_path / "baseline-times.json").read_text())
    assert len(times["round_ends"]) == 2  # round 0 (before training) and round 1
