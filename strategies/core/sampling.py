"""Node sampling: the arguments every Flower Message-API strategy takes, from the run config."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def sampling_kwargs(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """The node-sampling arguments every Flower Message-API strategy takes."""
    return {
        "fraction_train": float(run_config.get("fraction-train", 1.0)),
        "fraction_evaluate": float(run_config.get("fraction-evaluate", 1.0)),
        "min_train_nodes": int(run_config.get("min-train-clients", 2)),
        "min_evaluate_nodes": int(run_config.get("min-evaluate-clients", 2)),
        "min_available_nodes": int(run_config.get("min-available-clients", 2)),
    }
