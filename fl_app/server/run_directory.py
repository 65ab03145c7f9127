"""The run directory: per-round history (JSON, CSV), final model, plot and summary.

Layout of ``<output-dir>/<timestamp>-<strategy>/``::

    config.json    the run config as the server read it
    history.json   one record per round (see :class:`RoundRecord`)
    history.csv    the same, one row per round
    model.keras    the final global model
    metrics.png    centralized and federated headline metric (accuracy, mae, ...) and loss per round
    summary.json   final metrics, rounds, time, paths

``<output-dir>/latest`` is a symbolic link to the newest run directory (relative, so the output
directory can move); :func:`latest_run` reads it, and the plain file that older versions wrote.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any


@dataclasses.dataclass
class RoundRecord:
    """What happened in one round (``round`` 0 is the initial model).

    Loss and accuracy have their own fields; every other metric of the model (its Keras name:
    ``mae``, ``auc``, ``binary_accuracy``, ...) is in ``metrics`` as ``<scope>_<name>``, scope
    ``centralized``, ``federated`` or ``train``; :meth:`value` reads either.
    """

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
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def flat(self) -> dict[str, Any]:
        """One flat row: the fields, ``metrics``' and then ``extra``'s keys; failures joined by ' | '."""
        row = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("metrics", "extra", "failures")}
        row["failures"] = " | ".join(self.failures)
        row.update(self.metrics)
        row.update(self.extra)
        return row

    def set_metrics(self, scope: str, results: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
        """Record ``results`` (Keras names, after ``prefix``) of ``scope``; return the other keys."""
        others: dict[str, Any] = {}
        for key, value in results.items():
            if not key.startswith(prefix) or isinstance(value, bool) or not isinstance(value, (int, float)):
                others[key] = value
                continue
            name = key[len(prefix) :]
            if name in ("loss", "accuracy"):
                setattr(self, f"{scope}_{name}", float(value))
            else:
                self.metrics[f"{scope}_{name}"] = float(value)
        return others

    def value(self, scope: str, name: str) -> float | None:
        """The ``scope`` (centralized, federated, train) value of the metric named ``name``."""
        if name in ("loss", "accuracy"):
            return getattr(self, f"{scope}_{name}")
        return self.metrics.get(f"{scope}_{name}")

    def metric_names(self) -> list[str]:
        """The model's metric names this record holds, accuracy first, loss excluded."""
        names = ["accuracy"] if any(self.value(s, "accuracy") is not None for s in SCOPES) else []
        for key in self.metrics:
            name = key.split("_", 1)[1]
            if name not in names:
                names.append(name)
        return names


SCOPES = ("centralized", "federated", "train")


def headline(history: list[RoundRecord]) -> str | None:
    """The metric the run is summed up by: ``accuracy`` if any round has it, else the model's
    first other metric (e.g. ``mae``), else None (loss only)."""
    from fl_app.task.output_spec import headline_metric

    names: list[str] = []
    for record in history:
        names.extend(n for n in record.metric_names() if n not in names)
    return headline_metric(names)


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
        point_latest(root, path)

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
        """metrics.png: the headline metric (:func:`headline`, e.g. accuracy or mae; left) and the
        loss (right) per round."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        name = headline(history) or "loss"
        fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 4))
        for field, label in (
            ("centralized", "centralized (server test set)"),
            ("federated", "federated (client test splits)"),
        ):
            for ax, metric in ((acc_ax, name), (loss_ax, "loss")):
                points = [(r.round, r.value(field, metric)) for r in history]
                points = [(x, y) for x, y in points if y is not None]
                if points:
                    ax.plot(*zip(*points), marker="o", label=label)
        acc_ax.set(xlabel="round", ylabel=name, title=name)
        loss_ax.set(xlabel="round", ylabel="loss", title="Loss")
        for ax in (acc_ax, loss_ax):
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        target = self.file("metrics.png")
        fig.savefig(target, dpi=100)
        plt.close(fig)
        return target


def point_latest(root: Path, run: Path) -> None:
    """Make ``root/latest`` a symbolic link to ``run`` (a directory in ``root``), replacing any
    earlier link or file at once (a new link renamed over it)."""
    temporary = root / f".latest-{os.getpid()}"
    temporary.unlink(missing_ok=True)
    temporary.symlink_to(run.name, target_is_directory=True)
    os.replace(temporary, root / "latest")


def latest_run(output_dir: str | Path) -> Path | None:
    """The run directory ``<output_dir>/latest`` names (a symbolic link, or a file holding a path
    as older versions wrote), or None when there is none."""
    latest = Path(output_dir) / "latest"
    if latest.is_symlink():
        return latest.resolve()
    if latest.is_file():
        return Path(latest.read_text(encoding="utf-8").strip())
    return None


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
