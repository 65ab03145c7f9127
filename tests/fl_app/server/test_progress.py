"""The server's progress line: rounds done / total, ETA, headline metrics, one line per round."""

from __future__ import annotations

import logging

import fl_app.server.progress as progress_module
from fl_app.server.progress import RoundProgress, format_duration
from fl_app.server.run_directory import RoundRecord


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_format_duration():
    assert format_duration(42) == "0:42"
    assert format_duration(725) == "12:05"
    assert format_duration(3723) == "1:02:03"
    assert format_duration(-3) == "0:00"


def test_line_has_rounds_share_eta_and_headline_metrics():
    clock = Clock()
    progress = RoundProgress(10, clock=clock)
    record = RoundRecord(round=0, centralized_accuracy=0.1, centralized_loss=2.3)
    assert progress.line(record).startswith("[round 0/10 0%] ETA - | central accuracy 0.1000 loss 2.3000")
    clock.now += 30.0  # three rounds in 30 s: 7 left at 10 s each
    record = RoundRecord(round=3, centralized_accuracy=0.9, federated_accuracy=0.85, train_loss=0.2, seconds=9.5)
    record.clients_replied, record.bytes_received = 4, 2000
    line = progress.line(record)
    assert line.startswith("[round 3/10 30%] ETA 1:10 | central accuracy 0.9000")
    assert "federated accuracy 0.8500 | train loss 0.2000 | 4 replied, 0 failed | 2.0 kB up | 9.50 s" in line


def test_regression_headline_and_resumed_eta():
    clock = Clock()
    progress = RoundProgress(8, first_round=5, clock=clock)  # resumed after round 4
    clock.now += 20.0
    record = RoundRecord(round=6, metrics={"centralized_mae": 1.25, "federated_mae": 1.5})
    line = progress.line(record)
    assert line.startswith("[round 6/8 75%] ETA 0:20 | central mae 1.2500")  # 2 rounds in 20 s, 2 left
    assert "federated mae 1.5000" in line


def test_one_line_per_round_and_a_warning_per_failure(monkeypatch):
    logged: list[tuple[int, str]] = []
    monkeypatch.setattr(progress_module, "log", lambda level, msg, *args: logged.append((level, msg % args)))
    progress = RoundProgress(2)
    progress.report(RoundRecord(round=1, failures=["node 7: timeout", "node 8: NaN"]))
    assert len(logged) == 3
    assert logged[0][0] == logging.INFO and logged[0][1].startswith("[round 1/2 50%]")
    assert "\r" not in logged[0][1] and "\n" not in logged[0][1]
    assert logged[1:] == [
        (logging.WARNING, "[round 1] failure: node 7: timeout"),
        (logging.WARNING, "[round 1] failure: node 8: NaN"),
    ]
