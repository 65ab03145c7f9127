"""SecAgg+ with distributed DP (secagg-dp='distributed'): a real SecAgg+ run on in-process nodes,
epsilon recomputed with dp_accounting from the survivors' noise, resume, and refusals."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting import rdp
from flwr.app import ArrayRecord

from fl_app.config.settings import Settings, SettingsError
from fl_app.secagg import client as secure_client
from fl_app.secagg.server import SecureDpFedAvg, run_secure_rounds
from fl_app.server.checkpoint import Checkpoint, CheckpointError, check_same_strategy
from strategies.private import central_mechanism
from strategies.private.mechanisms import insecure_seeded_generator
from strategies.private.secure_sum import client_noise_std, quantised_sensitivity
from tests.fl_app.secagg.test_secure_aggregation import MLP_PARAMS, SECURE, CopyingGrid

DISTRIBUTED = {
    "secagg-dp": "distributed",
    "num-partitions": 5,
    "fraction-train": 1.0,
    "min-train-clients": 5,
    "fraction-evaluate": 0.4,
    "dp-noise-multiplier": 1.0,
    "secagg-dp-min-clients": 5,
}


def independent_epsilon(
    survivors: list[int], population: int = 5, m: int = 5, z: float = 1.0, params: int = MLP_PARAMS
) -> float:
    """dp_accounting's RDP of the rounds as run, built here: each round a Gaussian whose multiplier is
    sqrt(k) s h / (2C + sqrt(P) h) for its k survivors (s = z C / (h sqrt(m_min)), replace-one)."""
    clip, h = 0.5, 16 / 2**22
    s = client_noise_std(z, clip, 8.0, 2**22, 5)
    accountant = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    for k in survivors:
        event = dp_accounting.GaussianDpEvent(math.sqrt(k) * s * h / (2 * clip + math.sqrt(params) * h))
        if m < population:
            event = dp_accounting.SampledWithoutReplacementDpEvent(population, m, event)
        accountant.compose(event)
    return accountant.get_epsilon(1e-5)


def run_distributed(overrides: dict, nodes: int = 5):
    """``run_secure_rounds`` on ``nodes`` in-process nodes (real SecAgg+ and Keras clients), recording
    the unmasked sum of every round; (strategy, history, sums)."""
    from fl_app.task.models import build_model

    config = Settings.from_run_config({**SECURE, **DISTRIBUTED, **overrides}).to_run_config()
    grid = CopyingGrid(config, nodes)
    strategy = SecureDpFedAvg(
        Settings.from_run_config(config),
        ArrayRecord(build_model("mlp", (64,), 10, 42).get_weights()),
        None,
        rng=insecure_seeded_generator(0),
    )
    sums: dict[int, np.ndarray] = {}

    def on_round_end(record, arrays):
        if record.round:
            sums[record.round] = strategy.last_update_sum.copy()

    _, history = run_secure_rounds(grid, grid.contexts[1], strategy, on_round_end)
    return strategy, history, sums


def test_distributed_secure_run_noises_on_the_clients_and_accounts_the_survivors(monkeypatch):
    """5 nodes, 2 rounds, partition 2 drops out in round 2: the server adds no noise, every client
    that trained added its share, the unmasked sum is the clipped updates plus noise of the
    survivors' variance, and epsilon equals dp_accounting's of 5 then 4 noise shares."""

    def no_server_noise(*args, **kwargs):
        raise AssertionError("the server must not add noise in the distributed mode")

    monkeypatch.setattr(central_mechanism, "gaussian_noise", no_server_noise)
    shares: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
    original = secure_client.distributed_noise_share

    def recording(settings, global_weights, weights, config, rng=None):
        out = original(settings, global_weights, weights, config, rng)
        update = np.concatenate([(np.asarray(w, np.float64) - g).ravel() for w, g in zip(weights, global_weights)])
        clipped = update * min(1.0, 0.5 / np.linalg.norm(update))
        shares.setdefault(int(config["server-round"]), []).append((np.concatenate([a.ravel() for a in out]), clipped))
        return out

    monkeypatch.setattr(secure_client, "distributed_noise_share", recording)
    strategy, history, sums = run_distributed({"num-server-rounds": 2, "fault-partition-ids": "2", "fault-round": 2})
    assert [r.extra["secure-aggregation-clients"] for r in history] == [5, 4]
    assert [len(shares[r]) for r in (1, 2)] == [5, 4]
    for r, k in ((1, 5), (2, 4)):
        extra = history[r - 1].extra
        assert extra["noise-std"] == 0.0 and extra["secagg-dp"] == "distributed"
        # what the server unmasks is the sum of the noised shares (exact on SecAgg+'s grid) ...
        assert np.allclose(sums[r], np.sum([share for share, _ in shares[r]], axis=0), rtol=0, atol=1e-9)
        # ... which holds the survivors' noise: variance k s^2 h^2 = (k / m_min) (z C)^2
        noise = sums[r] - np.sum([clipped for _, clipped in shares[r]], axis=0)
        assert noise.std() == pytest.approx(math.sqrt(k / 5) * 1.0 * 0.5, rel=0.05)
    assert [r.extra["epsilon"] for r in history] == [
        pytest.approx(independent_epsilon([5]), rel=1e-12),
        pytest.approx(independent_epsilon([5, 4]), rel=1e-12),
    ]
    assert history[1].extra["epsilon"] > independent_epsilon([5, 5])  # the dropout costs privacy
    assert "epsilon-pld" not in history[1].extra
    assert 0 <= history[1].extra["secagg-clamp-delta"] < 1e-100
    assert strategy.dp_mode == "client-clipping+distributed-noise"


def secure_round(strategy, server_round: int, survivors: int) -> dict:
    """One round of the strategy's own code path (sampling, budget, release, accounting) on
    ``survivors`` replies whose unmasked mean is 0 (SecAgg+ itself is tested above)."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

    class Manager:
        def all(self):
            return {i: type("Proxy", (), {"node_id": i})() for i in range(5)}

    parameters = ndarrays_to_parameters(strategy.layout.unflatten_arrays(strategy.global_flat))
    strategy.configure_fit(server_round, parameters, Manager())
    zeros = ndarrays_to_parameters([np.zeros_like(a) for a in strategy.layout.unflatten_arrays(strategy.global_flat)])
    reply = FitRes(Status(Code.OK, ""), zeros, 1, {})
    strategy.aggregate_fit(server_round, [(None, reply)] * survivors, [])
    return strategy.records[server_round].extra


def test_resumed_distributed_run_continues_epsilon_exactly():
    """Rounds with 5, 3 and 4 survivors; a strategy rebuilt after round 2 from the JSON state (what
    the checkpoint stores) reports round 3's epsilon and clamp delta exactly as the uninterrupted one."""
    import json

    settings = Settings.from_run_config({**SECURE, **DISTRIBUTED, "num-server-rounds": 3})
    initial = ArrayRecord([np.zeros((4, 3), np.float32), np.zeros(3, np.float32)])
    whole = SecureDpFedAvg(settings, initial, None, rng=insecure_seeded_generator(1))
    uninterrupted = [secure_round(whole, r, k) for r, k in ((1, 5), (2, 3), (3, 4))]
    first = SecureDpFedAvg(settings, initial, None, rng=insecure_seeded_generator(2))
    for r, k in ((1, 5), (2, 3)):
        secure_round(first, r, k)
    resumed = SecureDpFedAvg(settings, initial, None, rng=insecure_seeded_generator(3))
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    last = secure_round(resumed, 3, 4)
    for key in ("epsilon", "dp-rounds", "secagg-clamp-delta"):
        assert last[key] == uninterrupted[-1][key], key
    assert last["epsilon"] == pytest.approx(independent_epsilon([5, 3, 4], m=5, params=15), rel=1e-12)


def test_distributed_settings_are_checked():
    base = {**SECURE, **DISTRIBUTED}
    assert Settings.from_run_config(base).secagg_dp == "distributed"
    for overrides, fragment in (
        ({"secagg-clipping-range": 6.0}, "secagg-clipping-range to be a power of two"),
        ({"secagg-quantization-range": 1000000}, "secagg-quantization-range to be a power of two"),
        ({"secagg-dp-min-clients": 6}, "secagg-dp-min-clients must be in"),
        ({"secure-aggregation": False}, "needs secure-aggregation=true"),
        ({"secagg-dp": "both"}, "secagg-dp must be one of central, distributed"),
    ):
        with pytest.raises(SettingsError, match=fragment):
            Settings.from_run_config({**base, **overrides})


def test_resuming_across_secagg_dp_modes_is_refused():
    initial = ArrayRecord([np.zeros(3, np.float32)])
    central = SecureDpFedAvg(Settings.from_run_config(SECURE), initial, None)
    distributed = SecureDpFedAvg(Settings.from_run_config({**SECURE, **DISTRIBUTED}), initial, None)
    assert central.dp_mode == "client-clipping"
    assert distributed.dp_mode == "client-clipping+distributed-noise"
    checkpoint = Checkpoint(1, [], [], {}, {}, privacy={"private": True, "dp-mode": central.dp_mode})
    with pytest.raises(CheckpointError, match="distributed-noise.*one run's epsilon cannot mix them"):
        check_same_strategy(checkpoint, distributed)
    assert quantised_sensitivity(0.5, 3, 8.0, 2**22) == distributed.mechanism.sensitivity_with_quantisation


def test_privacy_scope_says_whether_epsilon_holds_against_the_server():
    from fl_app.config.privacy_scope import privacy_scope

    central = privacy_scope(Settings.from_run_config(SECURE))["user level"]["against the server"]
    distributed = privacy_scope(Settings.from_run_config({**SECURE, **DISTRIBUTED}))["user level"]
    assert central.startswith("NOT covered") and "exact sum" in central
    assert distributed["against the server"].startswith("covered") and "survived" in distributed["against the server"]
