"""The run's closing figures (summary.json and the log's last lines)."""

from __future__ import annotations

import dataclasses
import sys

import numpy as np

from fl_app.config.privacy_scope import privacy_scope
from fl_app.config.settings import Settings
from fl_app.server.run_directory import RoundRecord, RunDirectory, headline


def largest_example_epsilon(history: list[RoundRecord]) -> float | None:
    """The largest DP-SGD example-level epsilon any client reported, over **every** round.

    Each round's ``dp-sgd-epsilon-max`` is the largest among that round's replies; a client that
    took part in round 3 but not in the last round (say it has few examples, hence the largest
    epsilon) is only in round 3's value, so the run's figure is the maximum over the history, not
    the last round's value. A client's epsilon assumes it trained in every round up to the one it
    reports (an upper bound that only grows), so its last report is its largest."""
    values = [float(r.extra["dp-sgd-epsilon-max"]) for r in history if "dp-sgd-epsilon-max" in r.extra]
    return max(values) if values else None


def privacy_summary(settings: Settings, history: list[RoundRecord], stop_reason: str | None) -> dict:
    """Epsilon (user level, and the clients' largest DP-SGD example-level one), what it covers
    (:func:`fl_app.config.privacy_scope.privacy_scope`) and why training stopped."""
    out: dict = {}
    scope = privacy_scope(settings)
    if scope:
        out["what epsilon covers"] = scope
    for key, name in (("epsilon", "epsilon (user level)"), ("delta", "delta")):
        values = [r.extra[key] for r in history if key in r.extra]
        if values:
            out[name] = values[-1]
    example_epsilon = largest_example_epsilon(history)
    if example_epsilon is not None:
        out["epsilon (example level, DP-SGD, largest client over all rounds)"] = example_epsilon
    if stop_reason:
        out["stopped early"] = stop_reason
    return out


def summarize(settings: Settings, history: list[RoundRecord], seconds: float, run_dir: RunDirectory) -> dict:
    """The run's closing figures (also written to summary.json)."""
    last = history[-1] if history else RoundRecord(round=0)
    trained = [r for r in history if r.round > 0]
    names = last.metric_names() or ["accuracy"]
    finals: dict[str, float | None] = {}
    for name in names:  # the model's metrics under their Keras names, the headline first
        finals[f"final centralized {name}"] = last.value("centralized", name)
        if name == names[0]:
            finals["final centralized loss"] = last.centralized_loss
    for name in names:
        finals[f"final federated {name}"] = last.value("federated", name)
    return {
        "strategy": settings.strategy,
        "dataset": settings.dataset,
        "model": settings.model,
        "clients (partitions)": settings.num_partitions,
        "rounds": len(trained),
        "headline metric": headline(history) or "loss",
        **finals,
        "failed client replies": sum(r.clients_failed for r in trained),
        "seconds": round(seconds, 2),
        "tensorflow on the server": "tensorflow" in sys.modules,
        "mean seconds per round": round(float(np.mean([r.seconds for r in trained])), 3) if trained else None,
        "run directory": str(run_dir.path),
        "model file": str(
            run_dir.file("model.keras") if run_dir.file("model.keras").exists() else run_dir.file("weights.npz")
        ),
        "history": [str(run_dir.file("history.json")), str(run_dir.file("history.csv"))],
        "plot": str(run_dir.file("metrics.png")),
        "settings": dict(dataclasses.asdict(settings).items()),
    }
