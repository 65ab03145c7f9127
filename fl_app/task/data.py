"""Data sets and their federated partitions.

Every data set becomes one pool of numpy arrays ``(x, y)``: integer classes, one-hot or multi-label
rows, or real-valued targets (the task is inferred from ``y``, see :mod:`fl_app.task.output_spec`).
The server keeps a stratified, held-out share of the pool for centralized evaluation; the rest is
split among the clients with a ``flwr_datasets`` partitioner (IID, Dirichlet label skew, or
label-sorted shards as in McMahan et al. 2017; regression targets are stratified by quantile bin).
Each client splits its own partition into train and test. The same settings and seed always give
the same partitions.

The pool is a built-in data set or a user's loader, ``dataset='package.module:load'``: a function
``load() -> (x, y)`` of numpy arrays, called in every process that needs the data (the server, for
its held-out set; each client, which keeps its own partition). A loader with parameters,
``load(partition_id, num_partitions) -> (x, y)``, returns one node's own data instead
(:func:`per_node_loader`); the server then has none, as with local files. On a SuperNode a loader
runs on the node, so it reads the node's files.

In deployment each SuperNode may read its own local file instead (``.npz`` with arrays ``x`` and
``y``, or a CSV with one or more target columns); :func:`load_local_file` checks it and says what
is wrong.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fl_app.config.settings import Settings
from fl_app.task.output_spec import OutputSpec, infer_output_spec, strata
from fl_app.task.targets import is_multi_target, pack_targets


class DataFileError(ValueError):
    """A local data file that cannot be trained on; the message says why."""


@dataclasses.dataclass(frozen=True)
class ClientData:
    """One client's local train and test split."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    output_spec: OutputSpec | None = None

    @property
    def spec(self) -> OutputSpec:
        """The task (``output_spec``; None: integer classes in ``[0, num_classes)``)."""
        return self.output_spec or OutputSpec.classes(self.num_classes)


@dataclasses.dataclass(frozen=True)
class FederatedData:
    """The pool split into a server test set and per-client index partitions."""

    x: np.ndarray
    y: np.ndarray
    partitions: tuple[np.ndarray, ...]
    x_server_test: np.ndarray
    y_server_test: np.ndarray
    num_classes: int
    spec: OutputSpec

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])


# --------------------------------------------------------------------------- data sets


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray, int]:
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes) as (n, 8, 8, 1) in [0, 1]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[..., np.newaxis]
    return x, digits.target.astype(np.int64), 10


def make_synthetic_arrays(
    num_samples: int, num_classes: int, num_features: int, seed: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """Gaussian class clusters: x = mu_y + N(0, I), with class means mu_c ~ N(0, 0.5^2 I)."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0.0, 0.5, size=(num_classes, num_features)).astype(np.float32)
    y = rng.integers(0, num_classes, size=num_samples)
    x = means[y] + rng.standard_normal((num_samples, num_features), dtype=np.float32)
    return x, y.astype(np.int64), num_classes


def hf_dataset_to_arrays(dataset, label_column: str) -> tuple[np.ndarray, np.ndarray]:
    """A ``datasets.Dataset`` as (x, y): image columns scaled to [0, 1], numeric columns stacked."""
    if label_column not in dataset.column_names:
        raise DataFileError(
            f"hf-label-column '{label_column}' is not a column of the data set "
            f"(columns: {', '.join(dataset.column_names)})"
        )
    feature_columns = [c for c in dataset.column_names if c != label_column]
    if not feature_columns:
        raise DataFileError("the data set has no feature column besides the label")
    data = dataset.with_format("numpy")
    parts = []
    for column in feature_columns:
        values = np.asarray(data[column])
        if values.dtype == object:
            values = np.stack([np.asarray(v) for v in values])
        values = values.astype(np.float32)
        if values.ndim >= 3 and values.max(initial=0.0) > 1.0:
            values = values / 255.0
        parts.append(values)
    if len(parts) == 1:
        x = parts[0]
        if x.ndim == 3:  # grayscale images get a channel axis
            x = x[..., np.newaxis]
    else:
        x = np.concatenate([p.reshape(len(p), -1) for p in parts], axis=1)
    y = np.asarray(data[label_column]).astype(np.int64)
    return x, y


def load_hf_arrays(name: str, label_column: str) -> tuple[np.ndarray, np.ndarray, int]:
    """A Hugging Face data set's train split through ``flwr_datasets`` (needs the network)."""
    from flwr_datasets import FederatedDataset
    from flwr_datasets.partitioner import IidPartitioner

    fds = FederatedDataset(dataset=name, partitioners={"train": IidPartitioner(num_partitions=1)})
    x, y = hf_dataset_to_arrays(fds.load_split("train"), label_column)
    return x, y, int(y.max()) + 1


DATA_FILE_MAX_BYTES = 2**30
"""The most a node's data file may hold (a CSV on disk, an ``.npz`` uncompressed, from its zip
directory, read before anything is loaded): 1 GiB (268M float32 values) keeps a hostile or broken
file from exhausting the device (a 2.4 MB ``.npz`` can expand to 2.5 GB)."""


def load_local_file(path: str | Path, label_column: str = "label") -> tuple[np.ndarray, np.ndarray]:
    """Read a node's own data: ``.npz`` with ``x`` and ``y``, or CSV with target column(s).

    ``label_column`` names one CSV column, or several separated by commas (multi-column targets:
    one-hot, multi-label or several regression targets). Targets may be integers or real numbers.

    Errors name the file and the problem, never the file's contents (they travel to the server
    in the node's error reply).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataFileError(f"data file '{path}' does not exist")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return _check_arrays(path, *_read_npz(path))
    if suffix == ".csv":
        if path.stat().st_size > DATA_FILE_MAX_BYTES:
            raise DataFileError(f"data file '{path}' is {path.stat().st_size:,} bytes, over {DATA_FILE_MAX_BYTES:,}")
        return _check_arrays(path, *_read_csv(path, label_column))
    raise DataFileError(f"data file '{path}' must be .npz or .csv, got '{suffix}'")


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with zipfile.ZipFile(path) as archive:
            declared = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise DataFileError(
            f"data file '{path}' is not a valid .npz archive (corrupt, or not written by numpy.savez): {type(err).__name__}"
        ) from err
    if declared > DATA_FILE_MAX_BYTES:
        raise DataFileError(
            f"data file '{path}' expands to {declared:,} bytes, over {DATA_FILE_MAX_BYTES:,} (checked before loading)"
        )
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = {"x", "y"} - set(archive.files)
            if missing:
                raise DataFileError(
                    f"data file '{path}' lacks array(s) {', '.join(sorted(missing))}; it has "
                    f"{len(archive.files)} other array(s) (expected 'x' and 'y')"
                )
            return archive["x"], archive["y"]
    except DataFileError:
        raise
    except Exception as err:  # numpy raises many kinds for a corrupt member (and advises allow_pickle)
        raise DataFileError(
            f"data file '{path}' holds a corrupt or non-numeric array (object arrays are refused): {type(err).__name__}"
        ) from err


def _read_csv(path: Path, label_column: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with path.open(encoding="utf-8") as handle:
            header = handle.readline().strip().split(",")
    except (UnicodeDecodeError, OSError) as err:
        raise DataFileError(f"data file '{path}' is not a UTF-8 text file: {type(err).__name__}") from err
    targets = [c.strip() for c in label_column.split(",") if c.strip()]
    missing = [c for c in targets if c not in header]
    if missing or not targets:
        raise DataFileError(
            f"data file '{path}' has no column '{missing[0] if missing else label_column}' (label-column) "
            f"among its {len(header)} columns"
        )
    try:
        table = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float64, ndmin=2)
    except ValueError as err:
        raise DataFileError(f"data file '{path}' has a value that is not a number, or rows of unequal length") from err
    if table.shape[1] != len(header):
        raise DataFileError(f"data file '{path}' rows have {table.shape[1]} values but the header names {len(header)}")
    columns = [header.index(c) for c in targets]
    y = table[:, columns] if len(columns) > 1 else table[:, columns[0]]
    return np.delete(table, columns, axis=1), y


def _check_arrays(path: Path, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if len(x) == 0:
        raise DataFileError(f"data file '{path}' holds no examples")
    if len(x) != len(y):
        raise DataFileError(f"data file '{path}': x has {len(x)} rows but y has {len(y)}")
    if not np.issubdtype(x.dtype, np.number):
        raise DataFileError(f"data file '{path}': x must be numeric, got dtype {x.dtype}")
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y.reshape(-1)
    if not np.issubdtype(y.dtype, np.number) or not np.all(np.isfinite(y)):
        raise DataFileError(f"data file '{path}': targets y must be finite numbers")
    x = x.astype(np.float32)
    if not np.all(np.isfinite(x)):
        raise DataFileError(f"data file '{path}': x holds NaN or infinite values")
    return x, _as_targets(y)


def _as_targets(y: np.ndarray) -> np.ndarray:
    """Integer vectors as int64 (class labels), anything else as float32 (one-hot, multi-label, real)."""
    if y.ndim == 1 and np.all(y == np.round(y)):
        return y.astype(np.int64)
    return y.astype(np.float32)


def per_node_loader(name: str) -> bool:
    """Whether the user's loader ``name`` returns one node's own data: it takes parameters
    ``(partition_id, num_partitions)``; a loader without parameters returns the whole pool."""
    return ":" in name and bool(inspect.signature(_loader(name)).parameters)


def _loader(name: str):
    from strategies.core.loading import StrategyNameError, load_object

    try:
        return load_object(name, key="dataset")
    except StrategyNameError as err:
        raise DataFileError(str(err)) from err


def load_user_arrays(
    name: str, partition_id: int | None = None, num_partitions: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """A user's loader's ``(x, y)``, checked: the pool of ``load()``, or with ``partition_id``
    one node's own data, ``load(partition_id, num_partitions)``.

    Errors name the loader and what is wrong with its arrays, never their values.
    """
    loader = _loader(name)
    pool = loader() if partition_id is None else loader(partition_id, num_partitions)
    if not isinstance(pool, tuple) or len(pool) != 2:
        raise DataFileError(f"dataset '{name}' must return a tuple (x, y) of numpy arrays; got {type(pool).__name__}")
    try:
        x = np.asarray(pool[0])
        y = pack_targets(pool[1], f"dataset '{name}'") if isinstance(pool[1], Mapping) else np.asarray(pool[1])
    except (TypeError, ValueError) as err:
        if isinstance(pool[1], Mapping) and isinstance(err, ValueError):
            raise DataFileError(str(err)) from err
        raise DataFileError(f"dataset '{name}' returned x or y that is not an array: {type(err).__name__}") from err
    if len(x) == 0 or len(x) != len(y):
        raise DataFileError(f"dataset '{name}': x has {len(x)} rows and y {len(y)}; they must be equal and > 0")
    if is_multi_target(y):  # several outputs: checked by pack_targets
        if not np.issubdtype(x.dtype, np.number) or not np.all(np.isfinite(x)):
            raise DataFileError(f"dataset '{name}': x must be numeric and finite, got dtype {x.dtype}")
        return x.astype(np.float32), y
    if not np.issubdtype(x.dtype, np.number) or not np.issubdtype(y.dtype, np.number):
        raise DataFileError(f"dataset '{name}': x and y must be numeric, got dtypes {x.dtype} and {y.dtype}")
    x = x.astype(np.float32)
    if not np.all(np.isfinite(x)) or not np.all(np.isfinite(y)):
        raise DataFileError(f"dataset '{name}': x or y holds NaN or infinite values")
    if y.ndim == 2 and y.shape[1] == 1:
        y = y.reshape(-1)
    return x, _as_targets(y)


# --------------------------------------------------------------------------- partitioning


def stratified_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (keep, held_out) with ``fraction`` of every class held out (``y``: one integer per
    example, see :func:`fl_app.task.output_spec.strata`)."""
    rng = np.random.default_rng(seed)
    held = []
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        held.append(members[: int(round(fraction * len(members)))])
    held_out = np.sort(np.concatenate(held)) if held else np.empty(0, np.int64)
    keep = np.setdiff1d(np.arange(len(y)), held_out, assume_unique=True)
    return keep, held_out


def partition_indices(
    y: np.ndarray,
    num_partitions: int,
    partitioner: str,
    *,
    alpha: float = 0.5,
    shards_per_client: int = 2,
    seed: int = 42,
) -> tuple[np.ndarray, ...]:
    """Split example indices among ``num_partitions`` clients with a flwr-datasets partitioner
    (``y``: one integer per example to skew by, see :func:`fl_app.task.output_spec.strata`).

    * ``iid``: a seeded shuffle, then equal contiguous parts (``IidPartitioner``);
    * ``dirichlet``: per-class proportions p_k ~ Dir(alpha) (``DirichletPartitioner``; smaller
      alpha, stronger label skew);
    * ``shards``: examples sorted by label, cut in ``num_partitions * shards_per_client`` shards,
      ``shards_per_client`` each (``ShardPartitioner``; McMahan et al. 2017).
    """
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, ShardPartitioner

    if num_partitions > len(y):
        raise ValueError(f"num-partitions ({num_partitions}) exceeds the number of examples ({len(y)})")
    order = np.random.default_rng(seed).permutation(len(y))
    table = Dataset.from_dict({"index": order, "label": y[order]})
    if partitioner == "iid":
        part = IidPartitioner(num_partitions=num_partitions)
    elif partitioner == "dirichlet":
        min_size = max(1, min(10, len(y) // (4 * num_partitions)))
        part = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=alpha,
            min_partition_size=min_size,
            self_balancing=False,
            seed=seed,
        )
    elif partitioner == "shards":
        part = ShardPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            num_shards_per_partition=shards_per_client,
            seed=seed,
        )
    else:
        raise ValueError(f"partitioner must be iid, dirichlet or shards; got '{partitioner}'")
    part.dataset = table
    return tuple(np.asarray(part.load_partition(i)["index"], dtype=np.int64) for i in range(num_partitions))


def split_train_test(
    x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A seeded shuffle, then the last ``test_fraction`` as test (at least one train example)."""
    order = np.random.default_rng(seed).permutation(len(y))
    num_test = min(int(round(test_fraction * len(y))), len(y) - 1)
    train, test = order[: len(y) - num_test], order[len(y) - num_test :]
    return x[train], y[train], x[test], y[test]


# --------------------------------------------------------------------------- entry points


def _pool(settings: Settings) -> tuple[np.ndarray, np.ndarray, int]:
    if settings.dataset == "digits":
        return load_digits_arrays()
    if settings.dataset == "synthetic":
        per_client = settings.synthetic_samples_per_client * settings.num_partitions
        total = int(np.ceil(per_client / (1.0 - settings.server_test_fraction)))
        return make_synthetic_arrays(total, settings.synthetic_classes, settings.synthetic_features, settings.seed)
    if settings.dataset == "huggingface":
        return load_hf_arrays(settings.hf_dataset, settings.hf_label_column)
    if ":" in settings.dataset:
        x, y = load_user_arrays(settings.dataset)
        return x, y, settings.num_classes
    raise ValueError(f"dataset '{settings.dataset}' has no shared pool (each node reads its own file)")


def task_spec(settings: Settings, y: np.ndarray, num_classes: int = 0, source: str = "") -> OutputSpec:
    """The :class:`OutputSpec` of targets ``y`` under the run config's ``task`` and ``num-classes``."""
    try:
        return infer_output_spec(y, settings.task, max(num_classes, settings.num_classes))
    except ValueError as err:
        raise DataFileError(f"{source or 'dataset ' + repr(settings.dataset)}: {err} (task='{settings.task}')") from err


def declared_spec(settings: Settings) -> OutputSpec:
    """The task that ``task`` and ``num-classes`` declare, for nodes that each read their own file
    (``local-file``): every node and the server must build the same model before seeing data.
    ``num-classes`` counts classes, labels (``multilabel``) or targets (``regression``)."""
    task, n = settings.task, settings.num_classes
    if task == "regression":
        return OutputSpec("regression", max(n, 1))
    if task == "multilabel":
        return OutputSpec("multilabel", n, n)
    if task == "binary" or (task == "auto" and n == 2):
        return OutputSpec("binary", 1, 2)
    return OutputSpec.classes(n)


@functools.lru_cache(maxsize=4)
def federated_data(settings: Settings) -> FederatedData:
    """The server test set and every client's partition (cached per process)."""
    x, y, num_classes = _pool(settings)
    spec = task_spec(settings, y, num_classes)
    groups = strata(y, spec)
    keep, held_out = stratified_split(groups, settings.server_test_fraction, settings.seed)
    x_pool, y_pool = x[keep], y[keep]
    partitions = partition_indices(
        groups[keep],
        settings.num_partitions,
        settings.partitioner,
        alpha=settings.dirichlet_alpha,
        shards_per_client=settings.shards_per_client,
        seed=settings.seed,
    )
    return FederatedData(x_pool, y_pool, partitions, x[held_out], y[held_out], spec.num_classes, spec)


def node_data_path(settings: Settings, node_config: Mapping[str, Any], partition_id: int) -> str:
    """The data file this node may read ("" for the configured pool).

    The node's own ``data-path`` (its node config, set by whoever runs the node) is trusted. The
    run config's ``data-path`` comes from the server, so a node reads it only inside its own
    ``data-root`` (node config; symlinks resolved): a server cannot make a node train on, or
    report errors about, any other file. In Flower's simulation engine, whose virtual nodes have
    only ``partition-id`` and ``num-partitions`` in their node config, the run config is the
    user's own and needs no root.
    """
    own = str(node_config.get("data-path", ""))
    if own or settings.dataset != "local-file" or not settings.data_path:
        return own
    path = settings.data_path.replace("{partition-id}", str(partition_id))
    root = str(node_config.get("data-root", ""))
    if not root:
        if "num-partitions" in node_config:  # a simulated node
            return path
        raise DataFileError(
            f"the run config's data-path '{settings.data_path}' is not read by this node, which reads the "
            "server's paths only inside its own data-root: start its SuperNode with --node-config "
            "\"data-root='/its/data'\" or give it its own data-path"
        )
    resolved, allowed = Path(path).expanduser().resolve(), Path(root).expanduser().resolve()
    if not resolved.is_relative_to(allowed):
        raise DataFileError(f"the run config's data-path '{path}' is outside this node's data-root '{root}'")
    return str(resolved)


def client_data(settings: Settings, partition_id: int, data_path: str = "") -> ClientData:
    """One client's train/test split: its partition of the pool, its own local file, or what a
    per-node loader (:func:`per_node_loader`) returns for it."""
    seed = settings.seed + 1000 * (partition_id + 1)
    path = data_path or settings.data_path
    if settings.dataset == "local-file" or data_path:
        if not path:
            raise DataFileError(
                "dataset='local-file' but this node has no data file: start its SuperNode with "
                "--node-config \"data-path='/path/to/local.npz'\" (or set data-path in the run config)"
            )
        source = f"data file '{path.replace('{partition-id}', str(partition_id))}'"
        x, y = load_local_file(path.replace("{partition-id}", str(partition_id)), settings.label_column)
        x, spec = _node_own(settings, x, y, source)
    elif per_node_loader(settings.dataset):
        x, y = load_user_arrays(settings.dataset, partition_id, settings.num_partitions)
        x, spec = _node_own(settings, x, y, f"dataset '{settings.dataset}' (partition {partition_id})")
    else:
        if not 0 <= partition_id < settings.num_partitions:
            raise ValueError(f"partition-id {partition_id} is outside [0, {settings.num_partitions}) (num-partitions)")
        data = federated_data(settings)
        index = data.partitions[partition_id]
        x, y, spec = data.x[index], data.y[index], data.spec
    return ClientData(
        *split_train_test(x, y, settings.test_fraction, seed), num_classes=spec.num_classes, output_spec=spec
    )


def _node_own(settings: Settings, x: np.ndarray, y: np.ndarray, source: str) -> tuple[np.ndarray, OutputSpec]:
    """A node's own data checked against the task the run config declares (:func:`declared_spec`),
    ``x`` reshaped to ``input-shape``; errors name ``source``."""
    if is_multi_target(y):
        raise DataFileError(
            f"{source}: targets for several outputs need a loader of the whole pool, load() -> (x, {{output: y}}); "
            "a node's own data (local-file, load(partition_id, num_partitions)) declares one task in the run config"
        )
    found, spec = task_spec(settings, y, source=source), declared_spec(settings)
    if found.task == spec.task == "multiclass" and found.num_classes > spec.num_classes:
        raise DataFileError(f"{source}: label {found.num_classes - 1} is outside [0, {spec.num_classes}) (num-classes)")
    if (found.task, found.units) != (spec.task, spec.units):
        labels = f" (labels 0 to {found.num_classes - 1})" if found.classification else ""
        raise DataFileError(
            f"{source}: its targets make a {found.task} task with {found.units} output(s){labels}, "
            f"but the run config declares {spec.task} with {spec.units} (task='{settings.task}', "
            f"num-classes={settings.num_classes})"
        )
    shape = settings.parsed_input_shape()
    if shape is not None:
        if int(np.prod(x.shape[1:])) != int(np.prod(shape)):
            raise DataFileError(f"{source}: examples have shape {x.shape[1:]}, which does not fit input-shape {shape}")
        x = x.reshape((len(x), *shape))
    return x, dataclasses.replace(spec, one_hot=found.one_hot)
