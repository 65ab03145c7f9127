"""Experiment tracking: what every round reports to TensorBoard and, optionally, MLflow.

:class:`RunTracker` turns each finished round's :class:`~fl_app.server.run_directory.RoundRecord`
into scalars (:func:`round_scalars`) and writes them, with a histogram of the clients' update norms
(:func:`update_norms`), to a TensorBoard event file in the run directory
(:mod:`fl_app.server.event_file`, no TensorFlow) and to an MLflow run
(:mod:`fl_app.server.mlflow_run`, when ``mlflow-tracking-uri`` is set). ``tensorboard --logdir
outputs/`` shows every run of the output directory, one run per run directory.

Tags (step = round; round 0 is the initial model's centralized evaluation):

* ``centralized/<name>``, ``federated/<name>``, ``train/<name>``: ``loss`` and the model's metrics
  under their Keras names (``accuracy``, ``auc``, ``mae``, ...), exactly the history's values;
* ``privacy/<key>``: ``epsilon``, ``delta`` and every other privacy figure of the round
  (``dp-sgd-epsilon-max``, ``epsilon-rdp``, ...);
* ``replies/replied``, ``replies/failed`` (error replies and nodes that did not answer) and
  ``replies/rejected`` (replies the reply checks or the strategy refused);
* ``traffic/bytes_up`` (clients to server) and ``traffic/bytes_down`` (server to clients);
* ``time/round_seconds``; ``server/<key>``: the strategy's other measurements (``update-norm``,
  ``accepted-replies``, a norm bound's clip fraction, ...);
* ``clients/update_norm`` (histogram, TensorBoard only): ``||w_k - w||`` of every train reply
  that carries full weights of the global model's layout (not compressed or encrypted uploads),
  rejected ones included. Left out of differentially private runs whose clients' updates are not
  private themselves (``dp-mode`` ``central``, ``client-clipping``, DP-FTRL): the norms would be
  a release the accountant does not cover.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from logging import WARNING
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ArrayRecord, Message
from flwr.common.logger import log

from fl_app.server.run_directory import SCOPES, RoundRecord
from strategies.core.update_matrix import ModelLayout

if TYPE_CHECKING:
    from fl_app.config.settings import Settings

PRIVACY_KEYS = ("delta", "noise", "clip-norm", "dp-", "participation")
"""``extra`` keys that start with one of these (or contain ``epsilon``) are privacy figures."""
REPLY_KEYS = {"rejected": "replies/rejected"}
"""``extra`` keys with a tag of their own."""


def round_scalars(record: RoundRecord) -> dict[str, float]:
    """The scalars of one round under their tags (see the module's docstring)."""
    scalars: dict[str, float] = {}
    for scope in SCOPES:
        for name in ("loss", *record.metric_names()):
            value = record.value(scope, name)
            if value is not None:
                scalars[f"{scope}/{name}"] = float(value)
    for key, value in record.extra.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
            continue
        if key in REPLY_KEYS:
            scalars[REPLY_KEYS[key]] = float(value)
        elif "epsilon" in key or key.startswith(PRIVACY_KEYS):
            scalars[f"privacy/{key}"] = float(value)
        else:
            scalars[f"server/{key}"] = float(value)
    if record.round > 0:  # round 0 only evaluates the initial model
        scalars["replies/replied"] = float(record.clients_replied)
        scalars["replies/failed"] = float(record.clients_failed)
        scalars["traffic/bytes_up"] = float(record.bytes_received)
        scalars["traffic/bytes_down"] = float(record.bytes_sent)
        scalars["time/round_seconds"] = float(record.seconds)
    return scalars


def update_norms(global_arrays: ArrayRecord, replies: Iterable[Message]) -> list[float]:
    """``||w_k - w||`` of each reply whose one ArrayRecord has the names, shapes and dtypes of
    ``global_arrays`` (full weights); replies with other content and non-finite norms are left out.

    Each reply is read once, as the aggregation reads it (:class:`ModelLayout`: views on the
    received bytes, ``w_k - w`` into one reused float32 vector)."""
    layout = ModelLayout.of(global_arrays)
    base = layout.flatten(global_arrays)
    diff = np.empty_like(base)
    norms = []
    for reply in replies:
        records = list(reply.content.array_records.values()) if reply.has_content() else []
        if len(records) != 1:
            continue
        try:
            views = layout.views(records[0])
        except ValueError:  # not the global model's layout: an encoded or encrypted upload
            continue
        with np.errstate(over="ignore", invalid="ignore"):
            layout.flatten_views(views, out=diff, minus=base)
            norm = float(np.sqrt(np.dot(diff, diff)))
        if np.isfinite(norm):
            norms.append(norm)
    return norms


class RunTracker:
    """The run's trackers: a TensorBoard event file (``tensorboard``) and an MLflow run
    (``mlflow-tracking-uri``), either, both or none.

    The server calls :meth:`observe_replies` with each round's train replies (from the round loop,
    only when :attr:`wants_replies`), :meth:`log_round` when a round ends and :meth:`finish` at the
    end. A tracker that fails (a full disk, an unreachable MLflow server) is reported once and
    dropped; it never stops the run.
    """

    def __init__(
        self,
        *,
        events_dir: Path | None = None,
        mlflow: tuple[str, str, str, Mapping[str, Any]] | None = None,
        norm_histogram: bool = True,
    ) -> None:
        from fl_app.server.event_file import EventFile

        self.events = EventFile(events_dir) if events_dir is not None else None
        self.mlflow = None
        if mlflow is not None:
            from fl_app.server.mlflow_run import MlflowRun

            self.mlflow = MlflowRun(*mlflow)
        self.norm_histogram = norm_histogram and self.events is not None
        self._norms: dict[int, list[float]] = {}

    @classmethod
    def for_run(cls, settings: Settings, run_dir: Path, dp_mode: str | None) -> RunTracker:
        """The trackers that ``settings`` ask for, writing into the run directory ``run_dir``; the
        norm histogram only where the updates' norms are not protected by the run's DP."""
        mlflow = None
        if settings.mlflow_tracking_uri:
            mlflow = (settings.mlflow_tracking_uri, settings.mlflow_experiment, run_dir.name, settings.to_run_config())
        private_updates = dp_mode is not None and not dp_mode.startswith("local")
        return cls(
            events_dir=run_dir if settings.tensorboard else None,
            mlflow=mlflow,
            norm_histogram=not private_updates and settings.homomorphic_encryption == "none",
        )

    @property
    def wants_replies(self) -> bool:
        """Whether :meth:`observe_replies` does anything (the norm histogram is on)."""
        return self.norm_histogram

    def observe_replies(self, server_round: int, global_arrays: ArrayRecord, replies: Sequence[Message]) -> None:
        """Keep the update norms of ``server_round``'s train replies for its histogram."""
        if self.norm_histogram:
            self._norms[server_round] = update_norms(global_arrays, replies)

    def log_round(self, record: RoundRecord) -> None:
        """Write the round's scalars (and its norm histogram) to every tracker."""
        scalars = round_scalars(record)
        norms = self._norms.pop(record.round, None)
        if self.events is not None:
            try:
                for tag, value in scalars.items():
                    self.events.scalar(tag, value, record.round)
                if norms:
                    self.events.histogram("clients/update_norm", norms, record.round)
                self.events.flush()
            except OSError as err:
                log(WARNING, "TensorBoard events are no longer written: %r", err)
                self.events = None
        if self.mlflow is not None:
            try:
                self.mlflow.log_metrics(record.round, scalars)
            except Exception as err:  # an unreachable tracking server must not stop training
                log(WARNING, "MLflow metrics are no longer logged: %r", err)
                self.mlflow = None

    def summary(self) -> dict[str, str]:
        """Where the run was tracked, for ``summary.json``: the event file and the MLflow run id."""
        out = {}
        if self.events is not None:
            out["tensorboard events"] = str(self.events.path)
        if self.mlflow is not None:
            out["mlflow run"] = self.mlflow.run_id
        return out

    def replay(self, history: Iterable[RoundRecord]) -> None:
        """Log the rounds of an earlier run that this one resumes (the history holds them all)."""
        for record in history:
            self.log_round(record)

    def finish(self, artifacts: Iterable[Path]) -> None:
        """Close the event file; log ``artifacts`` (the model, history, summary) to MLflow and end its run."""
        if self.events is not None:
            self.events.close()
        if self.mlflow is not None:
            try:
                self.mlflow.finish(list(artifacts))
            except Exception as err:
                log(WARNING, "MLflow artifacts were not logged: %r", err)
