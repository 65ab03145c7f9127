"""The run config, read once into a typed and validated object.

Flower hands every app a flat ``run_config`` mapping of kebab-case keys (``[tool.flwr.app.config]``
in ``pyproject.toml``, overridden with ``flwr run -c "key=value"``). :class:`Settings` turns it into
one frozen dataclass whose fields are the same keys in snake case, with every key's default, meaning
and allowed values. Every bad value fails here, before any training, with a :class:`SettingsError`
that names the key, the value and what is allowed.

The server (and the tools) validate everything, building the configured strategy once to check it
(:meth:`Settings.from_run_config`); a ClientApp validates the types and the keys it uses itself
(:meth:`Settings.client_from_run_config`) and never builds a server strategy. The typed parameter
objects of :mod:`strategies` (:meth:`Settings.sampling_params`, :meth:`Settings.aggregation_params`,
:meth:`Settings.dp_params`, :meth:`Settings.encryption_params`, :meth:`Settings.strategy_params`) are
built here only: this module is the one bridge from the run config to the strategies.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeVar

from fl_app.config.choices import (
    ATTACK_NAMES,
    ATTACK_PERTURBATIONS,
    DATASETS,
    EXPORT_FORMATS,
    FLOWER_MEANS,
    MODEL_NAMES,
    OPTIMIZERS,
    PARTITIONERS,
    REJECTED_ATTACKS,
    TASK_CHOICES,
    TFLITE_TYPES,
    parse_choices,
    select_attackers,
)

if TYPE_CHECKING:
    from strategies.aggregation.strategy import AggregationParams, RuleParams
    from strategies.compression.codecs import Codec
    from strategies.core.sampling import SamplingParams
    from strategies.encrypted.strategy import EncryptionParams
    from strategies.private.dp_fedavg import DpParams
    from strategies.registry import StrategyParams
    from strategies.robust.tolerance import DerivedParams

T = TypeVar("T")

Allowed = str | Callable[[], str]
"""What a key allows: text, or a function that reads it from a :mod:`strategies` constant (those
modules are imported only when the reference is written, not with the settings)."""


class SettingsError(ValueError):
    """A run-config value that the app cannot run with."""


class ToleranceWarning(UserWarning):
    """More simulated attackers reach the rule than it tolerates, and ``attack-allow-excess`` lets it run."""


def _choices(values: Any) -> str:
    return ", ".join(f"`{value}`" for value in values)


def _lazy_choices(module: str, name: str, suffix: str = "") -> Callable[[], str]:
    """The choices in constant ``module.name``, read when asked for."""

    def allowed() -> str:
        return _choices(getattr(importlib.import_module(module), name)) + suffix

    return allowed


def _ckks_degrees() -> str:
    from strategies.encrypted.security import HE_STANDARD_MAX_COEFF_BITS

    return ", one of " + _choices(sorted(HE_STANDARD_MAX_COEFF_BITS[128]))


def _number(value: float) -> str:
    """A bound as the docs and the errors write it: ``1000000``, ``0.5``, ``1e-05``."""
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e16 else f"{value:g}"


@dataclasses.dataclass(frozen=True)
class Range:
    """The interval a numeric key must lie in: both bounds, each closed unless marked open.

    It is the key's one range check (:meth:`Settings.parse`) and the start of its ``allowed`` text
    in ``docs/run-config.md``; ``note`` adds a condition that depends on other keys, checked with
    them (e.g. ``, divides `batch-size```).
    """

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False
    note: Allowed = ""

    def __contains__(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def interval(self) -> str:
        """``[low, high]``, ``(low, high]``, ... with the bounds written out."""
        opening, closing = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"{opening}{_number(self.low)}, {_number(self.high)}{closing}"

    def text(self) -> str:
        """The interval and the note: what ``docs/run-config.md`` says the key allows."""
        note = self.note() if callable(self.note) else self.note
        return self.interval() + note

    def check(self, key: str, value: Any) -> None:
        """Raise :class:`SettingsError` naming ``key``, ``value`` and the interval unless it holds ``value``."""
        if value not in self:
            raise SettingsError(f"{key} must be in {self.interval()}, got {value!r}")


MANY_CLIENTS = 1_000_000
"""The most clients any count may name (nodes, per-round minimums, Byzantine f, key shares, replies): a cross-device
federation of a million devices; a larger count is a typo that makes the server wait or allocate
for clients that do not exist."""
MAX_ROUNDS = 100_000
"""The most rounds (and the last fault round): more than a day of one-second rounds."""
MAX_NORM = 1e6
"""The largest L2 norm any clip or bound may name: orders of magnitude above the norm of a trained
model's update, and far from float32's overflow once noise or a server step multiplies it."""
MAX_RATE = 1e3
"""The largest learning rate or step size (local, server, FedOpt): far above any that trains (1e-4
to 1 in practice); a larger one only overflows float32 weights."""
MAX_ITERATIONS = 1_000
"""The most iterations of an aggregation rule, each a pass over the K x P update matrix: the
papers use 1 to 10 (centered clipping) and tens (Weiszfeld); more stalls the server's round."""
MAX_THREADS = 1024
"""The most threads a process may ask for: above the cores of any machine this runs on; a count far
beyond it makes TensorFlow's thread pools fail to start (``client-threads=1e12`` failed every message)."""
MAX_NOISE = 1e3
"""The largest noise multiplier: epsilon is already near 0 far below it."""
MAX_SEED = 2**32 - 1
"""NumPy's and TensorFlow's seeds are unsigned 32-bit integers."""
MAX_SAMPLES = 100_000
"""The most examples a client, or the calibration of int8 export, may ask for."""
DAY = 86_400.0
"""Seconds in a day, the longest wait for one round."""
MAX_SYNTHETIC_VALUES = 2**28
"""The most float32 values of the ``synthetic`` pool (1 GiB), which every process generates whole."""
SYNTHETIC_NOTE = (
    ", and the pool (x `num-partitions` / (1 - `server-test-fraction`) x `synthetic-features`) at most 2**28 values"
)


def _key(default: Any, allowed: Allowed | Range, meaning: str) -> Any:
    """A run-config key: its default, what it allows and its meaning (``docs/run-config.md``).

    A numeric key allows a :class:`Range`, which :meth:`Settings.parse` checks and the docs print.
    """
    return dataclasses.field(default=default, metadata={"allowed": allowed, "help": meaning})


def allowed_of(field: dataclasses.Field) -> str:
    """What the key of Settings field ``field`` allows, as text."""
    allowed = field.metadata["allowed"]
    if isinstance(allowed, Range):
        return allowed.text()
    return allowed() if callable(allowed) else allowed


def range_of(field: dataclasses.Field) -> Range | None:
    """The range of the numeric key of Settings field ``field`` (None for other keys)."""
    allowed = field.metadata["allowed"]
    return allowed if isinstance(allowed, Range) else None


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every run-config key of the app (kebab-case in the config, snake_case here).

    Each field's default is the key's one default (``pyproject.toml`` repeats it, a test checks);
    its metadata holds the key's meaning and what it allows (``docs/run-config.md`` is written from
    them by :mod:`fl_app.config.reference`).
    """

    # Rounds and sampling
    num_server_rounds: int = _key(10, Range(1, MAX_ROUNDS), "rounds of federated training")
    fraction_train: float = _key(
        1.0, Range(0.0, 1.0, low_open=True), "fraction of connected clients sampled for training each round"
    )
    fraction_evaluate: float = _key(1.0, Range(0.0, 1.0, low_open=True), "fraction sampled for federated evaluation")
    min_train_clients: int = _key(
        2, Range(1, MANY_CLIENTS, note=", at most `num-partitions`"), "never sample fewer clients for training"
    )
    min_evaluate_clients: int = _key(
        2, Range(0, MANY_CLIENTS, note=", at most `num-partitions`"), "never sample fewer clients for evaluation"
    )
    min_available_clients: int = _key(
        2,
        Range(1, MANY_CLIENTS, note=", at most `num-partitions`"),
        "wait until this many clients are connected",
    )
    round_timeout: float = _key(
        600.0,
        Range(1.0, DAY),
        "seconds to wait for replies in a round (under a second no reply arrives; at most a day)",
    )
    # Strategy
    strategy: str = _key(
        "fedavg",
        "a registered name or `package.module:Name`",
        "Flower's `fedavg`, `fedprox`, `fedadam`, `fedyogi`, `fedadagrad`, `fedavgm`; our robust `median`, `trimmed-mean`, `krum`, `multi-krum`, `bulyan`, `geometric-median`, `centered-clipping`, `dnc`, `robust` (rule from `aggregation-rule`); `dp-fedavg` (differentially private FedAvg); `dp-ftrl` (DP-FTRL, tree aggregation without sampling); or `package.module:Name`",
    )
    proximal_mu: float = _key(
        0.0,
        Range(0.0, 100.0),
        "FedProx proximal term mu (sent by `fedprox`; also the clients' default); the paper tunes it in [0.001, 1]",
    )
    server_learning_rate: float = _key(
        1.0,
        Range(0.0, MAX_RATE, low_open=True),
        "server step size eta of FedAvgM and of our aggregation strategies (w <- w + eta m)",
    )
    server_momentum: float = _key(
        0.0,
        Range(0.0, 1.0, high_open=True),
        "server momentum beta of FedAvgM and of our aggregation strategies (m <- beta m + v)",
    )
    fedopt_eta: float = _key(
        0.1, Range(0.0, MAX_RATE, low_open=True), "server learning rate eta of FedAdam, FedYogi, FedAdagrad"
    )
    # Data
    dataset: str = _key(
        "digits",
        _choices(DATASETS) + " or `package.module:load`",
        "`digits` (bundled), `synthetic`, `local-file` (each node's own file), `huggingface` (needs the network), or a user's loader `package.module:load` returning the pool `(x, y)` (docs/models.md)",
    )
    task: str = _key(
        "auto",
        _choices(TASK_CHOICES),
        "what the model predicts: `auto` infers it from the targets (integers: multiclass, 0/1: binary, 0/1 rows: one-hot or multilabel, other numbers: regression); name it for integer regression targets, or with `local-file`",
    )
    partitioner: str = _key(
        "dirichlet",
        _choices(PARTITIONERS),
        "`iid`, `dirichlet` (label skew), `shards` (pathological, McMahan et al. 2017)",
    )
    dirichlet_alpha: float = _key(
        0.5,
        Range(1e-3, 1e3),
        "Dirichlet concentration; smaller is more skewed (0.001: about one label per client; 1000: IID)",
    )
    shards_per_client: int = _key(
        2, Range(1, 1000), "label-sorted shards per client with `shards` (more than the examples leaves shards empty)"
    )
    num_partitions: int = _key(
        10, Range(1, MANY_CLIENTS), "clients the data is split among (`fl-keras-run --clients` sets it)"
    )
    test_fraction: float = _key(
        0.2, Range(0.0, 1.0, high_open=True), "share of each client's data kept as its test split"
    )
    server_test_fraction: float = _key(
        0.2,
        Range(0.0, 0.9),
        "share of the pool held out (stratified) as the server's test set (at most 0.9: a tenth is left to the clients)",
    )
    synthetic_classes: int = _key(10, Range(2, 1000), "classes of the `synthetic` data set")
    synthetic_features: int = _key(32, Range(1, MAX_SAMPLES), "features of the `synthetic` data set")
    synthetic_samples_per_client: int = _key(
        200, Range(2, MAX_SAMPLES, note=SYNTHETIC_NOTE), "examples per client of the `synthetic` data set"
    )
    hf_dataset: str = _key(
        "", "a data set name (required with `huggingface`)", "Hugging Face data set name with `dataset='huggingface'`"
    )
    hf_label_column: str = _key("label", "a column name", "its label column")
    data_path: str = _key(
        "",
        "a `.npz` or `.csv` path, or empty",
        "`.npz` (arrays `x`, `y`) or CSV file with `dataset='local-file'`; `{partition-id}` is replaced by the node's partition id; a node's `--node-config \"data-path='…'\"` overrides it",
    )
    label_column: str = _key(
        "label", "a column name, or names separated by commas", "the target column(s) of a CSV data file"
    )
    num_classes: int = _key(
        0,
        Range(0, MAX_SAMPLES, note=" (>= 2 with `local-file`, >= 1 for its `multilabel` or `regression`)"),
        "classes of the model (labels with `task='multilabel'`, targets with `task='regression'`); 0 takes them from the data set (required for `local-file`)",
    )
    input_shape: str = _key(
        "",
        "positive integers separated by commas, or empty",
        'model input shape, e.g. `64` or `8,8,1`; "" takes it from the data set (required for `local-file`)',
    )
    # Model and local training
    model: str = _key(
        "mlp",
        _choices(MODEL_NAMES) + ", `package.module:build` or a `.keras`/`.h5` file",
        "`mlp` (128-64 ReLU), `cnn` (conv32-conv64-pool-dense128, images only), `logreg`, a user's factory `package.module:build` (`build(input_shape, output_spec) -> tf.keras.Model`), or a saved `tf.keras` model file (docs/models.md)",
    )
    local_epochs: int = _key(
        5, Range(1, 1000), "epochs of local training per round (1000 already makes a round take hours)"
    )
    batch_size: int = _key(32, Range(1, 65536), "local batch size (65536: larger than any client's data set here)")
    learning_rate: float = _key(0.01, Range(0.0, MAX_RATE, low_open=True), "local learning rate")
    optimizer: str = _key("adam", _choices(OPTIMIZERS), "local optimizer: `adam` or `sgd`")
    callbacks: str = _key(
        "",
        '"" or `package.module:make`',
        'Keras callbacks on every client: a factory `make(info) -> list[tf.keras.callbacks.Callback]`, called at every local fit with a `fl_app.task.callbacks.CallbackInfo` (round, partition, epochs, batch size, examples); local training then runs `model.fit` with them; "" trains with the compiled fast loop (docs/models.md)',
    )
    callbacks_validation_fraction: float = _key(
        0.0,
        Range(0.0, 0.5, high_open=True),
        "share of a client's training split held out as `model.fit`'s validation data for `callbacks` (e.g. `EarlyStopping(monitor='val_loss')`); 0: none",
    )
    client_threads: int = _key(
        1, Range(1, MAX_THREADS), "TensorFlow threads per client process (more than the cores only slows it)"
    )
    seed: int = _key(
        42,
        Range(0, MAX_SEED),
        "seeds data generation, partitioning, model initialisation and local shuffling (NumPy's 32-bit seeds)",
    )
    # Outputs
    output_dir: str = _key("outputs", "a non-empty path", "where run directories are written")
    # Experiment tracking (fl_app.server.tracking)
    tensorboard: bool = _key(
        True,
        "`true`, `false`",
        "write TensorBoard events into the run directory every round (metrics under their Keras names, epsilon, replies, bytes, a histogram of client update norms; `tensorboard --logdir outputs/`); no TensorFlow on the server for it",
    )
    mlflow_tracking_uri: str = _key(
        "",
        "empty, a local store (`file:./mlruns`) or a tracking server's `http(s)://` address",
        "log the run to MLflow (needs the `mlflow` extra: `uv sync --extra mlflow`): the run config as parameters, every round's metrics, the final model, history and summary as artifacts; empty: off",
    )
    mlflow_experiment: str = _key(
        "fl-keras", "a non-empty name", "the MLflow experiment the run is logged in (created when missing)"
    )
    # Robust aggregation (strategies.aggregation.strategy): rules, pre-aggregation, client weights
    aggregation_rule: str = _key(
        "mean",
        _lazy_choices("strategies.robust.rules", "RULES", " or `package.module:function`"),
        "the rule of `strategy='robust'`: `mean`, `median`, `trimmed-mean`, `krum`, `multi-krum`, `bulyan`, `geometric-median`, `centered-clipping`, `dnc`, or `package.module:function`",
    )
    byzantine_fraction: float = _key(
        0.2,
        Range(0.0, 0.5, high_open=True),
        "the fraction rho of Byzantine clients the robust rules assume: with a = floor(rho n) of the n clients per round, "
        "`krum-f`, `bulyan-f` and `trimmed-mean-beta` left at -1 become min(a, (n-3)//2), min(a, (n-3)//4) and "
        "min(a, (n-1)//2) / n, and Multi-Krum averages n - f",
    )
    trimmed_mean_beta: float = _key(
        -1.0,
        Range(-1.0, 0.5, high_open=True, note=": -1 or in [0, 0.5)"),
        "trimmed mean drops the floor(beta K + 1e-9) smallest and largest values per coordinate (beta = k/K trims k); "
        "-1: from `byzantine-fraction`",
    )
    krum_f: int = _key(
        -1,
        Range(-1, MANY_CLIENTS),
        "Byzantine clients Krum and Multi-Krum tolerate (n >= 2f + 3); -1: from `byzantine-fraction`",
    )
    multi_krum_m: int = _key(0, Range(0, MANY_CLIENTS), "updates Multi-Krum averages; 0: n - f")
    bulyan_f: int = _key(
        -1, Range(-1, MANY_CLIENTS), "Byzantine clients Bulyan tolerates (n >= 4f + 3); -1: from `byzantine-fraction`"
    )
    geometric_median_iterations: int = _key(
        100,
        Range(1, MAX_ITERATIONS),
        "Weiszfeld iterations (RFA, with Vardi-Zhang's step at a row); a row that is the exact median (its weight "
        "outweighs the others' pull) is returned exactly: checked for the row nearest the last iterate and for the "
        "heaviest row, and a row with half the weight or more is returned at once",
    )
    centered_clipping_tau: float = _key(
        1.0,
        Range(0.0, MAX_NORM, low_open=True),
        "clipping radius of centered clipping: tau itself if `centered-clipping-tau-quantile` is 0, else a multiple of that quantile of the distances to the centre",
    )
    centered_clipping_iterations: int = _key(
        3, Range(1, MAX_ITERATIONS), "iterations of centered clipping (Karimireddy et al. 2021 use 1 to 3)"
    )
    centered_clipping_tau_quantile: float = _key(
        0.5,
        Range(0.0, 1.0),
        "if > 0, the radius is `centered-clipping-tau` x this quantile of the updates' distances to the centre (the previous aggregate); 0: absolute tau",
    )
    centered_clipping_momentum: float = _key(
        0.0,
        Range(0.0, 1.0, high_open=True),
        "beta of the centre: c <- beta c + (1 - beta) v after each round (0: the centre is the previous aggregate, as in Karimireddy et al. 2021)",
    )
    dnc_f: int = _key(
        -1,
        Range(-1, MANY_CLIENTS),
        "Byzantine clients DnC assumes; it removes floor(c f) updates per iteration; -1: from `byzantine-fraction`",
    )
    dnc_iterations: int = _key(
        5, Range(1, MAX_ITERATIONS), "DnC's iterations, each on fresh random coordinates (Shejwalkar & Houmansadr 2021)"
    )
    dnc_dimension: int = _key(
        10000, Range(1, 100_000_000), "coordinates DnC samples per iteration (all of them if the model has fewer)"
    )
    dnc_filter_fraction: float = _key(
        1.0,
        Range(0.0, 100.0, low_open=True),
        "c of DnC: it removes floor(c f) updates per iteration (the paper uses 1)",
    )
    client_weighting: str = _key(
        "uniform",
        _lazy_choices("strategies.aggregation.strategy", "WEIGHTINGS"),
        "`uniform`, `num-examples` (FedAvg's, trusts the clients), `capped` (num-examples capped at `weight-cap-ratio` x median)",
    )
    weight_cap_ratio: float = _key(2.0, Range(0.0, 1e6, low_open=True), "the cap of `capped` weighting")
    max_update_norm: float = _key(0.0, Range(0.0, MAX_NORM), "reject updates with a larger L2 norm (0: off)")
    norm_bound: float = _key(
        0.0, Range(0.0, MAX_NORM), "clip every update to this L2 norm before the rule (0: off; Sun et al. 2019)"
    )
    norm_bound_quantile: float = _key(
        0.0,
        Range(0.0, 1.0),
        "if > 0, the bound follows this quantile of the update norms (geometric update of Andrew et al. 2021), starting at `norm-bound` (or 1.0)",
    )
    pre_aggregation: str = _key(
        "",
        _lazy_choices("strategies.robust.preaggregation", "PRE_AGGREGATION_STEPS", ", comma-separated, or empty"),
        "steps between the norm bound and the rule, applied in the order given: `nnm` (nearest-neighbour mixing, Allouah et al. 2023), `bucketing` (Karimireddy et al. 2022), `arc` (adaptive robust clipping, Allouah et al. 2025); empty: none",
    )
    pre_aggregation_f: int = _key(
        -1,
        Range(-1, MANY_CLIENTS),
        "Byzantine clients `nnm` and `arc` assume (n > 2f): NNM mixes the n - f nearest; -1: from `byzantine-fraction`",
    )
    bucketing_size: int = _key(
        2, Range(1, MANY_CLIENTS), "updates per bucket of `bucketing` (the paper: s <= n / (2f))"
    )
    weak_dp_noise_std: float = _key(
        0.0,
        Range(0.0, MAX_NORM),
        "std of Gaussian noise added to the aggregate against backdoors, with `norm-bound` (Sun et al. 2019 use 0.025; no DP guarantee; 0: off)",
    )
    min_valid_replies: int = _key(1, Range(1, MANY_CLIENTS), "skip a round with fewer valid replies")
    # Simulated attacks (fl_app.attacks.catalogue), simulation only
    attack: str = _key(
        "none",
        "none or " + _choices(ATTACK_NAMES) + ", comma-separated",
        "`none`, `label-flip`, `sign-flip`, `scaling`, `gaussian`, `alie`, `ipm`, `min-max`, `min-sum`, `fang-trimmed-mean`, `fang-krum`, `mimic`, `backdoor`, `nan`, `wrong-shapes`, `float64`, `negative-examples`; a comma-separated list gives the j-th attacker (in partition order) the (j mod len)-th",
    )
    attack_fraction: float = _key(
        0.0, Range(0.0, 1.0, high_open=True), "fraction of partitions that attack (drawn with `seed`)"
    )
    attack_ids: str = _key(
        "", "partition ids separated by commas", "or an explicit comma-separated list of partition ids"
    )
    attack_scale: float = _key(10.0, Range(0.0, MAX_NORM, low_open=True), "s of sign flipping (-s u) and scaling (s u)")
    attack_noise_std: float = _key(1.0, Range(0.0, MAX_NORM, low_open=True), "sigma of the Gaussian attack")
    alie_z: float = _key(0.0, Range(0.0, 100.0), "ALIE's z; 0 computes it from n and f as in the paper (about 1)")
    ipm_epsilon: float = _key(
        0.5, Range(0.0, MAX_RATE, low_open=True), "IPM's epsilon (sends -epsilon x mean of honest updates)"
    )
    attack_perturbation: str = _key(
        "std",
        _choices(ATTACK_PERTURBATIONS),
        "the direction d of `min-max` and `min-sum` (mu - gamma d): `unit-vec` (mu / |mu|), `std` (coordinate-wise "
        "standard deviation), `sign` (sign of mu)",
    )
    attack_gamma_init: float = _key(
        10.0,
        Range(0.0, MAX_NORM, low_open=True),
        "the start of the gamma search of `min-max` and `min-sum` (Shejwalkar & Houmansadr use 10; gamma stays below twice it)",
    )
    fang_b: float = _key(
        2.0,
        Range(1.0, 1e3, low_open=True),
        "b of `fang-trimmed-mean`: values drawn between the honest extreme w and b w (or w / b)",
    )
    backdoor_target: int = _key(
        0, Range(0, MAX_SAMPLES, note=", below the number of classes"), "the label `backdoor` attackers relabel to"
    )
    backdoor_fraction: float = _key(
        0.5,
        Range(0.0, 1.0, low_open=True),
        "`backdoor`: triggered, relabelled copies of this fraction of the attacker's examples are added to them",
    )
    backdoor_trigger_size: int = _key(
        2, Range(1, 1000), "side of the square trigger in the bottom-right corner (features for flat data: its square)"
    )
    backdoor_boost: float = _key(
        0.0,
        Range(0.0, MAX_NORM),
        "`backdoor` attackers multiply their update by this in `backdoor-boost-rounds` (model replacement, "
        "Bagdasaryan et al. 2020); 0: n / (eta c), n clients per round, c attackers, eta `server-learning-rate`",
    )
    backdoor_boost_rounds: str = _key(
        "", "round numbers separated by commas, or empty", "the rounds in which `backdoor` attackers boost"
    )
    attack_allow_excess: bool = _key(
        False,
        "`true`, `false`",
        "run although more simulated attackers per round reach the rule than it tolerates (a warning instead of "
        "an error), to measure a rule beyond its assumption",
    )
    # Model delivery: export for on-device inference, check before shipping (fl_app.delivery)
    export: str = _key(
        "",
        _choices(EXPORT_FORMATS) + " or `all`, comma-separated",
        'comma-separated formats to export after training: `keras`, `savedmodel`, `tflite`, or `all`; "" exports nothing (the run always writes `model.keras` and `model_card.md`)',
    )
    export_tflite_types: str = _key(
        "float32,int8",
        _choices(TFLITE_TYPES) + ", comma-separated",
        "TFLite variants with `tflite`: `float32`, `int8` or both",
    )
    export_best: bool = _key(
        False,
        "`true`, `false`",
        "also export (and check) the model of the round with the best centralized headline metric (accuracy, or the model's first metric, e.g. the lowest `mae`), kept in memory during the run",
    )
    export_tolerance: float = _key(
        0.01,
        Range(0.0, 1.0),
        "a TFLite model is ready only if its headline metric >= the Keras model's minus this (0.01 = one point of accuracy), or for an error such as `mae` <= the Keras model's x (1 + this)",
    )
    export_calibration_samples: int = _key(
        200, Range(1, MAX_SAMPLES), "examples of the server's held-out set that calibrate int8 quantisation"
    )
    export_check_fraction: float = _key(
        1.0,
        Range(0.0, 1.0, low_open=True),
        "fraction of the clients that did not train in the last round which run the check round",
    )
    # Differential privacy and secure aggregation (strategies.private.dp_fedavg, fl_app.client.update_privacy,
    # fl_app.task.dp_sgd, fl_app.secagg.server)
    dp_mode: str = _key(
        "central",
        _lazy_choices("strategies.private.dp_fedavg", "DP_MODES"),
        "with `strategy='dp-fedavg'`: `central` (server clips), `client-clipping` (clients clip, server noises), `local-gaussian`, `local-laplace`",
    )
    dp_noise_multiplier: float = _key(
        1.0, Range(0.0, MAX_NOISE), "z: noise std on the clipped sum / C; 0 with `dp-target-epsilon` > 0 calibrates z"
    )
    dp_clip_norm: float = _key(
        1.0,
        Range(0.0, MAX_NORM, low_open=True),
        "C, the L2 clip norm of a client's update (initial value with `dp-clip-quantile`)",
    )
    dp_clip_quantile: float = _key(
        0.0, Range(0.0, 1.0), "adaptive clipping at this target quantile (Andrew et al. 2021); 0: fixed C"
    )
    dp_clip_learning_rate: float = _key(
        0.2, Range(0.0, 10.0, low_open=True), "eta of the geometric clip update (Andrew et al. 2021 use 0.2)"
    )
    dp_clip_count_noise: float = _key(
        0.0,
        Range(0.0, MANY_CLIENTS / 20),
        "sigma_b, noise std of the clipped count; 0: m / 20 (at most a million clients / 20)",
    )
    dp_sampling: str = _key(
        "poisson",
        _lazy_choices("strategies.private.accounting", "SAMPLINGS"),
        "`poisson` (rate `fraction-train`) or `fixed-size` (m without replacement)",
    )
    dp_delta: float = _key(
        1e-5,
        Range(1e-12, 1.0, high_open=True),
        "delta at which epsilon is reported (central, local and DP-SGD); the PLD accountant resolves "
        "delta down to about 1e-15 (its tail truncation) and reports infinity below",
    )
    dp_accounting: str = _key(
        "rdp",
        _lazy_choices("strategies.private.accounting", "METHODS"),
        "`rdp` or `pld`: the accountant that decides the budget stop (both are reported)",
    )
    dp_target_epsilon: float = _key(
        0.0,
        Range(0.0, 100.0),
        "stop before a round would exceed this epsilon (0: no budget; above 100 it promises nothing)",
    )
    dp_local_epsilon: float = _key(
        1.0, Range(1e-3, 100.0), "per-round epsilon of `local-laplace` (below 0.001 the noise drowns any model)"
    )
    dp_inner_strategy: str = _key(
        "fedavg",
        "`fedavg`, `fedavgm`, `fedadam`, `fedyogi`, `fedadagrad`, `fedprox` or `package.module:Name`",
        "the strategy inside `dp-fedavg`, whose server step takes the released (noised) aggregate as its "
        "one reply: `fedavg` is w + eta m with `server-learning-rate` and `server-momentum`; e.g. "
        "`fedadam` runs Adam on it (post-processing: epsilon is unchanged)",
    )
    dp_ftrl_epoch_rounds: int = _key(
        0,
        Range(0, MAX_ROUNDS),
        "with `strategy='dp-ftrl'`: rounds per epoch, after which the tree restarts; 0: an epoch ends when every "
        "connected node has contributed once (no node contributes twice in an epoch)",
    )
    dp_sgd_noise_multiplier: float = _key(
        0.0, Range(0.0, MAX_NOISE), "DP-SGD noise multiplier on every client (0: off)"
    )
    dp_sgd_l2_clip: float = _key(1.0, Range(0.0, MAX_NORM, low_open=True), "DP-SGD per-example gradient clip norm")
    dp_sgd_microbatches: int = _key(
        0,
        Range(0, 65536, note=", divides `batch-size`; > 0 needs `dp-sgd-sampling='shuffle'`"),
        "DP-SGD microbatches per batch (0: every example its own; must divide `batch-size`)",
    )
    dp_sgd_vectorized: bool = _key(True, "`true`, `false`", "TF Privacy's vectorised DP optimizer (faster here)")
    dp_sgd_sampling: str = _key(
        "poisson",
        _lazy_choices("strategies.private.accounting", "DPSGD_SAMPLINGS"),
        "DP-SGD batches: `poisson` (each example joins each step with probability batch-size / n, from a secret generator; accounted with amplification, add/remove-one) or `shuffle` (fixed-size batches of the public seed's permutation; accounted without amplification, replace-one)",
    )
    secure_aggregation: bool = _key(False, "`true`, `false`", "SecAgg+ (Flower legacy stack)")
    secagg_num_shares: int = _key(
        3,
        Range(3, MANY_CLIENTS, note=", at most the clients per round"),
        "shares of each client's key (3 .. clients per round)",
    )
    secagg_reconstruction_threshold: int = _key(
        2,
        Range(2, MANY_CLIENTS, note=", below `secagg-num-shares`"),
        "shares needed to unmask a client (2 .. num-shares - 1)",
    )
    secagg_clipping_range: float = _key(
        8.0, Range(0.0, MAX_NORM, low_open=True), "SecAgg+ clips values to [-r, r] before quantising"
    )
    secagg_quantization_range: int = _key(
        4194304, Range(2, 2**32 - 1, note=", times clients per round < 2**32"), "SecAgg+ quantisation levels"
    )
    secagg_dp: str = _key(
        "central",
        _lazy_choices("strategies.private.secure_sum", "PLACEMENTS"),
        "DP noise under SecAgg+ with `strategy='dp-fedavg'`: `central` (the server noises the unmasked, exact sum: no DP against the server) or `distributed` (each client adds its share of discrete Gaussian noise before masking, Kairouz et al. 2021; needs power-of-two `secagg-clipping-range` and `secagg-quantization-range`)",
    )
    secagg_dp_min_clients: int = _key(
        0,
        Range(0, MANY_CLIENTS, note=", at most the clients per round"),
        "`distributed`: m_min, the survivors whose noise shares add up to the configured noise (each client adds variance (z C)^2 / m_min); fewer survivors are accounted with the noise they added; 0: the clients per round",
    )
    fault_partition_ids: str = _key(
        "",
        "partition ids in [0, `num-partitions`), comma-separated",
        "test fault injection: these partitions' clients raise in `fault-round`",
    )
    fault_round: int = _key(0, Range(0, MAX_ROUNDS), "the round of the injected fault (0: off)")
    # Edge deployment: faults and a resumable server
    min_train_replies: int = _key(
        1,
        Range(1, MANY_CLIENTS),
        "fewest valid training replies a round aggregates; below it the round keeps the previous model",
    )
    resume_from: str = _key(
        "",
        "a run or output directory, or empty",
        "run directory (or output directory, via its `latest`) of an earlier run to continue after its last completed round",
    )
    # Fast simulation and compressed updates (fl_app.client.compression, strategies.compression)
    centralized_evaluation: bool = _key(
        True,
        "`true`, `false`",
        "evaluate the global model on the server's held-out test set every round (imports TensorFlow on the server); false: no TensorFlow on the server, initial weights from a client, final weights in `weights.npz`",
    )
    compression: str = _key(
        "none",
        _lazy_choices("strategies.compression.codecs", "CODECS"),
        "uploads: `none`, `float16`, `int8` (stochastic rounding, per-block scale), `top-k` (largest magnitudes), `random-mask` (coordinates from a seeded mask); needs one of our aggregation strategies",
    )
    compression_topk_fraction: float = _key(
        0.01, Range(0.0, 1.0, low_open=True), "fraction of the update's coordinates that `top-k` sends"
    )
    compression_mask_fraction: float = _key(
        0.01, Range(0.0, 1.0, low_open=True), "probability that `random-mask` keeps a coordinate"
    )
    compression_mask_rescale: bool = _key(
        True,
        "`true`, `false`",
        "`random-mask` rescales by 1/p (unbiased); false: no rescaling (biased, with error feedback)",
    )
    compression_int8_block: int = _key(
        4096, Range(1, 2**24), "values per scale of `int8` (2**24: more than any layer here)"
    )
    compression_error_feedback: bool = _key(
        True,
        "`true`, `false`",
        "error feedback for biased codecs (top-k, random-mask without rescaling); false sends the biased codec's output as is",
    )
    # Encrypted aggregation (fl_app.client.encryption, strategies.encrypted)
    homomorphic_encryption: str = _key(
        "none",
        _lazy_choices("strategies.encrypted.strategy", "ENCRYPTION_SCHEMES"),
        "`none`, `ckks` (TenSEAL) or `paillier` (`phe` format): the server only adds encrypted updates",
    )
    he_public_key_path: str = _key(
        "",
        "a public key file (required with encryption)",
        "the server's `public.key` from `scripts/make_he_keys.py` (a secret key is refused)",
    )
    he_secret_key_path: str = _key(
        "",
        "a secret key file (clients only)",
        "the clients' `secret.key` in simulation; a node config key of the same name overrides it on edge machines",
    )
    he_client_weighting: str = _key(
        "num-examples",
        _lazy_choices("strategies.encrypted.strategy", "HE_WEIGHTINGS"),
        "`num-examples` (FedAvg: `w_k = n_k`) or `uniform` (`w_k = 1`)",
    )
    he_clip_norm: float = _key(
        0.0, Range(0.0, MAX_NORM), "clients clip their update to this L2 norm before weighting and encrypting (0: off)"
    )
    he_max_examples: int = _key(
        100_000,
        Range(1, 1_000_000_000),
        "cap on a client's weight `w_k = n_k` (it encrypts and reports `min(n_k, cap)`; a larger or "
        "non-integer count is rejected)",
    )
    he_verify_min_summands: int = _key(
        2,
        Range(0, 10_000),
        "a key holder checks each round's decrypted sum before it joins the chain; when it is invalid, "
        "groups of at least this many updates are checked to drop the culprits (0: no check)",
    )
    he_ckks_poly_degree: int = _key(
        8192,
        Range(1024, 32768, note=_ckks_degrees),
        "CKKS ring dimension the key must have (8192 with the default moduli: 128-bit)",
    )
    he_ckks_scale_bits: int = _key(40, Range(20, 60), "CKKS scale 2^bits the key must have")
    he_paillier_key_bits: int = _key(
        3072,
        Range(2048, 16384, note=", even"),
        "Paillier modulus bits the key must have (3072: 128-bit; 2048: 112-bit; 16384 is already hours of key generation)",
    )
    # Server-side aggregation speed (strategies.aggregation)
    aggregation_threads: int = _key(
        0,
        Range(0, MAX_THREADS),
        "BLAS threads of the server's aggregation (0: every core the server process may run on, its CPU affinity); the clients wait for the aggregate, so a round's aggregation has the cores to itself",
    )
    aggregation_memory_gb: float = _key(
        0.0,
        Range(0.0, 1e6, note=" (0: half of the physical memory)"),
        "GiB the round's K x P float32 update matrix may take (0: half of the server's physical memory); a round with more valid replies aggregates the first that fit and drops the rest, with a warning",
    )

    @classmethod
    def parse(cls, run_config: Mapping[str, Any]) -> Settings:
        """Read Flower's ``run_config`` (kebab-case keys), checking keys, types and every numeric
        key's :class:`Range`."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, value in run_config.items():
            name = key.replace("-", "_")
            if name not in fields:
                allowed = ", ".join(sorted(n.replace("_", "-") for n in fields))
                raise SettingsError(f"unknown run-config key '{key}'; known keys: {allowed}")
            values[name] = _coerce(key, value, fields[name].type)
            key_range = range_of(fields[name])
            if key_range is not None:
                key_range.check(key, value)
        return cls(**values)

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> Settings:
        """The server's (and the tools') settings: every key validated (:meth:`validate`)."""
        settings = cls.parse(run_config)
        settings.validate()
        return settings

    @classmethod
    def client_from_run_config(cls, run_config: Mapping[str, Any]) -> Settings:
        """A ClientApp's settings: types and the keys the client uses (:meth:`validate_client`)."""
        settings = cls.parse(run_config)
        settings.validate_client()
        return settings

    def to_run_config(self) -> dict[str, Any]:
        """The inverse of :meth:`parse`: kebab-case keys, plain values (e.g. for ``config.json``)."""
        return {k.replace("_", "-"): v for k, v in dataclasses.asdict(self).items()}

    # ------------------------------------------------------------------ the strategies' typed parameters

    def sampling_params(self) -> SamplingParams:
        """Node sampling and the clients per round."""
        from strategies.core.sampling import SamplingParams

        return _typed(
            SamplingParams,
            fraction_train=self.fraction_train,
            fraction_evaluate=self.fraction_evaluate,
            min_train_nodes=self.min_train_clients,
            min_evaluate_nodes=self.min_evaluate_clients,
            min_available_nodes=self.min_available_clients,
            num_nodes=self.num_partitions,
        )

    def derived_params(self) -> DerivedParams:
        """What ``byzantine-fraction`` makes of ``krum-f``, ``bulyan-f`` and ``trimmed-mean-beta`` for the
        clients per round (:func:`strategies.robust.tolerance.derived_params`)."""
        from strategies.robust.tolerance import derived_params

        return derived_params(self.sampling_params().clients_per_round(capped=False), self.byzantine_fraction)

    def rule_params(self) -> RuleParams:
        """The built-in aggregation rules' parameters: the explicit keys, or at -1 derived from ``byzantine-fraction``."""
        from strategies.aggregation.strategy import RuleParams

        derived = self.derived_params()
        return _typed(
            RuleParams,
            trimmed_mean_beta=derived.trimmed_mean_beta if self.trimmed_mean_beta == -1 else self.trimmed_mean_beta,
            krum_f=derived.krum_f if self.krum_f == -1 else self.krum_f,
            multi_krum_m=self.multi_krum_m,
            bulyan_f=derived.bulyan_f if self.bulyan_f == -1 else self.bulyan_f,
            geometric_median_iterations=self.geometric_median_iterations,
            centered_clipping_tau=self.centered_clipping_tau,
            centered_clipping_iterations=self.centered_clipping_iterations,
            centered_clipping_tau_quantile=self.centered_clipping_tau_quantile,
            centered_clipping_momentum=self.centered_clipping_momentum,
            dnc_f=derived.majority_f if self.dnc_f == -1 else self.dnc_f,
            dnc_iterations=self.dnc_iterations,
            dnc_dimension=self.dnc_dimension,
            dnc_filter_fraction=self.dnc_filter_fraction,
        )

    def aggregation_params(self) -> AggregationParams:
        """What our aggregation strategies are built from."""
        from strategies.aggregation.strategy import AggregationParams

        return _typed(
            AggregationParams,
            sampling=self.sampling_params(),
            rules=self.rule_params(),
            rule=self.aggregation_rule,
            weighting=self.client_weighting,
            cap_ratio=self.weight_cap_ratio,
            max_update_norm=self.max_update_norm,
            norm_bound=self.norm_bound,
            norm_bound_quantile=self.norm_bound_quantile,
            pre_aggregation=self.pre_aggregation,
            pre_aggregation_f=self.derived_params().majority_f
            if self.pre_aggregation_f == -1
            else self.pre_aggregation_f,
            bucketing_size=self.bucketing_size,
            weak_dp_noise_std=self.weak_dp_noise_std,
            server_learning_rate=self.server_learning_rate,
            server_momentum=self.server_momentum,
            min_valid_replies=self.min_valid_replies,
            aggregation_threads=self.aggregation_threads,
            memory_gb=self.aggregation_memory_gb,
        )

    def dp_params(self) -> DpParams:
        """DP-FedAvg's ``dp-*`` settings."""
        from strategies.private.dp_fedavg import DpParams

        return _typed(
            DpParams,
            mode=self.dp_mode,
            noise_multiplier=self.dp_noise_multiplier,
            clip_norm=self.dp_clip_norm,
            clip_quantile=self.dp_clip_quantile,
            clip_learning_rate=self.dp_clip_learning_rate,
            clip_count_noise=self.dp_clip_count_noise,
            sampling=self.dp_sampling,
            delta=self.dp_delta,
            accounting=self.dp_accounting,
            target_epsilon=self.dp_target_epsilon,
            local_epsilon=self.dp_local_epsilon,
            num_rounds=self.num_server_rounds,
            inner_strategy=self.dp_inner_strategy,
            ftrl_epoch_rounds=self.dp_ftrl_epoch_rounds,
        )

    def encryption_params(self) -> EncryptionParams:
        """The encrypted run's settings (the server's part: no secret key path)."""
        from strategies.encrypted.strategy import EncryptionParams

        return _typed(
            EncryptionParams,
            scheme=self.homomorphic_encryption,
            public_key_path=self.he_public_key_path,
            client_weighting=self.he_client_weighting,
            clip_norm=self.he_clip_norm,
            max_examples=self.he_max_examples,
            verify_min_summands=self.he_verify_min_summands,
            ckks_poly_degree=self.he_ckks_poly_degree,
            ckks_scale_bits=self.he_ckks_scale_bits,
            paillier_key_bits=self.he_paillier_key_bits,
        )

    def strategy_params(self) -> StrategyParams:
        """Everything a registered strategy is built from; a user's dotted-path factory gets the
        run config mapping (every key, defaults filled in)."""
        from strategies.registry import StrategyParams

        return _typed(
            StrategyParams,
            aggregation=self.aggregation_params(),
            dp=self.dp_params(),
            proximal_mu=self.proximal_mu,
            fedopt_eta=self.fedopt_eta,
            learning_rate=self.learning_rate,
            run_config=MappingProxyType(self.to_run_config()),
        )

    # ------------------------------------------------------------------------------------- validation

    def validate(self) -> None:
        """Raise :class:`SettingsError` for the first value the app cannot run with: the client's
        keys, then the server's, building the configured strategy to check it."""
        self.validate_client()
        self.strategy_params()  # sampling, aggregation, rules, DP, FedOpt and FedProx values
        for key in ("min-train-clients", "min-evaluate-clients", "min-available-clients"):
            value = getattr(self, key.replace("-", "_"))
            if value > self.num_partitions:
                raise SettingsError(
                    f"{key} ({value}) must be at most num-partitions ({self.num_partitions}), the clients "
                    "of the federation: the server would wait for clients that do not exist"
                )
        if not self.output_dir:
            raise SettingsError("output-dir must not be empty")
        self._validate_tracking()
        # resume-from is checked by the server when it loads the checkpoint (fl_app.server.checkpoint).
        self._validate_strategy()
        self._validate_server_privacy()
        self._validate_server_compression()
        self._validate_server_encryption()
        self._validate_attack_tolerance()  # last: a configuration that cannot run at all says so first

    def _validate_tracking(self) -> None:
        """The MLflow keys: a named experiment, and MLflow installed when a tracking URI is set."""
        import importlib.util

        if not self.mlflow_experiment:
            raise SettingsError("mlflow-experiment must not be empty")
        if self.mlflow_tracking_uri and importlib.util.find_spec("mlflow") is None:
            raise SettingsError(
                f"mlflow-tracking-uri is '{self.mlflow_tracking_uri}' but MLflow is not installed: install the "
                "project's mlflow extra (`uv sync --extra mlflow`), or leave mlflow-tracking-uri empty"
            )

    def validate_client(self) -> None:
        """Raise :class:`SettingsError` for the first value of a key the ClientApp uses (data, model,
        training, simulated attacks, client-side privacy, compression and encryption, the export
        check); builds no strategy."""
        self._validate_data()
        if not _is_user_object(self.model) and not self.model.lower().endswith((".keras", ".h5")):
            _one_of("model", self.model, MODEL_NAMES)
        _one_of("optimizer", self.optimizer, OPTIMIZERS)
        self._validate_callbacks()
        self._validate_attack()
        self._validate_client_privacy()
        self._validate_codecs()
        self.encryption_params()
        self._validate_export()

    def _validate_callbacks(self) -> None:
        if self.callbacks and not _is_user_object(self.callbacks):
            raise SettingsError(
                f"callbacks must be \"\" or a factory 'package.module:make' returning a list of "
                f"tf.keras callbacks; got '{self.callbacks}'"
            )
        if self.callbacks_validation_fraction > 0 and not self.callbacks:
            raise SettingsError(
                f"callbacks-validation-fraction={self.callbacks_validation_fraction:g} holds out validation data "
                'for Keras callbacks, but callbacks is "": name a factory in callbacks, or set it to 0'
            )
        if self.callbacks and self.dp_sgd_noise_multiplier > 0:
            raise SettingsError(
                f"callbacks='{self.callbacks}' cannot run with DP-SGD (dp-sgd-noise-multiplier="
                f"{self.dp_sgd_noise_multiplier:g}): callbacks run in model.fit, whose batches are not DP-SGD's "
                "secretly seeded Poisson batches, and a callback that stops early or changes the learning rate "
                'changes the steps the example-level epsilon is accounted for; set callbacks="" or '
                "dp-sgd-noise-multiplier=0"
            )

    def _validate_strategy(self) -> None:
        from strategies.aggregation.strategy import build_aggregation_strategy
        from strategies.registry import ROBUST_STRATEGIES, StrategyNameError, check_strategy_name

        try:
            check_strategy_name(self.strategy)
        except StrategyNameError as err:
            raise SettingsError(f"strategy: {err}") from err
        if self.strategy in ROBUST_STRATEGIES:
            rule = self.aggregation_rule if self.strategy == "robust" else self.strategy
            try:  # builds the rule with its parameters and checks n against it (e.g. n > 2f + 2)
                build_aggregation_strategy(rule, self.aggregation_params())
            except (ValueError, StrategyNameError) as err:
                raise SettingsError(f"strategy '{self.strategy}': {err}") from err

    def _validate_attack(self) -> None:
        for name in self.attack_names():
            _one_of("attack", name, ("none", *ATTACK_NAMES))
        self.attackers()
        _one_of("attack-perturbation", self.attack_perturbation, ATTACK_PERTURBATIONS)
        self.boost_rounds()
        classes = self.num_classes or {"digits": 10, "synthetic": self.synthetic_classes}.get(self.dataset, 0)
        if "backdoor" in self.attack_names() and classes and self.backdoor_target >= classes:
            raise SettingsError(f"backdoor-target must be a class in [0, {classes - 1}], got {self.backdoor_target}")
        clients, attackers = self.sampling_params().clients_per_round(), len(self.attackers())
        if "fang-krum" in self.attack_names() and clients < 2 * attackers + 2:
            raise SettingsError(
                f"attack='fang-krum' needs at least 2c + 2 clients per round for c attackers (Fang et al.'s "
                f"m - 2c - 1 >= 1): {attackers} attackers (attack-fraction / attack-ids) need {2 * attackers + 2}, "
                f"got {clients}"
            )

    def boost_rounds(self) -> frozenset[int]:
        """``backdoor-boost-rounds`` as a set of round numbers."""
        try:
            rounds = frozenset(int(r) for r in self.backdoor_boost_rounds.split(",") if r.strip())
        except ValueError as err:
            raise SettingsError(
                f"backdoor-boost-rounds must be round numbers separated by commas, got '{self.backdoor_boost_rounds}'"
            ) from err
        if any(r < 1 for r in rounds):
            raise SettingsError(f"backdoor-boost-rounds must be rounds >= 1, got '{self.backdoor_boost_rounds}'")
        return rounds

    def tolerance_excess(self) -> str:
        """Why the simulated attackers exceed what the configured rule tolerates ("" when they do not).

        Counted per round in the worst case, min(attackers, n) with n the clients per round; the
        attacks the server's validation rejects (``nan``, ``wrong-shapes``, ``float64``,
        ``negative-examples``) never reach the rule and do not count. Flower's averaging strategies
        are the mean; DP strategies and a user's strategy or rule state no tolerance and are not checked.
        """
        from strategies.registry import ROBUST_STRATEGIES
        from strategies.robust.rules import RULES, RUN_CONFIG_KEYS
        from strategies.robust.tolerance import tolerated

        reaching = [pid for pid in self.attackers() if self.attack_of(pid) not in REJECTED_ATTACKS]
        if self.strategy in FLOWER_MEANS:
            rule = "mean"
        elif self.strategy in ROBUST_STRATEGIES:
            rule = self.aggregation_rule if self.strategy == "robust" else self.strategy
        else:
            return ""
        if not reaching or rule not in RULES:
            return ""
        n = self.sampling_params().clients_per_round()
        params = self.rule_params().of_rule(rule)
        limit = tolerated(rule, n, params)
        per_round = min(len(reaching), n)
        if limit is None or per_round <= limit:
            return ""
        keys = ", ".join(f"{RUN_CONFIG_KEYS[rule][p]}={v:g}" for p, v in params.items() if v is not None)
        return (
            f"{per_round} simulated attackers can reach the rule in a round (attack='{self.attack}', "
            f"{len(reaching)} of num-partitions={self.num_partitions}), more than the {limit} that {rule}"
            f"{' with ' + keys if keys else ''} tolerates among {n} clients per round; raise byzantine-fraction "
            "(or the rule's key), lower attack-fraction, or set attack-allow-excess=true to measure the rule "
            "beyond its assumption"
        )

    def _validate_attack_tolerance(self) -> None:
        """Refuse (or, with ``attack-allow-excess``, warn about) more attackers than the rule tolerates."""
        excess = self.tolerance_excess()
        if excess and not self.attack_allow_excess:
            raise SettingsError(excess)
        if excess:
            warnings.warn(excess, ToleranceWarning, stacklevel=3)

    def _validate_client_privacy(self) -> None:
        self.dp_params()  # dp-mode, dp-clip-norm and dp-local-epsilon are the clients' too
        from strategies.private.accounting import DPSGD_SAMPLINGS

        _one_of("dp-sgd-sampling", self.dp_sgd_sampling, DPSGD_SAMPLINGS)
        if self.dp_sgd_microbatches and self.dp_sgd_sampling == "poisson":
            raise SettingsError(
                f"dp-sgd-microbatches ({self.dp_sgd_microbatches}) needs dp-sgd-sampling='shuffle': "
                "Poisson batches vary in size, so only 0 (every example its own microbatch) is allowed with 'poisson'"
            )
        if self.dp_sgd_microbatches and self.batch_size % self.dp_sgd_microbatches:
            raise SettingsError(
                f"dp-sgd-microbatches ({self.dp_sgd_microbatches}) must divide batch-size ({self.batch_size})"
            )
        if self.dp_sgd_noise_multiplier > 0 and self.proximal_mu > 0:
            raise SettingsError("DP-SGD (dp-sgd-noise-multiplier > 0) cannot be combined with proximal-mu > 0")
        self.fault_partitions()

    def _validate_server_privacy(self) -> None:
        if self.dp_target_epsilon > 0 and self.strategy not in ("dp-fedavg", "dp-ftrl"):
            raise SettingsError(
                f"dp-target-epsilon={self.dp_target_epsilon:g} is the privacy budget of strategy='dp-fedavg' or "
                f"'dp-ftrl', but strategy is '{self.strategy}': it would be ignored (DP-SGD reports its epsilon "
                "and stops on no budget); set strategy='dp-fedavg' or 'dp-ftrl', or dp-target-epsilon=0"
            )
        if self.strategy == "dp-ftrl":
            from strategies.private.dp_ftrl import check_dp_ftrl_combination

            try:
                check_dp_ftrl_combination(self.aggregation_params(), self.dp_params())
            except ValueError as err:
                raise SettingsError(str(err)) from err
        if self.strategy == "dp-fedavg":
            from strategies.private.dp_fedavg import build_dp_strategy

            try:  # refuses combinations whose epsilon cannot be honestly reported
                build_dp_strategy(
                    self.aggregation_params(), self.dp_params(), noise_multiplier=self.dp_noise_multiplier
                )
                from strategies.registry import check_dp_inner_strategy

                check_dp_inner_strategy(self.dp_inner_strategy)
            except ValueError as err:
                raise SettingsError(f"strategy 'dp-fedavg': {err}") from err
        from fl_app.config.secagg_checks import check_secagg_dp, check_secure_aggregation

        try:
            check_secagg_dp(self)
            if self.secure_aggregation:
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

    def _validate_codecs(self) -> None:
        from strategies.compression.codecs import CODECS, make_codec

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

    def _validate_server_compression(self) -> None:
        from strategies.registry import ROBUST_STRATEGIES

        if self.compression != "none" and ":" not in self.strategy and self.strategy not in ROBUST_STRATEGIES:
            raise SettingsError(
                f"compression='{self.compression}' needs one of our aggregation strategies, which "
                f"decode uploads before aggregating ({', '.join(ROBUST_STRATEGIES)}; "
                f"strategy='robust' aggregation-rule='mean' client-weighting='num-examples' is FedAvg); "
                f"got strategy '{self.strategy}'"
            )

    def _validate_server_encryption(self) -> None:
        from strategies.encrypted.strategy import EncryptionConfigError, check_encryption_compatible

        scheme = self.homomorphic_encryption
        if scheme == "none":
            return
        try:
            check_encryption_compatible(self.encryption_params(), self.strategy, self.aggregation_params())
        except EncryptionConfigError as err:
            raise SettingsError(str(err)) from err
        app_features = (
            ("compression", self.compression, "none", "ciphertexts are not compressed; set compression='none'"),
            (
                "export",
                self.export,
                "",
                "the server never holds the plaintext model to export; a key holder decrypts it with "
                "scripts/decrypt_model.py",
            ),
            (
                "secure-aggregation",
                self.secure_aggregation,
                False,
                "choose one of SecAgg+ and homomorphic encryption",
            ),
        )
        for key, value, off, reason in app_features:
            if value != off:
                raise SettingsError(f"{key}={value!r} cannot run with homomorphic-encryption='{scheme}': {reason}")
        omniscient = [name for name in self.attack_names() if name in ("alie", "ipm")]
        if omniscient:
            raise SettingsError(
                f"attack='{self.attack}' is simulated on the server from the plaintext updates "
                f"and cannot run with homomorphic-encryption='{scheme}'"
            )

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
        if not _is_user_object(self.dataset):
            _one_of("dataset", self.dataset, DATASETS)
        _one_of("task", self.task, TASK_CHOICES)
        _one_of("partitioner", self.partitioner, PARTITIONERS)
        if self.dataset == "synthetic":  # the pool fl_app.task.data generates in every process
            samples = math.ceil(
                self.synthetic_samples_per_client * self.num_partitions / (1 - self.server_test_fraction)
            )
            if samples * self.synthetic_features > MAX_SYNTHETIC_VALUES:
                raise SettingsError(
                    f"the synthetic pool, synthetic-samples-per-client x num-partitions / (1 - "
                    f"server-test-fraction) = {samples} examples x synthetic-features = {self.synthetic_features}, "
                    f"must hold at most {MAX_SYNTHETIC_VALUES} values (1 GiB of float32 in every process)"
                )
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
            least = 1 if self.task in ("multilabel", "regression") else 2
            if self.num_classes < least or not self.input_shape:
                raise SettingsError(
                    f"dataset='local-file' needs num-classes (>= {least}: classes, or labels or targets with "
                    "task='multilabel' or 'regression') and input-shape (e.g. '64' or "
                    f"'8,8,1') so that every node builds the same model; got num-classes="
                    f"{self.num_classes}, input-shape='{self.input_shape}'"
                )
        self.parsed_input_shape()

    def _validate_export(self) -> None:
        self.export_formats()
        self.export_tflite_variants()

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
            try:
                number = float(value)
            except OverflowError:  # an int beyond float's range
                number = math.inf
            if not math.isfinite(number):
                raise SettingsError(f"{key} must be a finite number, got {value}")
            return number
    elif kind == "str" and isinstance(value, str):
        return value
    raise SettingsError(f"{key} must be of type {kind}, got {value!r} ({type(value).__name__})")


def _is_user_object(value: str) -> bool:
    """Whether ``value`` names a user's ``package.module:name`` (imported where it is used)."""
    module, _, attr = value.partition(":")
    return bool(module) and bool(attr)


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise SettingsError(f"{key} must be one of {', '.join(allowed)}; got '{value}'")


def _typed(cls: Callable[..., T], **values: Any) -> T:
    """``cls(**values)``, a typed parameter object of :mod:`strategies`, its ValueError a SettingsError."""
    try:
        return cls(**values)
    except ValueError as err:
        raise SettingsError(str(err)) from err


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
