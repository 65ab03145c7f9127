"""Secure aggregation with Flower's SecAgg+, client-side clipping and central Gaussian noise.

SecAgg+ (Bell et al. 2020) exists only on Flower's legacy stack (``flwr.server.workflow.
SecAggPlusWorkflow`` with ``flwr.client.mod.secaggplus_mod``), so ``secure-aggregation=true``
switches both apps there, as Flower's ``fl-dp-sa`` example does:

* server (:func:`run_secure_rounds`, called by :func:`fl_app.server_app.main`): a legacy strategy
  (:class:`SecureDpFedAvg`) inside our own round loop of ``SecAggPlusWorkflow`` → centralized
  evaluation → federated evaluation. The strategy samples a fixed number ``m`` of clients with a
  ``secrets``-seeded generator and receives only the *sum* of the clients' (clipped) weights. With
  ``strategy='dp-fedavg'`` (``dp-mode='client-clipping'``) a
  :class:`~strategies.private.secure_sum.SecureSumMechanism` (the Message-API DP-FedAvg's
  central mechanism, over SecAgg+'s quantised sum) adds ``N(0, (z C / m)^2)`` to the mean update
  (central mode), accounts the round as the sampling performed (``m`` of the ``N`` connected nodes
  without replacement: ``SampledWithoutReplacementDpEvent(N, m, GaussianDpEvent(z_eff))`` under
  replace-one) and stops at the privacy budget; its state is the
  strategy's checkpoint state, restored on resume (:func:`run_secure_rounds` then starts at
  ``first_round``);
* client (:func:`legacy_client_app`, reached from the app's own ``ClientApp`` handlers when a
  message is a legacy or SecAgg+ one): ``ClientApp(client_fn=…, mods=[secaggplus_mod])`` around
  the same :class:`~fl_app.task.keras_client.KerasClient`, whose update is clipped on the device
  (:mod:`fl_app.client.update_privacy`) and which reports ``num_examples = 1`` so that SecAgg+'s weighted
  average is the plain mean (DP-FedAvg's equal weights).

With ``secagg-dp='central'`` the server unmasks the exact sum of the clipped updates and noises
it afterwards: DP against model recipients, none against the server. With
``secagg-dp='distributed'`` each client adds its share of discrete Gaussian noise before masking
(:func:`fl_app.secagg.client.distributed_noise_share`), the server adds none and accounts each round
with the noise of the clients that survived it (:class:`strategies.private.secure_sum.SecureSumMechanism`,
Kairouz, Liu, Steinke 2021).

SecAgg+ quantises each value to ``secagg-quantization-range`` levels over
``[-secagg-clipping-range, secagg-clipping-range]``: the sum is exact up to
``K * clipping_range / quantization_range`` per coordinate, and the accounted sensitivity includes
that step (``2C + sqrt(P) 2r / L``, :func:`strategies.private.secure_sum.quantised_sensitivity`). A client that drops out after the key
exchange is unmasked from its neighbours' shares (needs ``secagg-reconstruction-threshold`` of
them); fewer connected nodes than a round needs fail fast with an error instead of waiting.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from logging import INFO, WARNING
from typing import Any, Protocol

import numpy as np
from flwr.app import ArrayRecord, Context
from flwr.common import EvaluateIns, FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.logger import log

from fl_app.config.secagg_checks import check_secure_aggregation
from fl_app.config.settings import Settings
from fl_app.server.run_directory import RoundRecord
from strategies.core.errors import StopTraining
from strategies.core.nodes import wait_for_nodes
from strategies.core.reporting import Stateful
from strategies.core.update_matrix import ModelLayout
from strategies.private.accounting import RoundSpec
from strategies.private.central_mechanism import fixed_size_sample
from strategies.private.mechanisms import secure_generator
from strategies.private.secure_sum import SecureSumMechanism, quantisation_step

NODE_WAIT_SECONDS = 30.0


class SecureStrategy(Stateful, Protocol):
    """What the server reads from the SecAgg+ strategy besides Flower's legacy interface."""

    @property
    def stop_reason(self) -> str | None: ...


def SecureDpFedAvg(
    settings: Settings,
    initial: ArrayRecord,
    evaluator: Callable | None,
    rng: np.random.Generator | None = None,
) -> SecureStrategy:
    """The legacy strategy (a ``flwr.server.strategy.FedAvg`` subclass, whose class is built on
    first use, so that a run without SecAgg+ never imports Flower's legacy stack)."""
    strategy: SecureStrategy = _strategy_class()(settings, initial, evaluator, rng)
    return strategy


@functools.cache
def _strategy_class():
    from flwr.server.strategy import FedAvg as LegacyFedAvg

    class _SecureDpFedAvg(LegacyFedAvg):
        """Fixed-size sampling, mean of the securely summed clipped updates, central noise, accountant.

        With ``strategy='dp-fedavg'`` the sampling, noise, accountant and budget stop are those of
        a :class:`~strategies.private.central_mechanism.CentralGaussianMechanism` (the Message-API
        DP-FedAvg's mechanism) over the fixed-denominator mean of the ``m`` sampled clients.
        """

        def __init__(self, settings: Settings, initial: ArrayRecord, evaluator, rng) -> None:
            super().__init__(
                fraction_fit=1.0,
                fraction_evaluate=settings.fraction_evaluate,
                min_fit_clients=2,
                min_evaluate_clients=max(1, settings.min_evaluate_clients),
                min_available_clients=2,
                accept_failures=True,
            )
            check_secure_aggregation(settings)
            self.settings = settings
            self.m = settings.sampling_params().clients_per_round()
            self.initial = initial
            self.evaluator = evaluator
            self.rng = rng or secure_generator()
            self.layout = ModelLayout.of_arrays(initial.to_numpy_ndarrays())
            self.mechanism: SecureSumMechanism | None = None
            if settings.strategy == "dp-fedavg":
                self.mechanism = secure_sum_mechanism(settings, self.layout.size, self.m, self.rng)
            self.global_flat = self.layout.flatten_arrays(initial.to_numpy_ndarrays())
            self.records: dict[int, RoundRecord] = {}
            self.last_update_sum: np.ndarray | None = None
            self._round_spec: RoundSpec | None = None
            self._connected = 0

        @property
        def dp_mode(self) -> str | None:
            """With DP-FedAvg, ``dp-mode`` (``client-clipping``: the server noises the unmasked sum), or
            ``client-clipping+distributed-noise`` with ``secagg-dp='distributed'``; else None."""
            if self.mechanism is None:
                return None
            if self.mechanism.placement == "distributed":
                return f"{self.settings.dp_mode}+distributed-noise"
            return self.settings.dp_mode

        @property
        def stop_reason(self) -> str | None:
            """Why training stopped before the last round (the privacy budget), or None."""
            return self.mechanism.stop_reason if self.mechanism is not None else None

        def initialize_parameters(self, client_manager):
            return ndarrays_to_parameters(self.initial.to_numpy_ndarrays())

        def configure_fit(self, server_round, parameters, client_manager):
            self.global_flat = self.layout.flatten_arrays(parameters_to_ndarrays(parameters))
            clients = sorted(client_manager.all().values(), key=lambda c: c.node_id)
            if len(clients) < self.m:
                raise RuntimeError(f"{len(clients)} nodes connected, secure aggregation needs {self.m} per round")
            if self.mechanism is not None:
                # m of the N connected nodes without replacement, accounted as exactly that (the
                # Message-API DP-FedAvg's fixed-size path): SampledWithoutReplacement(N, m, ...)
                # under replace-one, the one relation every round of the run uses
                self._round_spec = self.mechanism.check_budget(server_round, len(clients))
                self._connected = len(clients)
            chosen = fixed_size_sample(clients, self.m, self.rng)
            config = {"server-round": server_round, "dp-clip-norm": float(self.settings.dp_clip_norm)}
            self.records[server_round] = RoundRecord(round=server_round)
            return [(client, FitIns(parameters, dict(config))) for client in chosen]

        def aggregate_fit(self, server_round, results, failures):
            record = self.records[server_round]
            record.clients_replied = len(results)
            record.clients_failed = len(failures)
            record.failures.extend(f"secure aggregation: {f!r}" for f in failures)
            k = len(results)
            distributed = self.mechanism is not None and self.mechanism.placement == "distributed"
            if k:
                mean = self.layout.flatten_arrays(parameters_to_ndarrays(results[0][1].parameters), dtype=np.float64)
                # distributed: the clients sent their noised updates (fl_app.secagg.client), not weights
                update_sum = k * (mean if distributed else mean - self.global_flat.astype(np.float64))
            else:
                update_sum = np.zeros(self.layout.size)
            self.last_update_sum = update_sum
            extra: dict[str, Any] = {"secure-aggregation-clients": k}
            if self.mechanism is not None:
                if self._round_spec is None:
                    raise RuntimeError("aggregate_fit called before configure_fit")
                update = self._release(server_round, update_sum, k, extra)
            else:
                update = (update_sum / max(k, 1)).astype(np.float32)
            record.extra.update(extra)
            if not k:
                return None, {}
            new_flat = self.global_flat + self.settings.server_learning_rate * update
            return ndarrays_to_parameters(self.layout.unflatten_arrays(new_flat)), {}

        def _release(self, server_round: int, update_sum: np.ndarray, k: int, extra: dict[str, Any]) -> np.ndarray:
            """The round's released mean update and its accounting: central, the server's noise on the
            unmasked sum; distributed, no server noise, accounted with the noise of the ``k`` survivors."""
            mechanism, spec = self.mechanism, self._round_spec
            if mechanism is None or spec is None:
                raise RuntimeError("_release needs DP-FedAvg and a round configured by configure_fit")
            self._round_spec = None
            if mechanism.placement == "distributed":
                if not k:  # nothing was unmasked: nothing released, nothing to account
                    return np.zeros(self.layout.size, np.float32)
                spec = mechanism.round_spec(self._connected, survivors=k)
                mechanism.account_survivors(k)
                extra.update(
                    {
                        "secagg-dp": "distributed",
                        "client-noise-std": mechanism.local_std()
                        * quantisation_step(mechanism.clipping_range, mechanism.quantization_range),
                        "secagg-min-clients": mechanism.min_survivors,
                    }
                )
            extra.update(
                {
                    "noise-std": mechanism.noise_std(),
                    "clip-norm": mechanism.clip_norm,
                    "noise-multiplier": mechanism.noise_multiplier,
                    "effective-noise-multiplier": mechanism.effective_noise_multiplier(k),
                }
            )
            update = mechanism.release(mechanism.mean(update_sum[None, :]), spec)
            extra.update(mechanism.metrics())
            target = mechanism.target_epsilon
            if target is not None and extra["epsilon"] > target:
                log(
                    WARNING,
                    "round %d: only %d of the %d planned noise shares arrived (secagg-dp-min-clients), so "
                    "epsilon %.4g exceeds dp-target-epsilon %g; training stops",
                    server_round,
                    k,
                    mechanism.min_survivors,
                    extra["epsilon"],
                    target,
                )
            return update

        def evaluate(self, server_round, parameters):
            if self.evaluator is None:
                return None
            result = self.evaluator(server_round, ArrayRecord(parameters_to_ndarrays(parameters)))
            record = self.records.setdefault(server_round, RoundRecord(round=server_round))
            record.set_metrics("centralized", result)
            return float(result["loss"]), {k: float(v) for k, v in result.items() if k != "loss"}

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
            names = sorted(set.intersection(*(set(r.metrics) for _, r in results)) - {"num-examples"})
            means = {n: sum(float(r.metrics[n]) * r.num_examples for _, r in results) / total for n in names}
            record.set_metrics("federated", {"loss": float(loss), **means})
            return float(loss), means

        def state_dict(self) -> dict[str, Any]:
            """The DP mechanism's state (accountant; empty without DP), for the run's checkpoint."""
            return self.mechanism.state_dict() if self.mechanism is not None else {}

        def load_state_dict(self, state) -> None:
            if self.mechanism is not None:
                self.mechanism.load_state_dict(state)

    return _SecureDpFedAvg


def secure_sum_mechanism(
    settings: Settings, num_params: int, clients_per_round: int, rng: np.random.Generator
) -> SecureSumMechanism:
    """The DP mechanism over SecAgg+'s quantised sum of ``num_params`` values (``secagg-dp``).

    Calibrating ``z`` to ``dp-target-epsilon`` (central noise only) solves for the effective
    multiplier ``zC / Delta`` of :func:`strategies.private.secure_sum.quantised_sensitivity`.
    """
    from strategies.private.dp_fedavg import calibrated_noise_multiplier
    from strategies.private.secure_sum import quantised_sensitivity

    z = calibrated_noise_multiplier(settings.sampling_params(), settings.dp_params())
    if settings.dp_noise_multiplier <= 0 < z:  # calibrated for sensitivity 2C: scale to Delta
        z *= quantised_sensitivity(
            settings.dp_clip_norm, num_params, settings.secagg_clipping_range, settings.secagg_quantization_range
        ) / (2.0 * settings.dp_clip_norm)
    return SecureSumMechanism(
        num_params=num_params,
        clipping_range=settings.secagg_clipping_range,
        quantization_range=settings.secagg_quantization_range,
        placement=settings.secagg_dp,
        min_survivors=settings.secagg_dp_min_clients or None,
        noise_multiplier=z,
        clip_norm=settings.dp_clip_norm,
        num_clients=settings.num_partitions,
        clients_per_round=clients_per_round,
        delta=settings.dp_delta,
        accounting=settings.dp_accounting,
        target_epsilon=settings.dp_target_epsilon,
        rng=rng,
    )


def run_secure_rounds(
    grid,
    context: Context,
    strategy,
    on_round_end: Callable[[RoundRecord, ArrayRecord], None] | None = None,
    *,
    node_wait: float = NODE_WAIT_SECONDS,
    first_round: int = 1,
) -> tuple[ArrayRecord, list[RoundRecord]]:
    """Run rounds ``first_round .. num-server-rounds`` of SecAgg+ (+ DP) with ``strategy`` (a
    :class:`SecureDpFedAvg`, whose settings, initial model and evaluator they are); return the final
    arrays and the history of the rounds run here.

    Resuming (``first_round > 1``): build ``strategy`` on the checkpoint's weights and restore its
    :meth:`state_dict` (the DP accountant) first; round 0's evaluation is not repeated, so the
    history returned holds only the new rounds.

    Raises :class:`strategies.core.nodes.NodesUnavailable` when fewer than the clients per round are
    connected within ``node_wait`` seconds.
    """
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

    settings, initial, evaluator = strategy.settings, strategy.initial, strategy.evaluator
    nodes = wait_for_nodes(
        grid,
        strategy.m,
        node_wait,
        poll=0.5,
        keys="secure aggregation's clients per round = max(min-train-clients, fraction-train x num-partitions)",
        advice="start more SuperNodes (simulation: --clients / num-supernodes) or lower min-train-clients / fraction-train",
    )
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
    if int(first_round) != first_round or first_round < 1:
        raise ValueError(f"first_round must be an integer >= 1, got {first_round}")
    if evaluator is not None and first_round == 1:
        record = RoundRecord(round=0)
        record.set_metrics("centralized", evaluator(0, initial))
        history.append(record)
        if on_round_end:
            on_round_end(record, initial)
    arrays = initial
    for server_round in range(int(first_round), settings.num_server_rounds + 1):
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
            "[round %d/%d] secure aggregation of %s clients | central %s | epsilon %s",
            server_round,
            settings.num_server_rounds,
            record.extra.get("secure-aggregation-clients"),
            {n: record.value("centralized", n) for n in record.metric_names()},
            record.extra.get("epsilon"),
        )
        if on_round_end:
            on_round_end(record, arrays)
    return arrays, history
