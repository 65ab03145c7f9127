"""Strategy names in the run config, mapped to Flower Message-API strategies.

``strategy`` in the run config is either a registered name — Flower's ``fedavg``, ``fedprox``,
``fedadam``, ``fedyogi``, ``fedadagrad``, ``fedavgm``; our robust ``median``, ``trimmed-mean``,
``krum``, ``multi-krum``, ``bulyan``, ``geometric-median``, ``centered-clipping``, and ``robust``
(the rule named by ``aggregation-rule``) — or a dotted path ``package.module:Name`` to a user's own
code:

* a :class:`flwr.serverapp.strategy.Strategy` subclass is constructed with those of the common
  sampling arguments (``fraction_train``, ``min_train_nodes``, …) that its ``__init__`` accepts;
* any other callable is a factory, called as ``factory(run_config)`` and expected to return a
  ``Strategy``.

Nothing here imports TensorFlow.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from flwr.serverapp.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedProx,
    FedYogi,
    Strategy,
)

from strategies.core.loading import StrategyNameError, load_object
from strategies.core.sampling import sampling_kwargs

__all__ = [
    "StrategyNameError",
    "build_strategy",
    "check_strategy_name",
    "load_object",
    "register_strategy",
    "sampling_kwargs",
    "strategy_names",
]

StrategyFactory = Callable[[Mapping[str, Any]], Strategy]


def _fedopt_kwargs(run_config: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "eta": float(run_config.get("fedopt-eta", 0.1)),
        "eta_l": float(run_config.get("learning-rate", 0.01)),
    }


def _aggregation(rule: str | None) -> StrategyFactory:
    """Factory of :class:`strategies.aggregation.strategy.AggregationStrategy` for ``rule`` (None: the
    run config's ``aggregation-rule``)."""

    def factory(run_config: Mapping[str, Any]) -> Strategy:
        from strategies.aggregation.strategy import build_aggregation_strategy

        return build_aggregation_strategy(rule or str(run_config.get("aggregation-rule", "mean")), run_config)

    return factory


BUILTIN_STRATEGIES: dict[str, StrategyFactory] = {
    "fedavg": lambda rc: FedAvg(**sampling_kwargs(rc)),
    "fedprox": lambda rc: FedProx(**sampling_kwargs(rc), proximal_mu=float(rc.get("proximal-mu", 0.0))),
    "fedadam": lambda rc: FedAdam(**sampling_kwargs(rc), **_fedopt_kwargs(rc)),
    "fedyogi": lambda rc: FedYogi(**sampling_kwargs(rc), **_fedopt_kwargs(rc)),
    "fedadagrad": lambda rc: FedAdagrad(**sampling_kwargs(rc), **_fedopt_kwargs(rc)),
    "fedavgm": lambda rc: FedAvgM(
        **sampling_kwargs(rc),
        server_learning_rate=float(rc.get("server-learning-rate", 1.0)),
        server_momentum=float(rc.get("server-momentum", 0.0)),
    ),
}

ROBUST_STRATEGIES: dict[str, StrategyFactory] = {
    "robust": _aggregation(None),
    **{
        name: _aggregation(name)
        for name in (
            "median",
            "trimmed-mean",
            "krum",
            "multi-krum",
            "bulyan",
            "geometric-median",
            "centered-clipping",
        )
    },
}


def _dp_fedavg(run_config: Mapping[str, Any]) -> Strategy:
    from strategies.private.dp_fedavg import build_dp_strategy

    return build_dp_strategy(run_config)


PRIVATE_STRATEGIES: dict[str, StrategyFactory] = {"dp-fedavg": _dp_fedavg}

_REGISTRY: dict[str, StrategyFactory] = {**BUILTIN_STRATEGIES, **ROBUST_STRATEGIES, **PRIVATE_STRATEGIES}


def register_strategy(name: str, factory: StrategyFactory) -> None:
    """Make ``factory`` selectable as ``strategy='name'`` in the run config."""
    if ":" in name:
        raise ValueError(f"strategy names may not contain ':', got '{name}'")
    _REGISTRY[name] = factory


def strategy_names() -> list[str]:
    """The registered strategy names, sorted."""
    return sorted(_REGISTRY)


def check_strategy_name(name: str) -> None:
    """Raise :class:`StrategyNameError` unless ``name`` resolves to a strategy."""
    if ":" in name:
        load_object(name)
    elif name not in _REGISTRY:
        raise StrategyNameError(
            f"unknown strategy '{name}'; known: {', '.join(strategy_names())}, or a dotted path 'package.module:Name'"
        )


def build_strategy(name: str, run_config: Mapping[str, Any]) -> Strategy:
    """Build the strategy that ``name`` selects, configured from ``run_config``."""
    check_strategy_name(name)
    if ":" not in name:
        return _REGISTRY[name](run_config)
    obj = load_object(name)
    if inspect.isclass(obj) and issubclass(obj, Strategy):
        accepted = inspect.signature(obj.__init__).parameters
        kwargs = {k: v for k, v in sampling_kwargs(run_config).items() if k in accepted}
        strategy = obj(**kwargs)
    else:
        strategy = obj(run_config)
    if not isinstance(strategy, Strategy):
        raise StrategyNameError(
            f"strategy '{name}' returned {type(strategy).__name__}, not a flwr.serverapp.strategy.Strategy"
        )
    return strategy
