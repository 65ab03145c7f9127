"""History, plot, summary and model card name a regression's metric (``mae``), not accuracy."""

import json

from fl_app.config.settings import Settings
from fl_app.delivery.model_card import render
from fl_app.server.run_directory import RoundRecord, RunDirectory
from fl_app.server.summary import summarize


def _history() -> list[RoundRecord]:
    history = []
    for round_, mae, federated in ((0, 0.9, None), (1, 0.6, 0.35), (2, 0.7, 0.45)):
        record = RoundRecord(round=round_)
        record.set_metrics("centralized", {"loss": 1.0, "mae": mae})
        if federated is not None:
            record.set_metrics("federated", {"loss": 1.0, "mae": federated})
        history.append(record)
    return history


def test_a_regression_run_reports_mae_everywhere(tmp_path):
    settings = Settings(model="examples.diabetes.model:build", dataset="examples.diabetes.data:load", task="regression")
    history = _history()
    run_dir = RunDirectory(tmp_path, "fedavg")
    run_dir.write_history(history)
    assert json.loads(run_dir.file("history.json").read_text())[2]["metrics"]["federated_mae"] == 0.45
    assert run_dir.file("history.csv").read_text().splitlines()[0].endswith("failures,centralized_mae,federated_mae")
    assert run_dir.plot(history).stat().st_size > 1000
    summary = summarize(settings, history, 1.0, run_dir)
    assert summary["headline metric"] == "mae" and summary["final centralized mae"] == 0.7
    assert summary["final federated mae"] == 0.45 and "final centralized accuracy" not in summary
    card = render(settings, history, parameters=10, keras_size=None, export_report=None, num_server_test=90)
    assert "## Metric: `mae`" in card and "| Keras, best round (1) | 0.6000 | 0.3500 |" in card
