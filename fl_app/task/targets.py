"""Several targets per example, for models with several outputs.

A user's loader gives a multi-output model's targets as Keras takes them in ``model.fit``: a dict
``{output name: targets}``, one array per output, each with one row per example (integer classes,
one-hot or 0/1 rows, or real numbers, as for a single output). The app keeps them as **one NumPy
structured array** (:func:`pack_targets`): one record per example, one field per output, each field
of its output's per-example shape and dtype. Every step that selects examples (the server's held-out
set, partitioning, a client's test split, simulated label attacks) indexes rows, and a structured
array's rows are indexed like any array's, so none of them needs to know. At the Keras boundary
(:mod:`fl_app.task.compiled_loop`, ``model.fit``) :func:`keras_targets` turns it back into the dict.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


def is_multi_target(y: Any) -> bool:
    """Whether ``y`` holds several targets per example (a structured array with named fields)."""
    return isinstance(y, np.ndarray) and y.dtype.names is not None


def pack_targets(targets: Mapping[str, Any], source: str = "dataset") -> np.ndarray:
    """One structured array from ``{output name: array}`` (see the module docstring).

    Integer targets in one column become int64 (classes), others float32; an ``(n, 1)`` array
    becomes ``(n,)``. ``ValueError`` naming ``source`` and the output for a count of rows that
    differs, non-numeric or non-finite values, or no outputs.
    """
    if not targets:
        raise ValueError(f"{source}: y is an empty dict; give one array of targets per model output")
    fields: list[tuple[Any, ...]] = []
    columns: dict[str, np.ndarray] = {}
    rows = None
    for name, value in targets.items():
        array = np.asarray(value)
        if not isinstance(name, str) or not name:
            raise ValueError(f"{source}: the keys of y must be the model's output names (strings); got {name!r}")
        if array.ndim == 0 or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
            raise ValueError(f"{source}: targets of output '{name}' must be a numeric array with one row per example")
        if rows is None:
            rows = len(array)
        if len(array) != rows:
            raise ValueError(f"{source}: output '{name}' has {len(array)} rows of targets, the first output {rows}")
        if not np.all(np.isfinite(array.astype(np.float64))):
            raise ValueError(f"{source}: targets of output '{name}' hold NaN or infinite values")
        if array.ndim == 2 and array.shape[1] == 1:
            array = array.reshape(-1)
        integral = array.ndim == 1 and bool(np.all(array == np.round(array)))
        array = array.astype(np.int64 if integral else np.float32)
        columns[name] = array
        fields.append((name, array.dtype, array.shape[1:]) if array.ndim > 1 else (name, array.dtype))
    packed = np.empty(rows or 0, dtype=np.dtype(fields))
    for name, array in columns.items():
        packed[name] = array
    return packed


def keras_targets(y: np.ndarray) -> Any:
    """``y`` as Keras takes it: a dict ``{output name: array}`` for several targets, else ``y``."""
    if not is_multi_target(y):
        return y
    assert y.dtype.names is not None
    return {name: np.ascontiguousarray(y[name]) for name in y.dtype.names}


def check_output_names(model, y: np.ndarray) -> None:
    """``ValueError`` unless the fields of ``y`` name exactly the model's outputs."""
    if not is_multi_target(y):
        return
    assert y.dtype.names is not None
    outputs = list(getattr(model, "output_names", None) or [])
    if sorted(outputs) != sorted(y.dtype.names):
        raise ValueError(
            f"the data gives targets for outputs {list(y.dtype.names)} but model '{model.name}' has outputs "
            f"{outputs}: the keys of the loader's y dict must be the model's output names (its output layers' names)"
        )
