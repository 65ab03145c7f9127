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
from typing import TYPE_CHECKING, Any

from fl_app.config.choices import (
    ATTACK_NAMES,
    DATASETS,
    EXPORT_FORMATS,
    MODEL_NAMES,
    OPTIMIZERS,
    PARTITIONERS,
    TFLITE_TYPES,
    parse_choices,
    select_attackers,
)

if TYPE_CHECKING:
    from strategies.compression.codecs import Codec


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
    server_learning_rate: float = 1.0
    server_momentum: float = 0.0
    fedopt_eta: float = 0.1
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
    # Robust aggregation (strategies.aggregation.strategy): rules, pre-aggregation, client weights
    aggregation_rule: str = "mean"
    trimmed_mean_beta: float = 0.2
    krum_f: int = 1
    multi_krum_m: int = 0
    bulyan_f: int = 1
    geometric_median_iterations: int = 100
    centered_clipping_tau: float = 1.0
    centered_clipping_iterations: int = 3
    client_weighting: str = "uniform"
    weight_cap_ratio: float = 2.0
    max_update_norm: float = 0.0
    norm_bound: float = 0.0
    norm_bound_quantile: float = 0.0
    min_valid_replies: int = 1
    # Simulated attacks (fl_app.attacks.catalogue), simulation only
    attack: str = "none"
    attack_fraction: float = 0.0
    attack_ids: str = ""
    attack_scale: float = 10.0
    attack_noise_std: float = 1.0
    alie_z: float = 0.0
    ipm_epsilon: float = 0.5
    # Model delivery: export for on-device inference, check before shipping (fl_app.delivery)
    export: str = ""
    export_tflite_types: str = "float32,int8"
    export_best: bool = False
    export_tolerance: float = 0.01
    export_calibration_samples: int = 200
    export_check_fraction: float = 1.0
    # Differential privacy and secure aggregation (strategies.private.dp_fedavg, fl_app.client.update_privacy,
    # fl_app.task.dp_sgd, fl_app.secagg.server)
    dp_mode: str = "central"
    dp_noise_multiplier: float = 1.0
    dp_clip_norm: float = 1.0
    dp_clip_quantile: float = 0.0
    dp_clip_learning_rate: float = 0.2
    dp_clip_count_noise: float = 0.0
    dp_sampling: str = "poisson"
    dp_delta: float = 1e-5
    dp_accounting: str = "rdp"
    dp_target_epsilon: float = 0.0
    dp_local_epsilon: float = 1.0
    dp_sgd_noise_multiplier: float = 0.0
    dp_sgd_l2_clip: float = 1.0
    dp_sgd_microbatches: int = 0
    dp_sgd_vectorized: bool = True
    secure_aggregation: bool = False
    secagg_num_shares: int = 3
    secagg_reconstruction_threshold: int = 2
    secagg_clipping_range: float = 8.0
    secagg_quantization_range: int = 4194304
    fault_partition_ids: str = ""
    fault_round: int = 0
    # Edge deployment: injected faults and a resumable server (fl_app.server.checkpoint)
    min_train_replies: int = 1
    resume_from: str = ""
    # Fast simulation and compressed updates (fl_app.client.compression, fl_app.server.polling)
    centralized_evaluation: bool = True
    compression: str = "none"
    compression_topk_fraction: float = 0.01
    compression_mask_fraction: float = 0.01
    compression_mask_rescale: bool = True
    compression_int8_block: int = 4096
    compression_error_feedback: bool = True
    # Encrypted aggregation (strategies.encrypted.strategy, strategies.encrypted.schemes)
    homomorphic_encryption: str = "none"
    he_public_key_path: str = ""
    he_secret_key_path: str = ""
    he_client_weighting: str = "num-examples"
    he_clip_norm: float = 0.0
    he_ckks_poly_degree: int = 8192
    he_ckks_scale_bits: int = 40
    he_paillier_key_bits: int = 3072
    # Server-side aggregation speed: BLAS threads of the rules (strategies.aggregation.strategy)
    aggregation_threads: int = 1

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
        for key, value in (("fraction-train", self.fraction_train), ("fraction-evaluate", self.fraction_evaluate)):
            if not 0.0 < value <= 1.0:
                raise SettingsError(f"{key} must be in (0, 1], got {value}")
        _at_least("min-train-clients", self.min_train_clients, 1)
        _at_least("min-evaluate-clients", self.min_evaluate_clients, 0)
        _at_least("min-available-clients", self.min_available_clients, 1)
        if self.round_timeout <= 0:
            raise SettingsError(f"round-timeout must be > 0 seconds, got {self.round_timeout}")
        self._validate_strategy()
        self._validate_data()
        self._validate_robust()
        self._validate_attack()
        self._validate_privacy()
        self._validate_compression()
        self._validate_encryption()
        _one_of("model", self.model, MODEL_NAMES)
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
        self._validate_export()
        self._validate_deployment()
        self._validate_aggregation_speed()

    def _validate_aggregation_speed(self) -> None:
        _at_least("aggregation-threads", self.aggregation_threads, 0)

    def _validate_deployment(self) -> None:
        # resume-from is checked by the server when it loads the checkpoint (fl_app.server.checkpoint):
        # the clients parse the same run config and do not hold the server's run directory.
        _at_least("min-train-replies", self.min_train_replies, 1)

    def _validate_strategy(self) -> None:
        from strategies.registry import StrategyNameError, check_strategy_name

        try:
            check_strategy_name(self.strategy)
        except StrategyNameError as err:
            raise SettingsError(f"strategy: {err}") from err
        if self.server_learning_rate <= 0:
            raise SettingsError(f"server-learning-rate must be > 0, got {self.server_learning_rate}")
        if not 0.0 <= self.server_momentum < 1.0:
            raise SettingsError(f"server-momentum must be in [0, 1), got {self.server_momentum}")
        if self.fedopt_eta <= 0:
            raise SettingsError(f"fedopt-eta must be > 0, got {self.fedopt_eta}")

    def _validate_robust(self) -> None:
        from strategies.aggregation.strategy import WEIGHTINGS, build_aggregation_strategy
        from strategies.registry import ROBUST_STRATEGIES, StrategyNameError

        _one_of("client-weighting", self.client_weighting, WEIGHTINGS)
        if self.weight_cap_ratio <= 0:
            raise SettingsError(f"weight-cap-ratio must be > 0, got {self.weight_cap_ratio}")
        for key in ("max-update-norm", "norm-bound"):
            value = getattr(self, key.replace("-", "_"))
            if value < 0:
                raise SettingsError(f"{key} must be >= 0 (0: off), got {value}")
        if not 0.0 <= self.norm_bound_quantile <= 1.0:
            raise SettingsError(f"norm-bound-quantile must be in [0, 1] (0: off), got {self.norm_bound_quantile}")
        _at_least("min-valid-replies", self.min_valid_replies, 1)
        if self.strategy in ROBUST_STRATEGIES:
            rule = self.aggregation_rule if self.strategy == "robust" else self.strategy
            try:  # builds the rule with its parameters and checks n against it (e.g. n > 2f + 2)
                build_aggregation_strategy(rule, self.to_run_config())
            except (ValueError, StrategyNameError) as err:
                raise SettingsError(f"strategy '{self.strategy}': {err}") from err

    def _validate_attack(self) -> None:
        for name in self.attack_names():
            _one_of("attack", name, ("none", *ATTACK_NAMES))
        if not 0.0 <= self.attack_fraction < 1.0:
            raise SettingsError(f"attack-fraction must be in [0, 1), got {self.attack_fraction}")
        self.attackers()
        if self.attack_scale <= 0 or self.attack_noise_std <= 0 or self.ipm_epsilon <= 0:
            raise SettingsError(
                "attack-scale, attack-noise-std and ipm-epsilon must be > 0, got "
                f"{self.attack_scale}, {self.attack_noise_std}, {self.ipm_epsilon}"
            )
        if self.alie_z < 0:
            raise SettingsError(f"alie-z must be >= 0 (0: from the paper's formula), got {self.alie_z}")

    def _validate_privacy(self) -> None:
        from strategies.private.accounting import METHODS, SAMPLINGS
        from strategies.private.dp_fedavg import DP_MODES

        _one_of("dp-mode", self.dp_mode, DP_MODES)
        _one_of("dp-sampling", self.dp_sampling, SAMPLINGS)
        _one_of("dp-accounting", self.dp_accounting, METHODS)
        for key in ("dp-noise-multiplier", "dp-target-epsilon", "dp-clip-count-noise", "dp-sgd-noise-multiplier"):
            value = getattr(self, key.replace("-", "_"))
            if value < 0:
                raise SettingsError(f"{key} must be >= 0, got {value}")
        for key in (
            "dp-clip-norm",
            "dp-clip-learning-rate",
            "dp-local-epsilon",
            "dp-sgd-l2-clip",
            "secagg-clipping-range",
        ):
            value = getattr(self, key.replace("-", "_"))
            if not value > 0:
                raise SettingsError(f"{key} must be > 0, got {value}")
        if not 0.0 <= self.dp_clip_quantile <= 1.0:
            raise SettingsError(f"dp-clip-quantile must be in [0, 1] (0: fixed clipping), got {self.dp_clip_quantile}")
        if not 0.0 < self.dp_delta < 1.0:
            raise SettingsError(f"dp-delta must be in (0, 1), got {self.dp_delta}")
        _at_least("dp-sgd-microbatches", self.dp_sgd_microbatches, 0)
        if self.dp_sgd_microbatches and self.batch_size % self.dp_sgd_microbatches:
            raise SettingsError(
                f"dp-sgd-microbatches ({self.dp_sgd_microbatches}) must divide batch-size ({self.batch_size})"
            )
        if self.dp_sgd_noise_multiplier > 0 and self.proximal_mu > 0:
            raise SettingsError("DP-SGD (dp-sgd-noise-multiplier > 0) cannot be combined with proximal-mu > 0")
        _at_least("fault-round", self.fault_round, 0)
        self.fault_partitions()
        if self.strategy == "dp-fedavg":
            from strategies.private.dp_fedavg import build_dp_strategy

            try:  # refuses combinations whose epsilon cannot be honestly reported
                build_dp_strategy(self.to_run_config(), noise_multiplier=self.dp_noise_multiplier)
            except ValueError as err:
                raise SettingsError(f"strategy 'dp-fedavg': {err}") from err
        if self.secure_aggregation:
            from fl_app.config.secagg_checks import check_secure_aggregation

            try:
                check_secure_aggregation(self)
            except ValueError as err:
                raise SettingsError(str(err)) from err

    def fault_partitions(self) -> frozenset[int]:
        """Partition ids whose client raises in round ``fault-round`` (fault injection for tests)."""
        try:
            ids = frozenset(int(i) for i in self.fault_partition_ids.split(",") if i.strip())
        except ValueError as err:
            raise SettingsError(
                f"fault-partition-ids must be partition ids separated by commas, got '{self.fault_partition_ids}'"
            ) from err
        bad = sorted(i for i in ids if not 0 <= i < self.num_partitions)
        if bad:
            raise SettingsError(f"fault-partition-ids {bad} are not in [0, num-partitions = {self.num_partitions})")
        return ids

    def _validate_compression(self) -> None:
        from strategies.compression.codecs import CODECS, make_codec
        from strategies.registry import ROBUST_STRATEGIES

        _one_of("compression", self.compression, tuple(CODECS))
        try:  # every codec, so that a bad parameter fails even while its codec is not chosen
            for name in CODECS:
                make_codec(
                    name,
                    topk_fraction=self.compression_topk_fraction,
                    mask_fraction=self.compression_mask_fraction,
                    mask_rescale=self.compression_mask_rescale,
                    int8_block=self.compression_int8_block,
                )
        except ValueError as err:
            raise SettingsError(str(err)) from err
        if self.compression != "none" and ":" not in self.strategy and self.strategy not in ROBUST_STRATEGIES:
            raise SettingsError(
                f"compression='{self.compression}' needs one of our aggregation strategies, which "
                f"decode uploads before aggregating ({', '.join(ROBUST_STRATEGIES)}; "
                f"strategy='robust' aggregation-rule='mean' client-weighting='num-examples' is FedAvg); "
                f"got strategy '{self.strategy}'"
            )

    def _validate_encryption(self) -> None:
        from strategies.encrypted.schemes import HE_STANDARD_MAX_COEFF_BITS
        from strategies.encrypted.strategy import HE_WEIGHTINGS, EncryptionConfigError, check_encryption_compatible

        _one_of("he-client-weighting", self.he_client_weighting, HE_WEIGHTINGS)
        if self.he_clip_norm < 0:
            raise SettingsError(f"he-clip-norm must be >= 0 (0: off), got {self.he_clip_norm}")
        degrees = sorted(HE_STANDARD_MAX_COEFF_BITS[128])
        if self.he_ckks_poly_degree not in degrees:
            raise SettingsError(
                f"he-ckks-poly-degree must be one of {', '.join(map(str, degrees))}; got {self.he_ckks_poly_degree}"
            )
        if not 20 <= self.he_ckks_scale_bits <= 60:
            raise SettingsError(f"he-ckks-scale-bits must be in [20, 60], got {self.he_ckks_scale_bits}")
        if self.he_paillier_key_bits < 2048 or self.he_paillier_key_bits % 2:
            raise SettingsError(
                "he-paillier-key-bits must be even and >= 2048 (112-bit security; 3072 gives 128-bit), "
                f"got {self.he_paillier_key_bits}"
            )
        try:
            check_encryption_compatible(self.to_run_config())
        except EncryptionConfigError as err:
            raise SettingsError(str(err)) from err

    def attack_names(self) -> tuple[str, ...]:
        """``attack`` split at commas: attacker j (in partition-id order) runs name j mod len."""
        return tuple(name.strip() for name in self.attack.split(",") if name.strip()) or ("none",)

    def attack_of(self, partition_id: int) -> str:
        """The attack partition ``partition_id`` runs, or 'none' for an honest client."""
        attackers = sorted(self.attackers())
        if partition_id not in attackers:
            return "none"
        names = self.attack_names()
        return names[attackers.index(partition_id) % len(names)]

    def attackers(self) -> frozenset[int]:
        """Partition ids of the simulated Byzantine clients (empty when attack='none')."""
        if self.attack_names() == ("none",):
            return frozenset()
        try:
            ids = [int(i) for i in self.attack_ids.split(",") if i.strip()] if self.attack_ids else None
        except ValueError as err:
            raise SettingsError(
                f"attack-ids must be partition ids separated by commas, got '{self.attack_ids}'"
            ) from err
        fraction = self.attack_fraction if ids is None else None
        try:
            return select_attackers(self.num_partitions, fraction=fraction, ids=ids, seed=self.seed)
        except ValueError as err:
            raise SettingsError(str(err)) from err

    def _validate_data(self) -> None:
        _one_of("dataset", self.dataset, DATASETS)
        _one_of("partitioner", self.partitioner, PARTITIONERS)
        if not self.dirichlet_alpha > 0:
            raise SettingsError(f"dirichlet-alpha must be > 0, got {self.dirichlet_alpha}")
        _at_least("shards-per-client", self.shards_per_client, 1)
        _at_least("num-partitions", self.num_partitions, 1)
        for key, value in (("test-fraction", self.test_fraction), ("server-test-fraction", self.server_test_fraction)):
            if not 0.0 <= value < 1.0:
                raise SettingsError(f"{key} must be in [0, 1), got {value}")
        _at_least("synthetic-classes", self.synthetic_classes, 2)
        _at_least("synthetic-features", self.synthetic_features, 1)
        _at_least("synthetic-samples-per-client", self.synthetic_samples_per_client, 2)
        if self.dataset == "huggingface" and not self.hf_dataset:
            raise SettingsError(
                "hf-dataset must name a Hugging Face data set (e.g. 'ylecun/mnist') when dataset='huggingface'"
            )
        if self.dataset == "local-file":
            # An empty data-path is the deployment case: every SuperNode names its own file
            # (--node-config "data-path='...'") and reports a missing or bad one in its reply.
            if self.data_path:
                first = Path(self.data_path.replace("{partition-id}", "0")).expanduser()
                if first.suffix.lower() not in (".npz", ".csv"):
                    raise SettingsError(f"data-path must end in .npz or .csv, got '{self.data_path}'")
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

    def _validate_export(self) -> None:
        self.export_formats()
        self.export_tflite_variants()
        if not 0.0 <= self.export_tolerance <= 1.0:
            raise SettingsError(
                f"export-tolerance must be in [0, 1] (accuracy, 0.01 = one point), got {self.export_tolerance}"
            )
        _at_least("export-calibration-samples", self.export_calibration_samples, 1)
        if not 0.0 < self.export_check_fraction <= 1.0:
            raise SettingsError(f"export-check-fraction must be in (0, 1], got {self.export_check_fraction}")

    def export_formats(self) -> tuple[str, ...]:
        """``export`` as a tuple of formats (``keras``, ``savedmodel``, ``tflite``); () for none."""
        try:
            return parse_choices("export", self.export, EXPORT_FORMATS)
        except ValueError as err:
            raise SettingsError(str(err)) from err

    def export_tflite_variants(self) -> tuple[str, ...]:
        """``export-tflite-types`` as a tuple (``float32``, ``int8``); never empty with TFLite export."""
        try:
            variants = parse_choices("export-tflite-types", self.export_tflite_types, TFLITE_TYPES)
        except ValueError as err:
            raise SettingsError(str(err)) from err
        if not variants and "tflite" in self.export_formats():
            raise SettingsError("export-tflite-types must name float32, int8 or both when export includes tflite")
        return variants

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
                f"input-shape must be positive integers separated by commas (e.g. '8,8,1'), got '{self.input_shape}'"
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
    elif kind == "str" and isinstance(value, str):
        return value
    raise SettingsError(f"{key} must be of type {kind}, got {value!r} ({type(value).__name__})")


def _at_least(key: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise SettingsError(f"{key} must be >= {minimum}, got {value}")


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise SettingsError(f"{key} must be one of {', '.join(allowed)}; got '{value}'")


def codec_from_settings(settings: Settings) -> Codec:
    """The codec that ``compression`` and its parameters select."""
    from strategies.compression.codecs import make_codec

    return make_codec(
        settings.compression,
        topk_fraction=settings.compression_topk_fraction,
        mask_fraction=settings.compression_mask_fraction,
        mask_rescale=settings.compression_mask_rescale,
        int8_block=settings.compression_int8_block,
    )
