"""The run config, read once into a typed and validated object.

Flower hands every app a flat ``run_config`` mapping of kebab-case keys (``[tool.flwr.app.config]``
in ``pyproject.toml``, overridden with ``flwr run -c "key=value"``). :class:`Settings` turns it into
one frozen dataclass whose fields are the same keys in snake case. Every bad value fails here,
before any training, with a :class:`SettingsError` that names the key, the value and what is
allowed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

DATASETS = ("digits", "synthetic", "local-file", "huggingface")
PARTITIONERS = ("iid", "dirichlet", "shards")
OPTIMIZERS = ("sgd", "adam")


class SettingsError(ValueError):
    """A run-config value that the app cannot run with."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every run-config key of the app (kebab-case in the config, snake_case here)."""

    # Rounds and sampling
    num_server_rounds: int = 10
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_train_clients: int = 2
    min_evaluate_clients: int = 2
    min_available_clients: int = 2
    round_timeout: float = 600.0
    # Strategy
    strategy: str = "fedavg"
    proximal_mu: float = 0.0
    server_learning_rate: float = 0.1
    server_momentum: float = 0.9
    # Data
    dataset: str = "digits"
    partitioner: str = "dirichlet"
    dirichlet_alpha: float = 0.5
    shards_per_client: int = 2
    num_partitions: int = 10
    test_fraction: float = 0.2
    server_test_fraction: float = 0.2
    synthetic_classes: int = 10
    synthetic_features: int = 32
    synthetic_samples_per_client: int = 200
    hf_dataset: str = ""
    hf_label_column: str = "label"
    data_path: str = ""
    label_column: str = "label"
    num_classes: int = 0
    input_shape: str = ""
    # Model and local training
    model: str = "mlp"
    local_epochs: int = 5
    batch_size: int = 32
    learning_rate: float = 0.01
    optimizer: str = "adam"
    client_threads: int = 1
    seed: int = 42
    # Outputs
    output_dir: str = "outputs"
    # Edge deployment: faults and resumable server (issue 5)
    min_train_replies: int = 1
    resume_from: str = ""

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> Settings:
        """Read Flower's ``run_config`` (kebab-case keys); raise :class:`SettingsError`."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, value in run_config.items():
            name = key.replace("-", "_")
            if name not in fields:
                allowed = ", ".join(sorted(n.replace("_", "-") for n in fields))
                raise SettingsError(f"unknown run-config key '{key}'; known keys: {allowed}")
            values[name] = _coerce(key, value, fields[name].type)
        settings = cls(**values)
        settings.validate()
        return settings

    def to_run_config(self) -> dict[str, Any]:
        """The inverse of :meth:`from_run_config`: kebab-case keys, plain values."""
        return {k.replace("_", "-"): v for k, v in dataclasses.asdict(self).items()}

    def validate(self) -> None:
        """Raise :class:`SettingsError` for the first value the app cannot run with."""
        _at_least("num-server-rounds", self.num_server_rounds, 1)
        for key, value in (("fraction-train", self.fraction_train),
                           ("fraction-evaluate", self.fraction_evaluate)):
            if not 0.0 < value <= 1.0:
                raise SettingsError(f"{key} must be in (0, 1], got {value}")
        _at_least("min-train-clients", self.min_train_clients, 1)
        _at_least("min-evaluate-clients", self.min_evaluate_clients, 0)
        _at_least("min-available-clients", self.min_available_clients, 1)
        if self.round_timeout <= 0:
            raise SettingsError(f"round-timeout must be > 0 seconds, got {self.round_timeout}")
        self._validate_strategy()
        self._validate_data()
        from fl_app.models import MODELS

        _one_of("model", self.model, tuple(MODELS))
        _one_of("optimizer", self.optimizer, OPTIMIZERS)
        _at_least("local-epochs", self.local_epochs, 1)
        _at_least("batch-size", self.batch_size, 1)
        _at_least("client-threads", self.client_threads, 1)
        if not self.learning_rate > 0:
            raise SettingsError(f"learning-rate must be > 0, got {self.learning_rate}")
        if self.proximal_mu < 0:
            raise SettingsError(f"proximal-mu must be >= 0, got {self.proximal_mu}")
        if not self.output_dir:
            raise SettingsError("output-dir must not be empty")
        self._validate_deployment()

    def _validate_deployment(self) -> None:
        # resume-from is checked by the server when it loads the checkpoint (fl_app.checkpoint):
        # the clients parse the same run config and do not hold the server's run directory.
        _at_least("min-train-replies", self.min_train_replies, 1)

    def _validate_strategy(self) -> None:
        from strategies.registry import StrategyNameError, check_strategy_name

        try:
            check_strategy_name(self.strategy)
        except StrategyNameError as err:
            raise SettingsError(f"strategy: {err}") from err
        if self.server_learning_rate <= 0:
            raise SettingsError(
                f"server-learning-rate must be > 0, got {self.server_learning_rate}"
            )
        if not 0.0 <= self.server_momentum < 1.0:
            raise SettingsError(f"server-momentum must be in [0, 1), got {self.server_momentum}")

    def _validate_data(self) -> None:
        _one_of("dataset", self.dataset, DATASETS)
        _one_of("partitioner", self.partitioner, PARTITIONERS)
        if not self.dirichlet_alpha > 0:
            raise SettingsError(f"dirichlet-alpha must be > 0, got {self.dirichlet_alpha}")
        _at_least("shards-per-client", self.shards_per_client, 1)
        _at_least("num-partitions", self.num_partitions, 1)
        for key, value in (("test-fraction", self.test_fraction),
                           ("server-test-fraction", self.server_test_fraction)):
            if not 0.0 <= value < 1.0:
                raise SettingsError(f"{key} must be in [0, 1), got {value}")
        _at_least("synthetic-classes", self.synthetic_classes, 2)
        _at_least("synthetic-features", self.synthetic_features, 1)
        _at_least("synthetic-samples-per-client", self.synthetic_samples_per_client, 2)
        if self.dataset == "huggingface" and not self.hf_dataset:
            raise SettingsError(
                "hf-dataset must name a Hugging Face data set (e.g. 'ylecun/mnist') "
                "when dataset='huggingface'"
            )
        if self.dataset == "local-file":
            # An empty data-path is the deployment case: every SuperNode names its own file
            # (--node-config "data-path='...'") and reports a missing or bad one in its reply.
            if self.data_path:
                first = Path(self.data_path.replace("{partition-id}", "0")).expanduser()
                if first.suffix.lower() not in (".npz", ".csv"):
                    raise SettingsError(
                        f"data-path must end in .npz or .csv, got '{self.data_path}'"
                    )
                if not first.is_file():
                    raise SettingsError(f"data-path '{self.data_path}' does not exist ({first})")
            if self.num_classes < 2 or not self.input_shape:
                raise SettingsError(
                    "dataset='local-file' needs num-classes (>= 2) and input-shape (e.g. '64' or "
                    f"'8,8,1') so that every node builds the same model; got num-classes="
                    f"{self.num_classes}, input-shape='{self.input_shape}'"
                )
        if self.num_classes < 0:
            raise SettingsError(f"num-classes must be >= 0 (0: from the data set), got {self.num_classes}")
        self.parsed_input_shape()

    def parsed_input_shape(self) -> tuple[int, ...] | None:
        """``input-shape`` as a tuple of ints, or None when the data set decides."""
        if not self.input_shape:
            return None
        try:
            shape = tuple(int(part) for part in self.input_shape.split(","))
        except ValueError:
            shape = ()
        if not shape or min(shape) < 1:
            raise SettingsError(
                f"input-shape must be positive integers separated by commas (e.g. '8,8,1'), "
                f"got '{self.input_shape}'"
            )
        return shape


def _coerce(key: str, value: Any, annotation: str | type) -> Any:
    """Check one raw config value against the field's type (TOML gives int, float, str, bool)."""
    kind = annotation if isinstance(annotation, str) else annotation.__name__
    if kind == "bool":
        if isinstance(value, bool):
            return value
    elif kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif kind == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise SettingsError(f"{key} must be a finite number, got {value}")
            return float(value)
    elif kind == "str":
        if isinstance(value, str):
            return value
    raise SettingsError(f"{key} must be of type {kind}, got {value!r} ({type(value).__name__})")


def _at_least(key: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise SettingsError(f"{key} must be >= {minimum}, got {value}")


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise SettingsError(f"{key} must be one of {', '.join(allowed)}; got '{value}'")
