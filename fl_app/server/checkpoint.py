"""Server checkpoints: everything a run needs to continue after the server process stops.

After every round the ServerApp writes ``<run dir>/checkpoint/``::

    weights.npz      the global model's arrays, in order (arr_0, arr_1, ...)
    strategy.npz     the numpy arrays of the strategy's state (server-optimizer moments, ...)
    state.json       last completed round, the history so far, the strategy's other state, the
                     run config; written last, so a checkpoint without it is incomplete

The folder is written under a temporary name and renamed into place, so a process killed while
writing leaves the previous checkpoint intact.

Strategy state is what the server's strategy (a :class:`~strategies.aggregation.guard.GuardedStrategy`)
gives through :class:`~strategies.core.reporting.RoundReporting`: ``state_dict() -> dict`` (JSON-able
values or numpy arrays, nested in dicts and lists) and ``load_state_dict(state)``. The guard passes
on its inner strategy's own ``state_dict``, or the attributes in which Flower's built-in server
optimizers keep theirs: ``m_t`` and ``v_t`` of FedAdam / FedYogi / FedAdagrad (Reddi et al. 2021,
"Adaptive Federated Optimization"), and ``momentum_vector`` of FedAvgM (Hsu et al. 2019).

``resume-from=<run dir>`` in the run config continues from the last completed round.
:func:`resume_strategy` refuses a checkpoint written by another strategy class, or whose privacy
differs from the run's (a private strategy resumed from rounds that ran without DP would report an
epsilon for a model whose true epsilon is infinite; a non-private run would drop the accountant):
``state.json`` records ``strategy-class`` and ``privacy`` (``private``: the strategy state holds a
privacy accountant; ``dp-mode``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fl_app.server.run_directory import RoundRecord, latest_run
from strategies.aggregation.guard import GuardedStrategy
from strategies.core.reporting import Private, Stateful

CHECKPOINT_DIR = "checkpoint"
_ARRAY = "__ndarray__"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message says why."""


@dataclasses.dataclass
class Checkpoint:
    """A run's state after ``round`` completed rounds (round 0: the initial model)."""

    round: int
    weights: list[np.ndarray]
    history: list[RoundRecord]
    strategy_state: dict[str, Any]
    run_config: dict[str, Any]
    path: Path | None = None
    strategy_class: str | None = None
    privacy: dict[str, Any] | None = None


# --------------------------------------------------------------------------- strategy state


def strategy_state(strategy: Stateful) -> dict[str, Any]:
    """The strategy's resumable state, as the checkpoint stores it."""
    return {"state_dict": strategy.state_dict()}


def restore_strategy_state(strategy: Stateful, state: dict[str, Any]) -> None:
    """Put ``state`` (from :func:`strategy_state`) back into a freshly built strategy.

    Checkpoints written before strategies were guarded keep Flower's optimizer attributes under
    ``attributes``; they are restored the same way.
    """
    saved = state["state_dict"] if "state_dict" in state else state.get("attributes", {})
    bad = _non_finite(saved)
    if bad:
        raise CheckpointError(f"the checkpoint's strategy state holds NaN or infinite values at {bad}")
    try:
        strategy.load_state_dict(saved)
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"the checkpoint's strategy state cannot be restored: {err}") from err


def _non_finite(value: Any, where: str = "state") -> str:
    """The path of the first non-finite number in a nested state ("" when all are finite)."""
    if isinstance(value, np.ndarray):
        return where if np.issubdtype(value.dtype, np.number) and not np.isfinite(value).all() else ""
    if isinstance(value, float):
        return "" if math.isfinite(value) else where
    if isinstance(value, Mapping):
        items: Any = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return ""
    for key, item in items:
        found = _non_finite(item, f"{where}[{key!r}]")
        if found:
            return found
    return ""


def _unguarded(strategy: object) -> object:
    """The strategy the guard wraps (its class and privacy are what a checkpoint records)."""
    return strategy.inner if isinstance(strategy, GuardedStrategy) else strategy


def strategy_class_name(strategy: object) -> str:
    """``module.QualifiedName`` of the (unguarded) strategy's class, as ``state.json`` records it."""
    inner = _unguarded(strategy)
    return f"{type(inner).__module__}.{type(inner).__qualname__}"


def _private_state(state: Mapping[str, Any]) -> bool:
    inner = state.get("state_dict")
    return isinstance(inner, Mapping) and "privacy-accountant" in inner


def privacy_record(strategy: Stateful) -> dict[str, Any]:
    """``{"private": bool, "dp-mode": str | None}``: whether the strategy is differentially private
    (its rounds are accounted) and its DP mode (``dp-mode`` of the run config), as it reports them
    (:class:`strategies.core.reporting.Private`)."""
    mode = strategy.dp_mode if isinstance(strategy, Private) else None
    return {"private": mode is not None, "dp-mode": mode}


def check_same_strategy(checkpoint: Checkpoint, strategy: Stateful) -> None:
    """Raise :class:`CheckpointError` unless ``strategy`` is of the class that wrote the checkpoint
    and has the same privacy (accountant present or not, same dp-mode).

    Checkpoints written before ``privacy`` was recorded are judged by their strategy state.
    """
    where = f"checkpoint '{checkpoint.path}'" if checkpoint.path else "the checkpoint"
    current = strategy_class_name(strategy)
    if checkpoint.strategy_class and checkpoint.strategy_class != current:
        raise CheckpointError(
            f"{where} was written by strategy {checkpoint.strategy_class}, this run's strategy is "
            f"{current}: resume with the strategy (and run config) that wrote it, or start a new run"
        )
    recorded = checkpoint.privacy or {"private": _private_state(checkpoint.strategy_state), "dp-mode": None}
    now = privacy_record(strategy)
    if bool(recorded.get("private")) != now["private"]:
        if now["private"]:
            raise CheckpointError(
                f"{where} holds no privacy state (its {checkpoint.round} rounds ran without DP, so "
                f"the model's epsilon is infinite), but this run's strategy {current} is private: "
                "resuming would report an epsilon that does not hold; start a new private run"
            )
        raise CheckpointError(
            f"{where} holds a privacy accountant (its rounds ran with DP), but this run's strategy "
            f"{current} is not private: resume with the private run config that wrote it"
        )
    if now["private"] and recorded.get("dp-mode") and recorded.get("dp-mode") != now["dp-mode"]:
        raise CheckpointError(
            f"{where} was written with dp-mode '{recorded['dp-mode']}', this run has dp-mode "
            f"'{now['dp-mode']}': one run's epsilon cannot mix them; resume with dp-mode '{recorded['dp-mode']}' "
            "(a '+distributed-noise' suffix is SecAgg+'s secagg-dp='distributed')"
        )


def resume_strategy(checkpoint: Checkpoint, strategy: Stateful) -> None:
    """Check that ``strategy`` may continue ``checkpoint`` (:func:`check_same_strategy`), then
    restore its state (:func:`restore_strategy_state`)."""
    check_same_strategy(checkpoint, strategy)
    restore_strategy_state(strategy, checkpoint.strategy_state)


# --------------------------------------------------------------------------- (de)serialisation


def _split_arrays(value: Any, arrays: dict[str, np.ndarray]) -> Any:
    """``value`` with every numpy array replaced by a reference into ``arrays``."""
    if isinstance(value, np.ndarray):
        key = f"a{len(arrays)}"
        arrays[key] = value
        return {_ARRAY: key}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {str(k): _split_arrays(v, arrays) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_split_arrays(v, arrays) for v in value]
    return value


def _join_arrays(value: Any, arrays: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {_ARRAY}:
            return np.array(arrays[value[_ARRAY]])
        return {k: _join_arrays(v, arrays) for k, v in value.items()}
    if isinstance(value, list):
        return [_join_arrays(v, arrays) for v in value]
    return value


def save_checkpoint(
    run_dir: str | Path,
    server_round: int,
    weights: list[np.ndarray],
    history: list[RoundRecord],
    strategy: Stateful,
    run_config: dict[str, Any],
) -> Path:
    """Write ``<run_dir>/checkpoint`` atomically (temporary folder, then rename)."""
    run_dir = Path(run_dir)
    final = run_dir / CHECKPOINT_DIR
    tmp = run_dir / f"{CHECKPOINT_DIR}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    np.savez(tmp / "weights.npz", *[np.asarray(w) for w in weights])
    arrays: dict[str, np.ndarray] = {}
    raw_state = strategy_state(strategy)
    state = _split_arrays(raw_state, arrays)
    np.savez(tmp / "strategy.npz", **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds as bool
    payload = {
        "round": server_round,
        "history": [dataclasses.asdict(r) for r in history],
        "strategy": state,
        "strategy-class": strategy_class_name(strategy),
        "privacy": privacy_record(strategy),
        "run-config": run_config,
    }
    (tmp / "state.json").write_text(json.dumps(_split_arrays(payload, {}), indent=1) + "\n", encoding="utf-8")
    old = run_dir / f"{CHECKPOINT_DIR}.old"
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old)
    return final


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint folder for ``path``: a run directory, its checkpoint folder, or an output
    directory whose ``latest`` names the run."""
    path = Path(path).expanduser()
    candidates = [path / CHECKPOINT_DIR, path]
    latest = latest_run(path)
    if latest is not None:
        candidates.insert(0, latest / CHECKPOINT_DIR)
    for candidate in candidates:
        if (candidate / "state.json").is_file() and (candidate / "weights.npz").is_file():
            return candidate
    old = path / f"{CHECKPOINT_DIR}.old"
    if (old / "state.json").is_file():  # killed between the two renames
        return old
    raise CheckpointError(
        f"resume-from '{path}' holds no checkpoint (expected {path / CHECKPOINT_DIR}/state.json "
        "and weights.npz, written after every round of a run)"
    )


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read the checkpoint that :func:`find_checkpoint` finds for ``path``.

    Raises :class:`CheckpointError` naming the folder and the problem for anything that is not a
    checkpoint this code wrote: an unreadable or truncated ``.npz``, ``state.json`` that is not
    JSON or lacks a field, a round that is not a whole number >= 0 or disagrees with the history,
    a history record of other fields, and weights that are not finite floating-point arrays.
    """
    folder = find_checkpoint(path)
    try:
        payload = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        with np.load(folder / "weights.npz", allow_pickle=False) as archive:
            weights = [archive[f"arr_{i}"] for i in range(len(archive.files))]
        with np.load(folder / "strategy.npz", allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in archive.files}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"checkpoint '{folder}' cannot be read: {type(err).__name__}: {err}") from err
    where = f"checkpoint '{folder}'"
    if not isinstance(payload, dict):
        raise CheckpointError(f"{where}: state.json holds {type(payload).__name__}, not an object")
    missing = [key for key in ("round", "history", "strategy") if key not in payload]
    if missing:
        raise CheckpointError(f"{where}: state.json lacks {', '.join(missing)}")
    completed = payload["round"]
    if isinstance(completed, bool) or not isinstance(completed, int) or completed < 0:
        raise CheckpointError(f"{where}: round must be a whole number >= 0, got {completed!r}")
    try:
        history = [RoundRecord(**record) for record in payload["history"]]
    except TypeError as err:
        raise CheckpointError(f"{where}: the history is not a list of round records: {err}") from err
    trained = [record.round for record in history if record.round > 0]
    if trained and trained[-1] != completed:
        raise CheckpointError(f"{where}: round is {completed} but the history ends with round {trained[-1]}")
    for i, array in enumerate(weights):
        if not np.issubdtype(array.dtype, np.floating) or not np.isfinite(array).all():
            raise CheckpointError(f"{where}: weights array {i} ({array.dtype}) is not finite floating-point")
    try:
        state = _join_arrays(payload["strategy"], arrays)
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"{where}: the strategy state refers to arrays strategy.npz lacks: {err}") from err
    return Checkpoint(
        round=completed,
        weights=weights,
        history=history,
        strategy_state=state,
        run_config=payload.get("run-config", {}),
        path=folder,
        strategy_class=payload.get("strategy-class"),
        privacy=payload.get("privacy"),
    )


def check_compatible(checkpoint: Checkpoint, weights: list[np.ndarray], num_rounds: int) -> None:
    """Raise :class:`CheckpointError` unless the checkpoint's arrays fit the model built now (shapes
    and dtypes) and its round lies within the run's ``num_rounds``."""
    where = f"checkpoint '{checkpoint.path}'" if checkpoint.path else "the checkpoint"
    got = [(tuple(w.shape), w.dtype.name) for w in checkpoint.weights]
    want = [(tuple(w.shape), w.dtype.name) for w in weights]
    if got != want:
        raise CheckpointError(
            f"{where}'s model has arrays (shape, dtype) {got}, the configured model {want}; "
            "resume with the model, input-shape and num-classes of the original run"
        )
    if checkpoint.round > num_rounds:
        raise CheckpointError(
            f"{where} is after round {checkpoint.round}, beyond this run's num-server-rounds={num_rounds}"
        )
