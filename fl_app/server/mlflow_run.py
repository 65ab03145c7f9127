"""One MLflow run per federated run (the optional ``mlflow`` extra: ``uv sync --extra mlflow``).

With ``mlflow-tracking-uri`` set (a local store such as ``file:./mlruns``, or a tracking server's
``http(s)://`` address), the server opens a run in the experiment ``mlflow-experiment``, logs the
run config as parameters, the scalars of every round as metrics (the names of the TensorBoard
tags, step = round) and, at the end, the final model file, the history and the summary as
artifacts. It talks to MLflow through ``MlflowClient`` only (no global active run).

MLflow 3 keeps its file store (``file:`` URIs, plain paths) in maintenance mode and refuses it
unless ``MLFLOW_ALLOW_FILE_STORE=true``; a run config that names a file store asks for one, so the
server sets that variable (unless it is set) for such URIs. ``sqlite:///mlflow.db`` needs
SQLAlchemy and Alembic, which ``mlflow-skinny`` does not install.
"""

from __future__ import annotations

import os
import re
import time
import urllib.parse
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

BATCH = 100
"""Parameters or metrics per ``log_batch`` request (MLflow's limit for parameters)."""


def is_file_store(tracking_uri: str) -> bool:
    """Whether ``tracking_uri`` names MLflow's file store (``file:`` or a plain path)."""
    return urllib.parse.urlparse(tracking_uri).scheme in ("", "file")


def metric_name(tag: str) -> str:
    """``tag`` with every character that MLflow refuses in a metric name replaced by ``_``."""
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", tag)


class MlflowRun:
    """An MLflow run that a federated run logs into.

    Parameters
    ----------
    tracking_uri : the tracking store or server (``mlflow-tracking-uri``)
    experiment : the experiment's name (``mlflow-experiment``), created when missing
    run_name : the run's name (the run directory's name)
    params : the run config, logged as parameters (values as text)
    """

    def __init__(self, tracking_uri: str, experiment: str, run_name: str, params: Mapping[str, Any]) -> None:
        if is_file_store(tracking_uri):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri)
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found is not None else self.client.create_experiment(experiment)
        self.run_id: str = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        values = [Param(key, str(value)) for key, value in params.items()]
        for start in range(0, len(values), BATCH):
            self.client.log_batch(self.run_id, params=values[start : start + BATCH])

    def log_metrics(self, step: int, scalars: Mapping[str, float]) -> None:
        """The scalars of one round, at ``step``."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(metric_name(tag), float(value), now, step) for tag, value in scalars.items()]
        for start in range(0, len(metrics), BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[start : start + BATCH])

    def finish(self, artifacts: Iterable[Path], status: str = "FINISHED") -> None:
        """Log the files that exist among ``artifacts`` and end the run with ``status``."""
        for path in artifacts:
            if path.is_file():
                self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id, status)
