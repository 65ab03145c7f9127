"""Strategy names in the run config, mapped to Flower Message-API strategies.

``strategy`` in the run config is either a registered name — Flower's ``fedavg``, ``fedprox``,
``fedadam``, ``fedyogi``, ``fedadagrad``, ``fedavgm``; our robust ``median``, ``trimmed-mean``,
``krum``, ``multi-krum``, ``bulyan``, ``geometric-median``, ``centered-clipping``, ``dnc``, and ``robust``
(the rule named by ``aggregation-rule``); ``dp-fedavg``, ``dp-ftrl`` — or a dotted path ``package.module:Name``
to a user's own code:

* a :class:`flwr.serverapp.strategy.Strategy` subclass is constructed with those of the common
  sampling arguments (``fraction_train``, ``min_train_nodes``, …) that its ``__init__`` accepts;
* any other callable is a factory, called as ``factory(run_config)`` with the run config mapping
  (kebab-case keys, every key present) and expected to return a ``Strategy``.

Registered names are built from a typed :class:`StrategyParams` (the app builds it from its
settings, the one place of the run config's defaults). Nothing here imports TensorFlow.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedProx,
    FedYogi,
    Strategy,
)

from strategies.core.checks import non_negative, positive
from strategies.core.loading import StrategyNameError, load_object

if TYPE_CHECKING:  # the strategy modules load when a strategy is built
    from strategies.aggregation.strategy import AggregationParams
    from strategies.core.sampling import SamplingParams
    from strategies.private.dp_fedavg import DpParams

__all__ = [
    "StrategyNameError",
    "StrategyParams",
    "build_strategy",
    "check_dp_inner_strategy",
    "check_strategy_name",
    "check_user_strategy",
    "load_object",
    "register_strategy",
    "strategy_names",
]


@dataclasses.dataclass(frozen=True)
class StrategyParams:
    """Everything a registered strategy is built from (run-config keys in brackets; defaults live
    in ``fl_app.config``).

    Attributes:
        aggregation: sampling, the rule and its parameters, weights, bounds and the server step
            (also FedAvgM's ``server-learning-rate`` and ``server-momentum``).
        dp: DP-FedAvg's ``dp-*`` settings.
        proximal_mu: FedProx's proximal term (``proximal-mu``), >= 0.
        fedopt_eta: server learning rate of FedAdam, FedYogi, FedAdagrad (``fedopt-eta``), > 0.
        learning_rate: the clients' learning rate, FedOpt's ``eta_l`` (``learning-rate``), > 0.
        run_config: the run config mapping, handed only to a user's dotted-path factory.
    """

    aggregation: AggregationParams
    dp: DpParams
    proximal_mu: float
    fedopt_eta: float
    learning_rate: float
    run_config: Mapping[str, Any]

    def __post_init__(self) -> None:
        non_negative("proximal-mu", self.proximal_mu)
        positive("fedopt-eta", self.fedopt_eta)
        positive("learning-rate", self.learning_rate)

    @property
    def sampling(self) -> SamplingParams:
        """Node sampling, shared by every strategy."""
        return self.aggregation.sampling


StrategyFactory = Callable[[StrategyParams], Strategy]


def _fedopt_kwargs(params: StrategyParams) -> dict[str, Any]:
    return {"eta": params.fedopt_eta, "eta_l": params.learning_rate}


def _aggregation(rule: str | None) -> StrategyFactory:
    """Factory of :class:`strategies.aggregation.strategy.AggregationStrategy` for ``rule`` (None: the
    run config's ``aggregation-rule``)."""

    def factory(params: StrategyParams) -> Strategy:
        from strategies.aggregation.strategy import build_aggregation_strategy

        return build_aggregation_strategy(rule or params.aggregation.rule, params.aggregation)

    return factory


BUILTIN_STRATEGIES: dict[str, StrategyFactory] = {
    "fedavg": lambda p: FedAvg(**p.sampling.kwargs()),
    "fedprox": lambda p: FedProx(**p.sampling.kwargs(), proximal_mu=p.proximal_mu),
    "fedadam": lambda p: FedAdam(**p.sampling.kwargs(), **_fedopt_kwargs(p)),
    "fedyogi": lambda p: FedYogi(**p.sampling.kwargs(), **_fedopt_kwargs(p)),
    "fedadagrad": lambda p: FedAdagrad(**p.sampling.kwargs(), **_fedopt_kwargs(p)),
    "fedavgm": lambda p: FedAvgM(
        **p.sampling.kwargs(),
        server_learning_rate=p.aggregation.server_learning_rate,
        server_momentum=p.aggregation.server_momentum,
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
            "dnc",
        )
    },
}


def _dp_fedavg(params: StrategyParams) -> Strategy:
    """DP-FedAvg around ``dp-inner-strategy`` (built to train exactly the nodes DP samples)."""
    from strategies.private.dp_fedavg import build_dp_strategy

    name = params.dp.inner_strategy
    check_dp_inner_strategy(name)
    if name == "fedavg":  # DP-FedAvg's own server step (server-learning-rate, server-momentum)
        return build_dp_strategy(params.aggregation, params.dp)
    inner_params = dataclasses.replace(
        params,
        aggregation=dataclasses.replace(params.aggregation, sampling=params.sampling.every_node()),
    )
    return build_dp_strategy(params.aggregation, params.dp, inner=build_strategy(name, inner_params))


def _dp_ftrl(params: StrategyParams) -> Strategy:
    """DP-FTRL with tree restarts (no sampling assumption)."""
    from strategies.private.dp_ftrl import build_dp_ftrl_strategy

    return build_dp_ftrl_strategy(params.aggregation, params.dp)


PRIVATE_STRATEGIES: dict[str, StrategyFactory] = {"dp-fedavg": _dp_fedavg, "dp-ftrl": _dp_ftrl}


def check_dp_inner_strategy(name: str) -> None:
    """Raise ValueError unless ``name`` may be ``dp-inner-strategy``: one of Flower's strategies or a
    dotted path (not a robust rule nor DP itself: under DP the rule is ``aggregation-rule``)."""
    if name in ROBUST_STRATEGIES or name in PRIVATE_STRATEGIES or (":" not in name and name not in BUILTIN_STRATEGIES):
        raise ValueError(
            f"dp-inner-strategy must be one of {', '.join(BUILTIN_STRATEGIES)} or 'package.module:Name', got "
            f"'{name}': under DP the rule is aggregation-rule, and the inner strategy only steps on the "
            "released aggregate"
        )
    check_strategy_name(name)


_REGISTRY: dict[str, StrategyFactory] = {**BUILTIN_STRATEGIES, **ROBUST_STRATEGIES, **PRIVATE_STRATEGIES}


def register_strategy(name: str, factory: StrategyFactory) -> None:
    """Make ``factory`` selectable as ``strategy='name'`` in the run config; it is called with the
    run's :class:`StrategyParams` and returns a ``Strategy``."""
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


def build_strategy(name: str, params: StrategyParams) -> Strategy:
    """Build the strategy that ``name`` selects, configured from ``params`` (a user's dotted-path
    factory gets ``params.run_config``)."""
    check_strategy_name(name)
    if ":" not in name:
        return _REGISTRY[name](params)
    return _user_strategy(name, params)


def check_user_strategy(name: str, params: StrategyParams) -> None:
    """Run a fresh instance of the user's strategy ``name`` through one synthetic round (as many
    nodes as its sampling waits for and samples, at least 4: a strategy that waits for more nodes
    than the grid lists would wait forever; a two-array model; replies ``w + N(0, 0.01)`` with 10
    examples each) and raise
    :class:`StrategyNameError` unless it addresses train messages to some of the nodes and
    aggregates their replies into arrays of the model's names and shapes with finite values (or
    None): a broken strategy fails when the server starts, not after the clients trained.
    Needs a Flower run context (the ServerApp's) to build messages.
    """
    if ":" not in name:
        return
    sampling = params.sampling
    num_nodes = max(4, sampling.min_available_nodes, sampling.min_train_nodes, sampling.clients_per_round())
    strategy = _user_strategy(name, params)
    model = {"kernel": np.zeros((4, 3), np.float32), "bias": np.zeros(3, np.float32)}
    grid = _SyntheticNodes(list(range(1, num_nodes + 1)))
    rng = np.random.default_rng(0)
    try:
        messages = list(
            strategy.configure_train(1, ArrayRecord({k: Array(v) for k, v in model.items()}), ConfigRecord({}), grid)
        )
        if not messages or any(m.metadata.dst_node_id not in grid.nodes for m in messages):
            raise ValueError(f"configure_train addressed {len(messages)} messages, none or not to the grid's nodes")
        replies = [
            Message(
                RecordDict(
                    {
                        "arrays": ArrayRecord(
                            {
                                k: Array((v + 0.01 * rng.standard_normal(v.shape)).astype(np.float32))
                                for k, v in model.items()
                            }
                        ),
                        "metrics": MetricRecord({"num-examples": 10}),
                    }
                ),
                reply_to=message,
            )
            for message in messages
        ]
        arrays, _ = strategy.aggregate_train(1, replies)
        if arrays is not None:
            values = {key: array.numpy() for key, array in arrays.items()}
            if {k: v.shape for k, v in values.items()} != {k: v.shape for k, v in model.items()}:
                raise ValueError(f"aggregate_train returned arrays {sorted(values)} of other names or shapes")
            if not all(np.isfinite(v).all() for v in values.values()):
                raise ValueError("aggregate_train returned NaN or infinite values")
    except Exception as err:  # a user's code: any failure is reported as the strategy's
        raise StrategyNameError(
            f"strategy '{name}' failed on a synthetic round of {num_nodes} nodes: {type(err).__name__}: {err}"
        ) from err


class _SyntheticNodes(Grid):
    """The grid of :func:`check_user_strategy`: lists its nodes; a synthetic round sends nothing."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def set_run(self, run: Any) -> None:
        raise RuntimeError("a synthetic round has no run")

    @property
    def run(self) -> Any:
        raise RuntimeError("a synthetic round has no run")

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def push_messages(self, messages: Any) -> Any:
        raise RuntimeError("a synthetic round sends nothing: strategies return messages from configure_train")

    def pull_messages(self, message_ids: Any) -> Any:
        raise RuntimeError("a synthetic round receives nothing")

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> Any:
        raise RuntimeError("a synthetic round sends nothing: strategies return messages from configure_train")


def _user_strategy(name: str, params: StrategyParams) -> Strategy:
    """A user's ``package.module:Name``: a Strategy class built with the sampling arguments it
    accepts, or a factory called with the run config."""
    obj = load_object(name)
    if inspect.isclass(obj) and issubclass(obj, Strategy):
        accepted = inspect.signature(obj.__init__).parameters
        kwargs = {k: v for k, v in params.sampling.kwargs().items() if k in accepted}
        strategy = obj(**kwargs)
    else:
        strategy = obj(params.run_config)
    if not isinstance(strategy, Strategy):
        raise StrategyNameError(
            f"strategy '{name}' returned {type(strategy).__name__}, not a flwr.serverapp.strategy.Strategy"
        )
    return strategy
