"""Strategy registry: built-in names, a user's class or factory by dotted path, clear errors."""

import subprocess
import sys

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedProx, Strategy

from fl_app.config.settings import Settings
from strategies.registry import (
    BUILTIN_STRATEGIES,
    StrategyNameError,
    build_strategy,
    check_strategy_name,
    check_user_strategy,
    register_strategy,
    strategy_names,
)
from tests.fakes import settings_of


class MyFedAvg(FedAvg):
    """A user's own strategy class."""


def my_factory(run_config):
    return FedAvgM(server_momentum=run_config["server-momentum"])


def not_a_strategy(run_config):
    return 42


def params(**run_config):
    """The typed strategy parameters of a run config (kebab-case keys, the rest defaults)."""
    return Settings.parse(run_config).strategy_params()


def test_builtin_names_build_flower_strategies():
    assert {"fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedavgm"} <= set(BUILTIN_STRATEGIES)
    config = {"fraction-train": 0.5, "min-train-clients": 3, "proximal-mu": 0.25, "fedopt-eta": 0.05}
    fedprox = build_strategy("fedprox", params(**config))
    assert isinstance(fedprox, FedProx) and fedprox.proximal_mu == 0.25
    assert fedprox.fraction_train == 0.5 and fedprox.min_train_nodes == 3
    fedadam = build_strategy("fedadam", params(**config))
    assert isinstance(fedadam, FedAdam) and fedadam.eta == 0.05
    for name in BUILTIN_STRATEGIES:
        assert isinstance(build_strategy(name, params()), Strategy)


def test_dotted_path_class_gets_sampling_arguments():
    strategy = build_strategy("tests.strategies.test_registry:MyFedAvg", params(**{"fraction-evaluate": 0.3}))
    assert type(strategy) is MyFedAvg and strategy.fraction_evaluate == 0.3


def test_dotted_path_factory_gets_run_config():
    strategy = build_strategy("tests.strategies.test_registry:my_factory", params(**{"server-momentum": 0.7}))
    assert isinstance(strategy, FedAvgM) and strategy.server_momentum == 0.7


def test_dotted_path_errors():
    with pytest.raises(StrategyNameError, match="returned int, not a flwr.serverapp.strategy.Strategy"):
        build_strategy("tests.strategies.test_registry:not_a_strategy", params())
    with pytest.raises(StrategyNameError, match="not of the form 'package.module:Name'"):
        check_strategy_name("tests.strategies.test_registry:")
    with pytest.raises(StrategyNameError, match="unknown strategy 'fedavgg'; known: "):
        check_strategy_name("fedavgg")


def test_register_strategy():
    register_strategy("my-avg", lambda rc: MyFedAvg())
    assert "my-avg" in strategy_names()
    assert isinstance(build_strategy("my-avg", params()), MyFedAvg)
    with pytest.raises(ValueError, match="may not contain ':'"):
        register_strategy("a:b", lambda rc: MyFedAvg())


def test_strategies_package_never_imports_tensorflow():
    code = (
        "import sys, importlib, pkgutil, strategies\n"
        "for m in pkgutil.iter_modules(strategies.__path__):\n"
        "    importlib.import_module('strategies.' + m.name)\n"
        "assert 'tensorflow' not in sys.modules, 'strategies imported tensorflow'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_typed_params_name_key_value_and_allowed():
    # built without Settings.parse, whose ranges would refuse these first
    with pytest.raises(ValueError, match=r"fedopt-eta must be > 0, got 0.0"):
        Settings(fedopt_eta=0.0).strategy_params()
    with pytest.raises(ValueError, match=r"fraction-train must be in \(0, 1\], got 1.5"):
        Settings(fraction_train=1.5).strategy_params()
    with pytest.raises(
        ValueError, match=r"dp-mode must be one of central, client-clipping, local-gaussian, local-laplace"
    ):
        params(**{"dp-mode": "global"})


class NanFedAvg(FedAvg):
    """A broken user strategy: its aggregate is NaN."""

    def aggregate_train(self, server_round, replies):
        arrays, metrics = super().aggregate_train(server_round, replies)
        return ArrayRecord({k: Array(np.full(v.numpy().shape, np.nan, np.float32)) for k, v in arrays.items()}), metrics


class SilentFedAvg(FedAvg):
    """A broken user strategy: it trains nobody."""

    def configure_train(self, server_round, arrays, config, grid):
        return []


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("NanFedAvg", "aggregate_train returned NaN or infinite values"),
        ("SilentFedAvg", "configure_train addressed 0 messages"),
    ],
)
def test_a_broken_user_strategy_fails_on_the_synthetic_round(name, message):
    import tests.fakes  # noqa: F401  (a run context for messages, as the ServerApp has)

    params = settings_of({"min-available-clients": 4}).strategy_params()
    key = f"tests.strategies.test_registry:{name}"
    with pytest.raises(
        StrategyNameError, match=f"strategy '{key}' failed on a synthetic round of 10 nodes: .*{message}"
    ):
        check_user_strategy(key, params)
    check_user_strategy("strategies.examples:MinExamplesFedAvg", params)  # a working one passes


def test_the_synthetic_round_lists_as_many_nodes_as_the_strategy_waits_for():
    import threading

    import tests.fakes  # noqa: F401  (a run context for messages, as the ServerApp has)

    params = settings_of({"num-partitions": 6, "min-available-clients": 6, "min-train-clients": 6}).strategy_params()
    done = threading.Event()

    def check():
        check_user_strategy("tests.strategies.test_registry:MyFedAvg", params)
        done.set()

    threading.Thread(target=check, daemon=True).start()
    assert done.wait(timeout=60), "the synthetic round waited for nodes it does not list"  # it did on 4 nodes
