"""Experiment tracking (fl_app.server.tracking): TensorBoard events written without TensorFlow and
read back with TensorBoard's reader, the update-norm histogram, and an MLflow run read back with
MLflow's client (when the ``mlflow`` extra is installed)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from flwr.app import ArrayRecord

from fl_app.server.run_directory import RoundRecord
from fl_app.server.tracking import RunTracker, round_scalars, update_norms
from tests.fakes import error_reply, reply
from tests.helpers import ROOT

GLOBAL = [np.zeros(2, np.float32), np.zeros((1, 1), np.float32)]


def _history() -> list[RoundRecord]:
    initial = RoundRecord(round=0)
    initial.set_metrics("centralized", {"loss": 0.7, "accuracy": 0.5, "auc": 0.55})
    trained = RoundRecord(round=1, seconds=2.5, clients_replied=3, clients_failed=1, bytes_sent=4000)
    trained.bytes_received = 3000
    trained.set_metrics("centralized", {"loss": 0.4, "accuracy": 0.8, "auc": 0.9})
    trained.set_metrics("federated", {"loss": 0.45, "accuracy": 0.75, "auc": 0.85})
    trained.set_metrics("train", {"train-loss": 0.5, "train-accuracy": 0.7, "train-auc": 0.8}, prefix="train-")
    trained.extra.update({"epsilon": 1.25, "dp-sgd-epsilon-max": 3.5, "rejected": 1, "update-norm": 0.3})
    trained.extra.update({"round-note": "text is not a scalar", "flag": True})
    return [initial, trained]


def test_round_scalars_name_every_figure_of_the_round():
    initial, trained = _history()
    assert round_scalars(initial) == pytest.approx(
        {"centralized/loss": 0.7, "centralized/accuracy": 0.5, "centralized/auc": 0.55}
    )
    scalars = round_scalars(trained)
    for scope, values in (
        ("centralized", (0.4, 0.8, 0.9)),
        ("federated", (0.45, 0.75, 0.85)),
        ("train", (0.5, 0.7, 0.8)),
    ):
        assert [scalars[f"{scope}/{name}"] for name in ("loss", "accuracy", "auc")] == pytest.approx(values)
    assert scalars["privacy/epsilon"] == 1.25 and scalars["privacy/dp-sgd-epsilon-max"] == 3.5
    assert scalars["replies/rejected"] == 1 and scalars["replies/failed"] == 1 and scalars["replies/replied"] == 3
    assert scalars["traffic/bytes_up"] == 3000 and scalars["traffic/bytes_down"] == 4000
    assert scalars["server/update-norm"] == 0.3 and scalars["time/round_seconds"] == 2.5
    assert not any("round-note" in tag or "flag" in tag for tag in scalars)


def test_update_norms_of_full_weight_replies_only():
    replies = [
        reply(1, [np.array([3.0, 4.0], np.float32), np.zeros((1, 1), np.float32)]),  # norm 5
        reply(2, [np.array([0.0, 1.0], np.float32), np.full((1, 1), 2.0, np.float32)]),  # norm sqrt(5)
        reply(3, [np.array([1.0, 1.0], np.float16), np.zeros((1, 1), np.float32)]),  # another dtype: an encoded upload
        reply(4, [np.array([np.nan, 1.0], np.float32), np.zeros((1, 1), np.float32)]),  # not finite
        reply(5, [np.zeros(2, np.float32)]),  # another layout
        error_reply(6, "boom"),
    ]
    assert update_norms(ArrayRecord(GLOBAL), replies) == pytest.approx([5.0, math.sqrt(5.0)])


def test_norm_histogram_is_left_out_where_update_norms_are_private(tmp_path):
    from fl_app.config.settings import Settings

    for mode, histogram in ((None, True), ("local-gaussian", True), ("central", False), ("dp-ftrl", False)):
        tracker = RunTracker.for_run(Settings(), tmp_path / str(mode), mode)
        assert tracker.wants_replies is histogram and tracker.mlflow is None
        tracker.finish([])
    assert not RunTracker.for_run(Settings(tensorboard=False), tmp_path / "off", None).wants_replies
    assert not (tmp_path / "off").exists()


WRITE_AND_READ = """
import json, sys
import numpy as np
from flwr.app import ArrayRecord
from fl_app.server.tracking import RunTracker
from tests.fakes import reply
from tests.fl_app.server.test_tracking import GLOBAL, _history

run_dir = sys.argv[1]
tracker = RunTracker(events_dir=__import__("pathlib").Path(run_dir))
tracker.observe_replies(1, ArrayRecord(GLOBAL), [
    reply(1, [np.array([3.0, 4.0], np.float32), np.zeros((1, 1), np.float32)]),
    reply(2, [np.array([0.0, 1.0], np.float32), np.zeros((1, 1), np.float32)]),
])
for record in _history():
    tracker.log_round(record)
tracker.finish([])
tensorflow_after_writing = "tensorflow" in sys.modules

# read back with TensorBoard's reader, on its TensorFlow stub (the real TensorFlow reads the same files)
sys.modules["tensorboard.compat.notf"] = type(sys)("tensorboard.compat.notf")
from tests.events import read_events
scalars, histograms = read_events(run_dir)
norm = histograms["clients/update_norm"][1]
print(json.dumps({"tensorflow": tensorflow_after_writing, "scalars": scalars,
                  "histogram": [norm.num, norm.min, norm.max, norm.sum, sum(norm.bucket)]}))
"""


def test_events_are_written_without_tensorflow_and_read_back_equal_the_history(tmp_path):
    process = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(WRITE_AND_READ), str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    result = json.loads(process.stdout.strip().splitlines()[-1])
    assert result["tensorflow"] is False
    from tests.events import history_scalars

    expected = history_scalars(_history())
    read = {tag: {int(step): value for step, value in steps.items()} for tag, steps in result["scalars"].items()}
    assert set(read) == set(expected)
    for tag, steps in expected.items():
        assert read[tag] == pytest.approx(steps, rel=1e-6), tag
    assert result["histogram"] == pytest.approx([2, 1.0, 5.0, 6.0, 2])


@pytest.mark.skipif(
    importlib.util.find_spec("mlflow") is None,
    reason="the mlflow extra is not installed (uv sync --extra mlflow); .ci/run installs it",
)
def test_mlflow_run_holds_the_config_the_rounds_and_the_model(tmp_path, monkeypatch):
    import os

    from mlflow.tracking import MlflowClient

    from fl_app.config.settings import Settings

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "unset by this test")  # restored afterwards
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")

    settings = Settings(mlflow_tracking_uri=(tmp_path / "mlruns").as_uri(), mlflow_experiment="tracking-test")
    run_dir = tmp_path / "20260101-000000-fedavg"
    run_dir.mkdir()
    model = run_dir / "model.keras"
    model.write_bytes(b"model bytes")
    tracker = RunTracker.for_run(settings, run_dir, None)
    assert os.environ["MLFLOW_ALLOW_FILE_STORE"] == "true"  # MLflow 3 refuses a file store without it
    for record in _history():
        tracker.log_round(record)
    tracker.finish([model, run_dir / "missing.json"])

    client = MlflowClient(tracking_uri=settings.mlflow_tracking_uri)
    experiment = client.get_experiment_by_name("tracking-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == run_dir.name
    assert run.data.params["strategy"] == "fedavg" and run.data.params["num-server-rounds"] == "10"
    assert len(run.data.params) == len(settings.to_run_config())
    auc = client.get_metric_history(run.info.run_id, "centralized/auc")
    assert [m.step for m in auc] == [0, 1] and [m.value for m in auc] == pytest.approx([0.55, 0.9])
    assert run.data.metrics["privacy/epsilon"] == 1.25 and run.data.metrics["traffic/bytes_up"] == 3000
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["model.keras"]


def test_a_named_mlflow_store_without_the_extra_stops_the_run_before_training(monkeypatch):
    from fl_app.config.settings import Settings, SettingsError

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real_find_spec(name, *a)
    )
    with pytest.raises(
        SettingsError, match=r"mlflow-tracking-uri is 'file:/tmp/x' but MLflow is not installed.*--extra mlflow"
    ):
        Settings.from_run_config({"mlflow-tracking-uri": "file:/tmp/x"})
    with pytest.raises(SettingsError, match="mlflow-experiment must not be empty"):
        Settings.from_run_config({"mlflow-experiment": ""})
    Settings.from_run_config({"tensorboard": False})


def test_server_app_writes_the_history_as_events_and_a_resumed_run_holds_every_round(monkeypatch, tmp_path):
    """The ServerApp in-process (no TensorFlow on its side: centralized-evaluation=false): one round,
    then a run resumed from it for a second; each run directory's events equal its history.json
    (the resumed one's: both rounds), with one update norm per train reply of the rounds it ran. With the mlflow extra, both runs are in MLflow too."""
    from tests.events import history_scalars, read_events
    from tests.fl_app.server.test_faults_and_checkpoint import run_server_app

    mlflow = importlib.util.find_spec("mlflow") is not None
    tracking = {"mlflow-tracking-uri": (tmp_path / "mlruns").as_uri()} if mlflow else {}
    first = run_server_app(monkeypatch, tmp_path / "first", {"num-server-rounds": 1, **tracking}, nodes=2)
    resumed = run_server_app(
        monkeypatch, tmp_path / "resumed", {"num-server-rounds": 2, "resume-from": str(first), **tracking}, nodes=2
    )
    for run_dir, rounds, trained_here in ((first, [1], [1]), (resumed, [1, 2], [2])):
        history = json.loads((run_dir / "history.json").read_text())
        assert [r["round"] for r in history] == rounds
        scalars, histograms = read_events(run_dir)
        expected = history_scalars(history)
        assert set(scalars) == set(expected) and "federated/accuracy" in scalars and "replies/rejected" in scalars
        for tag, steps in expected.items():
            assert scalars[tag] == pytest.approx(steps, rel=1e-6), tag
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["tensorboard events"].startswith(str(run_dir / "events.out.tfevents."))
        assert ("mlflow run" in summary) is mlflow
        norms = histograms["clients/update_norm"]
        assert sorted(norms) == trained_here and all(norms[r].num == 2 and norms[r].min > 0 for r in trained_here)
    if mlflow:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=tracking["mlflow-tracking-uri"])
        runs = client.search_runs([client.get_experiment_by_name("fl-keras").experiment_id])
        assert sorted(r.info.run_name for r in runs) == sorted([first.name, resumed.name])
        # by run id: the two run directories have the same name when both runs start within a second
        first_id = json.loads((first / "summary.json").read_text())["mlflow run"]
        assert sorted(r.info.run_id for r in runs) == sorted(
            [first_id, json.loads((resumed / "summary.json").read_text())["mlflow run"]]
        )
        for run in runs:
            steps = [m.step for m in client.get_metric_history(run.info.run_id, "federated/accuracy")]
            assert steps == ([1] if run.info.run_id == first_id else [1, 2])
            artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
            assert artifacts == {"weights.npz", "history.json", "summary.json"}
