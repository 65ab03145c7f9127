"""A run's TensorBoard events, read back with TensorBoard's own reader (``EventAccumulator``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def read_events(run_dir: Path) -> tuple[dict[str, dict[int, float]], dict[str, dict[int, Any]]]:
    """``(scalars, histograms)`` of the event files in ``run_dir``: ``{tag: {step: value}}`` and
    ``{tag: {step: HistogramValue}}`` (``min``, ``max``, ``num``, ``sum``, ``bucket``, ...)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert list(Path(run_dir).glob("events.out.tfevents.*")), f"no event file in {run_dir}"
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    tags = events.Tags()
    scalars = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in tags["scalars"]}
    histograms = {tag: {e.step: e.histogram_value for e in events.Histograms(tag)} for tag in tags["histograms"]}
    return scalars, histograms


def history_scalars(history: list) -> dict[str, dict[int, float]]:
    """What the events of ``history`` (RoundRecords, or history.json's dicts) must hold:
    :func:`fl_app.server.tracking.round_scalars` of each round, as ``{tag: {round: value}}``."""
    from fl_app.server.run_directory import RoundRecord
    from fl_app.server.tracking import round_scalars

    expected: dict[str, dict[int, float]] = {}
    for record in history:
        record = record if isinstance(record, RoundRecord) else RoundRecord(**record)
        for tag, value in round_scalars(record).items():
            expected.setdefault(tag, {})[record.round] = value
    return expected
