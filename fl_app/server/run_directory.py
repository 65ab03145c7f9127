"""The run directory: per-round history (JSON, CSV), final model, plot and summary.

Layout of ``<output-dir>/<timestamp>-<strategy>/``::

    config.json    the run config as the server read it
    history.json   one record per round (see :class:`RoundRecord`)
    history.csv    the same, one row per round
    model.keras    the final global model
    metrics.png    centralized and federated accuracy and loss per round
    summary.json   final accuracy, rounds, time, paths

``<output-dir>/latest`` holds the path of the newest run directory.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import json
import re
from pathlib import Path
from typing import Any


@dataclasses.dataclass
class RoundRecord:
    """What happened in one round (``round`` 0 is the initial model)."""

    round: int
    seconds: float = 0.0  # from sending the round's first message to its last evaluation
    finished_at: float = 0.0  # Unix time at that moment; differences include the writes between rounds
    centralized_loss: float | None = None
    centralized_accuracy: float | None = None
    federated_loss: float | None = None
    federated_accuracy: float | None = None
    train_loss: float | None = None
    train_accuracy: float | None = None
    clients_replied: int = 0
    clients_failed: int = 0
    failures: list[str] = dataclasses.field(default_factory=list)
    bytes_sent: int = 0
    bytes_received: int = 0
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def flat(self) -> dict[str, Any]:
        """One flat row: the fields, then ``extra``'s keys; failures joined by ' | '."""
        row = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("extra", "failures")}
        row["failures"] = " | ".join(self.failures)
        row.update(self.extra)
        return row


class RunDirectory:
    """Creates a fresh run directory and writes the run's files into it."""

    def __init__(self, output_dir: str | Path, strategy: str) -> None:
        root = Path(output_dir).expanduser().resolve()
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", strategy).strip("-") or "run"
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        path = root / f"{stamp}-{slug}"
        suffix = 1
        while path.exists():
            suffix += 1
            path = root / f"{stamp}-{slug}-{suffix}"
        path.mkdir(parents=True)
        self.root = root
        self.path = path
        (root / "latest").write_text(str(path) + "\n", encoding="utf-8")

    def file(self, name: str) -> Path:
        return self.path / name

    def write_json(self, name: str, payload: Any) -> Path:
        target = self.file(name)
        tmp = target.with_suffix(target.suffix + ".tmp")
        tmp.write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n", encoding="utf-8")
        tmp.replace(target)
        return target

    def write_history(self, history: list[RoundRecord]) -> None:
        """history.json and history.csv (rewritten after every round)."""
        self.write_json("history.json", [dataclasses.asdict(r) for r in history])
        rows = [r.flat() for r in history]
        columns: list[str] = []
        for row in rows:
            columns.extend(k for k in row if k not in columns)
        with self.file("history.csv").open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)

    def plot(self, history: list[RoundRecord]) -> Path:
        """metrics.png: accuracy (left) and loss (right) per round."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 4))
        for field, label in (
            ("centralized", "centralized (server test set)"),
            ("federated", "federated (client test splits)"),
        ):
            for ax, metric in ((acc_ax, "accuracy"), (loss_ax, "loss")):
                points = [(r.round, getattr(r, f"{field}_{metric}")) for r in history]
                points = [(x, y) for x, y in points if y is not None]
                if points:
                    ax.plot(*zip(*points), marker="o", label=label)
        acc_ax.set(xlabel="round", ylabel="accuracy", title="Accuracy")
        loss_ax.set(xlabel="round", ylabel="loss", title="Loss")
        for ax in (acc_ax, loss_ax):
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        target = self.file("metrics.png")
        fig.savefig(target, dpi=100)
        plt.close(fig)
        return target


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
