"""Integration: a real simulation through the launcher with export='tflite'."""

import json

import pytest

from tests.helpers import run_to_completion

pytestmark = pytest.mark.integration


def test_run_exports_checks_and_writes_model_card(tmp_path):
    run = run_to_completion(
        tmp_path / "outputs",
        3,
        "num-server-rounds=2 local-epochs=2 fraction-train=0.5 min-train-clients=2 "
        "min-available-clients=3 partitioner='iid' export='tflite' export-tolerance=0.05",
    )
    run_dir = run.run_dir
    assert (run_dir / "model.keras").is_file()
    sizes = {v: (run_dir / "export" / f"final_{v}.tflite").stat().st_size for v in ("float32", "int8")}
    assert sizes["int8"] < 0.5 * sizes["float32"]

    report = json.loads((run_dir / "export_check.json").read_text())
    fed = report["federated_check"]
    # 2 of the 3 clients trained in the last round: the check goes to the one that did not
    assert len(fed["trained_in_last_round"]) == 2 and len(fed["nodes"]) == 1
    assert fed["nodes"][0] not in fed["trained_in_last_round"]
    assert "1 of 3 clients did not reply in the last training round" in fed["selection"]
    assert fed["replied"] == 1 and fed["num_examples"] > 0 and fed["failures"] == []
    final = report["models"]["final"]
    for variant in ("float32", "int8"):
        result = final["tflite"][variant]
        assert result["size_bytes"] == sizes[variant]
        assert 0.0 <= result["federated_accuracy"] <= 1.0
        assert result["latency_per_example"]["median_seconds"] > 0
    assert final["tflite"]["float32"]["argmax_agreement_with_keras"] >= 0.999
    assert report["ready"] is True, report["reasons"]

    history = run.history
    assert abs(final["keras"]["centralized_accuracy"] - history[-1]["centralized_accuracy"]) < 1e-6
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["export ready"] is True

    card = (run_dir / "model_card.md").read_text()
    for fragment in (
        "# Model card: `mlp` trained with `fedavg`",
        "data set: digits",
        "partitioning: iid",
        "rounds: 2 of 2",
        "## Privacy",
        "## Robustness",
        "TFLite int8, final (export-check round clients)",
        "**ready to ship**",
        "1 of 3 clients did not reply",
    ):
        assert fragment in card, fragment
