"""Secure aggregation with Flower's SecAgg+, client-side clipping and central Gaussian noise.

SecAgg+ (Bell et al. 2020) exists only on Flower's legacy stack (``flwr.server.workflow.
SecAggPlusWorkflow`` with ``flwr.client.mod.secaggplus_mod``), so ``secure-aggregation=true``
switches both apps there, as Flower's ``fl-dp-sa`` example does:

* server (:func:`run_secure_rounds`, called by :func:`fl_app.server_app.main`): a legacy strategy
  (:class:`SecureDpFedAvg`) inside our own round loop of ``SecAggPlusWorkflow`` → centralized
  evaluation → federated evaluation. The strategy samples a fixed number ``m`` of clients with a
  ``secrets``-seeded generator, receives only the *sum* of the clients' (clipped) weights, adds
  ``N(0, (z C / m)^2)`` to the mean update when ``strategy='dp-fedavg'`` (``dp-mode=
  'client-clipping'``), and accounts every round with :class:`strategies.private.accounting.DpFedAvgRound`;
* client (:func:`legacy_client_app`, reached from the app's own ``ClientApp`` handlers when a
  message is a legacy or SecAgg+ one): ``ClientApp(client_fn=…, mods=[secaggplus_mod])`` around
  the same :class:`~fl_app.task.keras_client.KerasClient`, whose update is clipped on the device
  (:mod:`fl_app.client.update_privacy`) and which reports ``num_examples = 1`` so that SecAgg+'s weighted
  average is the plain mean (DP-FedAvg's equal weights).

SecAgg+ quantises each value to ``secagg-quantization-range`` levels over
``[-secagg-clipping-range, secagg-clipping-range]``: the sum is exact up to
``K * clipping_range / quantization_range`` per coordinate. A client that drops out after the key
exchange is unmasked from its neighbours' shares (needs ``secagg-reconstruction-threshold`` of
them); fewer connected nodes than a round needs fail fast with an error instead of waiting.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Context
from flwr.common import EvaluateIns, FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.logger import log

from fl_app.config.secagg_checks import check_secure_aggregation
from fl_app.config.settings import Settings
from fl_app.server.run_directory import RoundRecord
from strategies.core.errors import PrivacyBudgetExhausted, StopTraining
from strategies.private.accounting import DpFedAvgRound, PrivacyAccountant
from strategies.private.mechanisms import gaussian_noise, secure_generator

NODE_WAIT_SECONDS = 30.0


class SecureDpFedAvg:
    """Factory of the legacy strategy (a ``flwr.server.strategy.FedAvg`` subclass, built lazily)."""

    def __new__(
        cls,
        settings: Settings,
        initial: ArrayRecord,
        evaluator: Callable | None,
        rng: np.random.Generator | None = None,
    ):
        return _strategy_class()(settings, initial, evaluator, rng)


@functools.cache
def _strategy_class():
    from flwr.server.strategy import FedAvg as LegacyFedAvg

    class _SecureDpFedAvg(LegacyFedAvg):
        """Fixed-size sampling, mean of the securely summed clipped updates, central noise, accountant."""

        def __init__(self, settings: Settings, initial: ArrayRecord, evaluator, rng) -> None:
            super().__init__(
                fraction_fit=1.0,
                fraction_evaluate=settings.fraction_evaluate,
                min_fit_clients=2,
                min_evaluate_clients=max(1, settings.min_evaluate_clients),
                min_available_clients=2,
                accept_failures=True,
            )
            self.settings = settings
            self.private = settings.strategy == "dp-fedavg"
            self.m = settings.sampling_params().clients_per_round()
            self.z = 0.0
            if self.private:
                from strategies.private.dp_fedavg import calibrated_noise_multiplier

                self.z = calibrated_noise_multiplier(settings.sampling_params(), settings.dp_params())
            self.clip = settings.dp_clip_norm
            self.initial = initial
            self.evaluator = evaluator
            self.rng = rng or secure_generator()
            self.accountant = PrivacyAccountant()
            self.global_weights = [a.astype(np.float32) for a in initial.to_numpy_ndarrays()]
            self.records: dict[int, RoundRecord] = {}
            self.last_update_sum: np.ndarray | None = None
            self.stop_reason: str | None = None
            self._started = 0.0

        def initialize_parameters(self, client_manager):
            return ndarrays_to_parameters(self.initial.to_numpy_ndarrays())

        def round_spec(self, connected: int) -> DpFedAvgRound:
            return DpFedAvgRound(self.z, max(connected, self.m), self.m, "fixed-size")

        def configure_fit(self, server_round, parameters, client_manager):
            self._started = time.perf_counter()
            self.global_weights = [a.astype(np.float32) for a in parameters_to_ndarrays(parameters)]
            clients = sorted(client_manager.all().values(), key=lambda c: c.node_id)
            if len(clients) < self.m:
                raise RuntimeError(f"{len(clients)} nodes connected, secure aggregation needs {self.m} per round")
            if self.private and self.settings.dp_target_epsilon > 0:
                spec = self.round_spec(len(clients))
                after = self.accountant.epsilon_if_added(
                    spec, delta=self.settings.dp_delta, method=self.settings.dp_accounting
                )
                if after > self.settings.dp_target_epsilon:
                    self.stop_reason = (
                        f"privacy budget: round {server_round} would take epsilon to {after:.4g} > "
                        f"dp-target-epsilon {self.settings.dp_target_epsilon:g}"
                    )
                    raise PrivacyBudgetExhausted(self.stop_reason)
            chosen = self.rng.choice(len(clients), size=self.m, replace=False)
            config = {"server-round": server_round, "dp-clip-norm": float(self.clip)}
            record = RoundRecord(round=server_round)
            self.records[server_round] = record
            return [(clients[i], FitIns(parameters, dict(config))) for i in sorted(chosen)]

        def aggregate_fit(self, server_round, results, failures):
            record = self.records[server_round]
            record.clients_replied = len(results)
            record.clients_failed = len(failures)
            record.failures.extend(f"secure aggregation: {f!r}" for f in failures)
            k = len(results)
            mean = [np.asarray(a, np.float64) for a in parameters_to_ndarrays(results[0][1].parameters)] if k else None
            update_sum = (
                np.concatenate([(k * (a - g)).ravel() for a, g in zip(mean, self.global_weights)])
                if k
                else np.zeros(sum(g.size for g in self.global_weights))
            )
            self.last_update_sum = update_sum
            extra: dict[str, Any] = {"secure-aggregation-clients": k}
            if self.private:
                update = update_sum / self.m
                std = self.z * self.clip / self.m
                update = update.astype(np.float32) + gaussian_noise(update.shape, std, self.rng)
                self.accountant.add_round(self.round_spec(self.m))
                extra.update(
                    {
                        "epsilon": self.accountant.epsilon(self.settings.dp_delta, self.settings.dp_accounting),
                        "delta": self.settings.dp_delta,
                        "noise-std": std,
                        "clip-norm": self.clip,
                        "noise-multiplier": self.z,
                        "dp-rounds": self.accountant.rounds,
                    }
                )
            else:
                update = (update_sum / max(k, 1)).astype(np.float32)
            record.extra.update(extra)
            if not k:
                return None, {}
            new, offset = [], 0
            for g in self.global_weights:
                new.append(
                    (g + self.settings.server_learning_rate * update[offset : offset + g.size].reshape(g.shape)).astype(
                        np.float32
                    )
                )
                offset += g.size
            return ndarrays_to_parameters(new), {}

        def evaluate(self, server_round, parameters):
            if self.evaluator is None:
                return None
            result = self.evaluator(server_round, ArrayRecord(parameters_to_ndarrays(parameters)))
            record = self.records.setdefault(server_round, RoundRecord(round=server_round))
            record.centralized_loss, record.centralized_accuracy = float(result["loss"]), float(result["accuracy"])
            return float(result["loss"]), {"accuracy": float(result["accuracy"])}

        def configure_evaluate(self, server_round, parameters, client_manager):
            clients = sorted(client_manager.all().values(), key=lambda c: c.node_id)
            n = max(1, int(self.settings.fraction_evaluate * len(clients)))
            chosen = self.rng.choice(len(clients), size=min(n, len(clients)), replace=False)
            return [(clients[i], EvaluateIns(parameters, {"server-round": server_round})) for i in sorted(chosen)]

        def aggregate_evaluate(self, server_round, results, failures):
            record = self.records.setdefault(server_round, RoundRecord(round=server_round))
            record.failures.extend(f"evaluate: {f!r}" for f in failures)
            if not results:
                return None, {}
            total = sum(r.num_examples for _, r in results)
            loss = sum(r.loss * r.num_examples for _, r in results) / total
            accuracy = sum(float(r.metrics.get("accuracy", 0.0)) * r.num_examples for _, r in results) / total
            record.federated_loss, record.federated_accuracy = float(loss), float(accuracy)
            return float(loss), {"accuracy": float(accuracy)}

        def state_dict(self) -> dict[str, Any]:
            return {"privacy-accountant": self.accountant.state_dict()}

        def load_state_dict(self, state) -> None:
            if "privacy-accountant" in state:
                self.accountant = PrivacyAccountant.from_state_dict(state["privacy-accountant"])

    return _SecureDpFedAvg


def wait_for_nodes(grid, needed: int, timeout: float = NODE_WAIT_SECONDS) -> list[int]:
    """The connected node ids once ``needed`` are there; a clear error after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while len(nodes := sorted(grid.get_node_ids())) < needed:
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"secure aggregation needs {needed} connected nodes per round (clients per round = "
                f"max(min-train-clients, fraction-train x num-partitions)), but only {len(nodes)} connected "
                f"within {timeout:.0f} s: start more SuperNodes (simulation: --clients / num-supernodes) "
                f"or lower min-train-clients / fraction-train"
            )
        time.sleep(0.5)
    return nodes


def run_secure_rounds(
    grid,
    context: Context,
    settings: Settings,
    initial: ArrayRecord,
    evaluator: Callable | None,
    on_round_end: Callable[[RoundRecord, ArrayRecord], None] | None = None,
    rng: np.random.Generator | None = None,
) -> tuple[ArrayRecord, list[RoundRecord], Any]:
    """Run ``num-server-rounds`` rounds of SecAgg+ (+ DP); return final arrays, history, strategy."""
    from flwr.common import ConfigRecord
    from flwr.compat.common import recorddict_compat as compat
    from flwr.server import LegacyContext, ServerConfig, SimpleClientManager
    from flwr.server.compat.grid_client_proxy import GridClientProxy
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
    from flwr.server.workflow.default_workflows import (
        default_centralized_evaluation_workflow,
        default_evaluate_workflow,
    )

    check_secure_aggregation(settings)
    strategy = SecureDpFedAvg(settings, initial, evaluator, rng)
    nodes = wait_for_nodes(grid, strategy.m)
    manager = SimpleClientManager()
    run_id = getattr(getattr(grid, "run", None), "run_id", context.run_id)
    for node in nodes:
        manager.register(GridClientProxy(node_id=node, grid=grid, run_id=run_id))
    legacy = LegacyContext(
        context=context,
        config=ServerConfig(num_rounds=settings.num_server_rounds),
        strategy=strategy,
        client_manager=manager,
    )
    workflow = SecAggPlusWorkflow(
        num_shares=settings.secagg_num_shares,
        reconstruction_threshold=settings.secagg_reconstruction_threshold,
        max_weight=1.0,
        clipping_range=settings.secagg_clipping_range,
        quantization_range=settings.secagg_quantization_range,
        timeout=settings.round_timeout,
    )
    legacy.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        strategy.initialize_parameters(manager), keep_input=True
    )
    cfg = ConfigRecord({Key.START_TIME: time.time()})
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = cfg
    history: list[RoundRecord] = []
    if evaluator is not None:
        record = RoundRecord(round=0)
        result = evaluator(0, initial)
        record.centralized_loss, record.centralized_accuracy = float(result["loss"]), float(result["accuracy"])
        history.append(record)
        if on_round_end:
            on_round_end(record, initial)
    arrays = initial
    for server_round in range(1, settings.num_server_rounds + 1):
        cfg[Key.CURRENT_ROUND] = server_round
        started = time.perf_counter()
        try:
            workflow(grid, legacy)
        except StopTraining as err:
            log(WARNING, "Training stops before round %d: %s", server_round, err)
            break
        if (
            server_round not in strategy.records
            or "secure-aggregation-clients" not in strategy.records[server_round].extra
        ):
            raise RuntimeError(
                f"round {server_round}: secure aggregation halted (too few clients answered for "
                f"secagg-reconstruction-threshold = {settings.secagg_reconstruction_threshold}); see the log"
            )
        default_centralized_evaluation_workflow(grid, legacy)
        default_evaluate_workflow(grid, legacy)
        arrays = ArrayRecord(
            parameters_to_ndarrays(
                compat.arrayrecord_to_parameters(legacy.state.array_records[MAIN_PARAMS_RECORD], keep_input=True)
            )
        )
        record = strategy.records[server_round]
        record.seconds = time.perf_counter() - started
        record.finished_at = time.time()
        history.append(record)
        log(
            INFO,
            "[round %d/%d] secure aggregation of %s clients | central acc %s | epsilon %s",
            server_round,
            settings.num_server_rounds,
            record.extra.get("secure-aggregation-clients"),
            record.centralized_accuracy,
            record.extra.get("epsilon"),
        )
        if on_round_end:
            on_round_end(record, arrays)
    return arrays, history, strategy
