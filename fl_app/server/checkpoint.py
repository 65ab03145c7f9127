"""Server checkpoints: everything a run needs to continue after the server process stops.

After every round the ServerApp writes ``<run dir>/checkpoint/``::

    weights.npz      the global model's arrays, in order (arr_0, arr_1, ...)
    strategy.npz     the numpy arrays of the strategy's state (server-optimizer moments, ...)
    state.json       last completed round, the history so far, the strategy's other state, the
                     run config; written last, so a checkpoint without it is incomplete

The folder is written under a temporary name and renamed into place, so a process killed while
writing leaves the previous checkpoint intact.

Strategy state follows the project's protocol: a strategy MAY define ``state_dict() -> dict``
(JSON-able values or numpy arrays, nested in dicts and lists) and ``load_state_dict(state)``.
Flower's built-in server optimizers keep their state in attributes instead, which are saved here:
``m_t`` and ``v_t`` of FedAdam / FedYogi / FedAdagrad (Reddi et al. 2021, "Adaptive Federated
Optimization"), and ``momentum_vector`` of FedAvgM (Hsu et al. 2019).

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
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fl_app.server.run_directory import RoundRecord

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


def _builtin_attributes(strategy: object) -> tuple[str, ...]:
    from flwr.serverapp.strategy import FedAvgM
    from flwr.serverapp.strategy.fedopt import FedOpt

    if isinstance(strategy, FedOpt):
        return ("m_t", "v_t")
    if isinstance(strategy, FedAvgM):
        return ("momentum_vector",)
    return ()


def strategy_state(strategy: object) -> dict[str, Any]:
    """The strategy's resumable state: its ``state_dict()``, or the built-ins' attributes."""
    if callable(getattr(strategy, "state_dict", None)):
        return {"state_dict": strategy.state_dict()}
    return {"attributes": {name: getattr(strategy, name) for name in _builtin_attributes(strategy)}}


def strategy_class_name(strategy: object) -> str:
    """``module.QualifiedName`` of the strategy's class, as ``state.json`` records it."""
    return f"{type(strategy).__module__}.{type(strategy).__qualname__}"


def _private_state(state: Mapping[str, Any]) -> bool:
    inner = state.get("state_dict")
    return isinstance(inner, Mapping) and "privacy-accountant" in inner


def privacy_record(strategy: object, state: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``{"private": bool, "dp-mode": str | None}``: whether the strategy's state holds a privacy
    accountant (its rounds are accounted), and its DP mode (``dp-mode`` of the run config)."""
    private = _private_state(strategy_state(strategy) if state is None else state)
    mode = None
    if private:
        mode = getattr(strategy, "mode", None) or getattr(getattr(strategy, "settings", None), "dp_mode", None)
    return {"private": private, "dp-mode": mode if isinstance(mode, str) else None}


def check_same_strategy(checkpoint: Checkpoint, strategy: object) -> None:
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
    recorded = checkpoint.privacy or privacy_record(object(), checkpoint.strategy_state)
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
            f"'{now['dp-mode']}': one run's epsilon cannot mix them; resume with dp-mode '{recorded['dp-mode']}'"
        )


def resume_strategy(checkpoint: Checkpoint, strategy: object) -> None:
    """Check that ``strategy`` may continue ``checkpoint`` (:func:`check_same_strategy`), then
    restore its state (:func:`restore_strategy_state`)."""
    check_same_strategy(checkpoint, strategy)
    restore_strategy_state(strategy, checkpoint.strategy_state)


def restore_strategy_state(strategy: object, state: dict[str, Any]) -> None:
    """Put ``state`` (from :func:`strategy_state`) back into a freshly built strategy."""
    if "state_dict" in state:
        loader = getattr(strategy, "load_state_dict", None)
        if not callable(loader):
            raise CheckpointError(
                f"the checkpoint holds a state_dict but strategy {type(strategy).__name__} has no "
                "load_state_dict(); resume with the strategy that wrote it"
            )
        loader(state["state_dict"])
        return
    attributes = state.get("attributes", {})
    expected = set(_builtin_attributes(strategy))
    if set(attributes) != expected:
        raise CheckpointError(
            f"the checkpoint's strategy state has {sorted(attributes)} but strategy "
            f"{type(strategy).__name__} keeps {sorted(expected)}; resume with the same strategy"
        )
    for name, value in attributes.items():
        setattr(strategy, name, value)


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
    strategy: object,
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
    np.savez(tmp / "strategy.npz", **arrays)
    payload = {
        "round": server_round,
        "history": [dataclasses.asdict(r) for r in history],
        "strategy": state,
        "strategy-class": strategy_class_name(strategy),
        "privacy": privacy_record(strategy, raw_state),
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
        path=folder,
        strategy_class=payload.get("strategy-class"),
        privacy=payload.get("privacy"),
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
