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
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from fl_app.server.run_directory import RoundRecord
from strategies.aggregation.guard import GuardedStrategy
from strategies.core.reporting import RoundReporting

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


# --------------------------------------------------------------------------- strategy state


def strategy_state(strategy: RoundReporting) -> dict[str, Any]:
    """The strategy's resumable state, as the checkpoint stores it."""
    return {"state_dict": strategy.state_dict()}


def restore_strategy_state(strategy: RoundReporting, state: dict[str, Any]) -> None:
    """Put ``state`` (from :func:`strategy_state`) back into a freshly built strategy.

    Checkpoints written before strategies were guarded keep Flower's optimizer attributes under
    ``attributes``; they are restored the same way.
    """
    saved = state["state_dict"] if "state_dict" in state else state.get("attributes", {})
    try:
        strategy.load_state_dict(saved)
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"the checkpoint's strategy state cannot be restored: {err}") from err


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


def _class_name(strategy: object) -> str:
    """The strategy's class as ``module.QualifiedName``, for whoever reads the checkpoint."""
    return f"{type(strategy).__module__}.{type(strategy).__qualname__}"


def save_checkpoint(
    run_dir: str | Path,
    server_round: int,
    weights: list[np.ndarray],
    history: list[RoundRecord],
    strategy: RoundReporting,
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
    state = _split_arrays(strategy_state(strategy), arrays)
    np.savez(tmp / "strategy.npz", **arrays)
    payload = {
        "round": server_round,
        "history": [dataclasses.asdict(r) for r in history],
        "strategy": state,
        "strategy-class": _class_name(strategy.inner if isinstance(strategy, GuardedStrategy) else strategy),
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
    directory whose ``latest`` file names the run."""
    path = Path(path).expanduser()
    candidates = [path / CHECKPOINT_DIR, path]
    if (path / "latest").is_file():
        latest = Path((path / "latest").read_text(encoding="utf-8").strip())
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
    """Read the checkpoint that :func:`find_checkpoint` finds for ``path``."""
    folder = find_checkpoint(path)
    try:
        payload = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        with np.load(folder / "weights.npz", allow_pickle=False) as archive:
            weights = [archive[f"arr_{i}"] for i in range(len(archive.files))]
        with np.load(folder / "strategy.npz", allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in archive.files}
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"checkpoint '{folder}' cannot be read: {err}") from err
    history = [RoundRecord(**record) for record in payload["history"]]
    return Checkpoint(
        round=int(payload["round"]),
        weights=weights,
        history=history,
        strategy_state=_join_arrays(payload["strategy"], arrays),
        run_config=payload.get("run-config", {}),
    )


def check_compatible(checkpoint: Checkpoint, weights: list[np.ndarray]) -> None:
    """Raise :class:`CheckpointError` unless the checkpoint's arrays fit the model built now."""
    got = [tuple(w.shape) for w in checkpoint.weights]
    want = [tuple(w.shape) for w in weights]
    if got != want:
        raise CheckpointError(
            f"the checkpoint's model has array shapes {got}, the configured model {want}; "
            "resume with the model, input-shape and num-classes of the original run"
        )
