"""SecAgg+ with client-side clipping and central noise: exact sums, dropouts, refusals, fail-fast."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord

from fl_app.client import update_privacy as client_privacy
from fl_app.config.settings import Settings, SettingsError
from fl_app.secagg.server import SecureDpFedAvg, run_secure_rounds
from fl_app.simulation.local_grid import LocalGrid
from strategies.core.nodes import NodesUnavailable
from strategies.private.accounting import PrivacyAccountant
from strategies.private.mechanisms import insecure_seeded_generator
from tests.helpers import run_server_app_in_process, run_to_completion


class CopyingGrid(LocalGrid):
    """LocalGrid that gives every node its own copy of a message, as the wire does (secaggplus_mod
    pops keys from the content it receives, which one shared in-process object would leak)."""

    def send_and_receive(self, messages, *, timeout=None):
        return super().send_and_receive([copy.deepcopy(m) for m in messages], timeout=timeout)


SECURE = {
    "strategy": "dp-fedavg",
    "dp-mode": "client-clipping",
    "dp-sampling": "fixed-size",
    "secure-aggregation": True,
    "num-partitions": 5,
    "min-train-clients": 5,
    "min-available-clients": 5,
    "min-evaluate-clients": 2,
    "partitioner": "iid",
    "local-epochs": 1,
    "dp-clip-norm": 0.5,
}


def test_secure_sum_equals_the_plain_sum_of_clipped_updates_and_survives_a_dropout(monkeypatch):
    config = Settings.from_run_config(
        {**SECURE, "num-server-rounds": 2, "dp-noise-multiplier": 0.0, "fault-partition-ids": "2", "fault-round": 2}
    ).to_run_config()
    settings = Settings.from_run_config(config)
    sent: dict[int, list[np.ndarray]] = {}
    original = client_privacy.private_weights

    def recording(settings_, global_weights, weights, cfg, rng=None):
        out = original(settings_, global_weights, weights, cfg, rng)
        update = np.concatenate([(np.asarray(w, np.float64) - g).ravel() for w, g in zip(out, global_weights)])
        sent.setdefault(int(cfg["server-round"]), []).append(update)
        return out

    monkeypatch.setattr(client_privacy, "private_weights", recording)
    from fl_app.task.models import build_model

    model = build_model("mlp", (64,), 10, 42)
    grid = CopyingGrid(config, 5)
    sums = {}
    strategy = SecureDpFedAvg(settings, ArrayRecord(model.get_weights()), None, rng=insecure_seeded_generator(0))
    checkpoints = []

    def on_round_end(record, arrays):
        sums[record.round] = strategy.last_update_sum.copy() if record.round else None
        checkpoints.append(json.loads(json.dumps(strategy.state_dict())))

    _, history = run_secure_rounds(grid, grid.contexts[1], strategy, on_round_end)
    assert [r.round for r in history] == [1, 2]
    assert history[0].extra["secure-aggregation-clients"] == 5
    assert history[1].extra["secure-aggregation-clients"] == 4  # partition 2 dropped out mid-round
    assert history[1].clients_failed >= 1
    assert any("partition 2 fails in round 2" in line for line in history[1].failures)
    step = 2 * settings.secagg_clipping_range / settings.secagg_quantization_range
    for r in (1, 2):
        plain = np.sum(sent[r], axis=0)
        assert all(np.linalg.norm(u) <= 0.5 * (1 + 1e-6) for u in sent[r])
        error = np.max(np.abs(sums[r] - plain))
        assert error <= len(sent[r]) * step, (r, error, step)
    assert history[1].extra["dp-rounds"] == 2
    # the checkpoint state is the DP mechanism's: its accountant holds every round so far
    assert [PrivacyAccountant.from_state_dict(c["privacy-accountant"]).rounds for c in checkpoints] == [1, 2]


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"aggregation-rule": "median"}, "needs individual updates"),
        ({"strategy": "krum"}, "needs individual updates"),
        ({"dp-mode": "central"}, "needs dp-mode='client-clipping'"),
        ({"dp-sampling": "poisson"}, "dp-sampling='fixed-size'"),
        ({"secagg-num-shares": 6}, "secagg-num-shares must be in"),
        ({"secagg-reconstruction-threshold": 3}, "secagg-reconstruction-threshold must be in"),
    ],
)
def test_impossible_secure_aggregation_settings_are_refused(overrides, fragment):
    with pytest.raises(SettingsError, match=fragment.replace("(", r"\(")):
        Settings.from_run_config({**SECURE, **overrides})


def test_plain_fedavg_runs_under_secure_aggregation():
    """The refusal message recommends strategy='fedavg'; it must be accepted (it is the mean)."""
    settings = Settings.from_run_config({**SECURE, "strategy": "fedavg"})
    assert settings.secure_aggregation and settings.strategy == "fedavg"


def test_too_few_nodes_fail_fast_with_a_clear_error():
    settings = Settings.from_run_config(SECURE)
    grid = LocalGrid(settings.to_run_config(), 3)
    strategy = SecureDpFedAvg(settings, ArrayRecord([np.zeros(3, np.float32)]), None)
    with pytest.raises(NodesUnavailable, match="needs 5 connected nodes.*per round.*only 3 connected.*SuperNodes"):
        run_secure_rounds(grid, grid.contexts[1], strategy, node_wait=1.0)


@pytest.mark.integration
def test_secure_aggregation_simulation_with_a_dropout(tmp_path):
    run = run_to_completion(
        tmp_path / "outputs",
        5,
        "strategy='dp-fedavg' dp-mode='client-clipping' dp-sampling='fixed-size' secure-aggregation=true "
        "num-server-rounds=3 local-epochs=1 min-train-clients=5 min-available-clients=5 partitioner='iid' "
        "dp-noise-multiplier=0.5 dp-clip-norm=2.0 fault-partition-ids='1' fault-round=2",
    )
    run_dir, history = run.run_dir, run.history
    assert [r["round"] for r in history] == [0, 1, 2, 3]
    assert [r["extra"]["secure-aggregation-clients"] for r in history[1:]] == [5, 4, 5]
    epsilons = [r["extra"]["epsilon"] for r in history[1:]]
    assert 0 < epsilons[0] < epsilons[1] < epsilons[2]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epsilon (user level)"] == epsilons[-1]


SAMPLED = {
    **SECURE,
    "num-partitions": 10,
    "fraction-train": 0.5,  # m = 5 of the N = 10 connected nodes
    "fraction-evaluate": 0.2,
    "dp-noise-multiplier": 1.0,
    "dp-clip-norm": 0.5,
}


def run_secure(overrides: dict, nodes: int = 10, **kwargs):
    """``run_secure_rounds`` in-process on ``nodes`` LocalGrid nodes; (strategy, history)."""
    from fl_app.task.models import build_model

    config = Settings.from_run_config({**SAMPLED, **overrides}).to_run_config()
    settings = Settings.from_run_config(config)
    grid = CopyingGrid(config, nodes)
    model = build_model("mlp", (64,), 10, 42)
    initial = kwargs.pop("initial", None) or ArrayRecord(model.get_weights())
    strategy = SecureDpFedAvg(settings, initial, None, rng=insecure_seeded_generator(kwargs.pop("seed", 0)))
    if "state" in kwargs:
        strategy.load_state_dict(kwargs.pop("state"))
    arrays, history = run_secure_rounds(grid, grid.contexts[1], strategy, **kwargs)
    return strategy, arrays, history


MLP_PARAMS = 64 * 128 + 128 + 128 * 64 + 64 + 64 * 10 + 10
"""Values of the mlp on digits (64 features, 10 classes): what SecAgg+ quantises."""


def fixed_size_epsilon(population: int, m: int, z: float, rounds: int, clip: float = 0.5) -> float:
    """dp_accounting's RDP for m of N without replacement, replace-one, built here and not through our
    accountant: the quantised sum of updates clipped to C moves by up to 2C + sqrt(P) 2r / L (one
    grid step per value, SecAgg+'s defaults r = 8, L = 2**22), so the event's noise multiplier is
    z C / (2C + sqrt(P) 2r / L) (z / 2 without quantisation)."""
    import dp_accounting
    from dp_accounting import rdp

    sensitivity = 2 * clip + MLP_PARAMS**0.5 * 2 * 8.0 / 2**22
    event = dp_accounting.SampledWithoutReplacementDpEvent(
        population, m, dp_accounting.GaussianDpEvent(z * clip / sensitivity)
    )
    accountant = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    return accountant.compose(event, rounds).get_epsilon(1e-5)


def test_secure_aggregation_accounts_the_fixed_size_sample_of_the_connected_nodes():
    """m = 5 of N = 10 connected nodes without replacement: the history's epsilon is that of the
    sampling actually performed (not m of m)."""
    strategy, _, history = run_secure({"num-server-rounds": 3})
    assert strategy.layout.size == MLP_PARAMS
    assert [r.round for r in history] == [1, 2, 3]
    assert [r.extra["secure-aggregation-clients"] for r in history] == [5, 5, 5]
    for r in history:
        assert r.extra["epsilon"] == pytest.approx(fixed_size_epsilon(10, 5, 1.0, r.round), rel=1e-12), r.extra
    assert strategy.stop_reason is None


def test_secure_aggregation_stops_at_the_privacy_budget_without_crashing():
    target = (fixed_size_epsilon(10, 5, 1.0, 2) + fixed_size_epsilon(10, 5, 1.0, 3)) / 2
    strategy, _, history = run_secure({"num-server-rounds": 5, "dp-target-epsilon": target})
    assert [r.round for r in history] == [1, 2]
    assert history[-1].extra["epsilon"] == pytest.approx(fixed_size_epsilon(10, 5, 1.0, 2), rel=1e-12)
    assert history[-1].extra["epsilon"] <= target
    assert "round 3 would take epsilon" in strategy.stop_reason


def run_server_app(monkeypatch, out, overrides: dict, nodes: int = 10) -> tuple[Path, list[dict]]:
    """The whole ServerApp in-process on a CopyingGrid; (run dir, history)."""
    config = {**SAMPLED, "centralized-evaluation": False, "output-dir": str(out), **overrides}
    run_dir = run_server_app_in_process(monkeypatch, config, nodes, grid_class=CopyingGrid)
    return run_dir, json.loads((run_dir / "history.json").read_text())


def test_resumed_secure_run_continues_epsilon_and_rounds(monkeypatch, tmp_path):
    """2 rounds, then resume-from for 1 more: epsilon equals an uninterrupted 3-round run's (and
    dp_accounting's), and the history holds rounds 1, 2, 3 once each."""
    stopped, first = run_server_app(monkeypatch, tmp_path / "first", {"num-server-rounds": 2})
    assert [r["round"] for r in first] == [1, 2]
    resumed_dir, history = run_server_app(
        monkeypatch, tmp_path / "resumed", {"num-server-rounds": 3, "resume-from": str(stopped)}
    )
    assert [r["round"] for r in history] == [1, 2, 3]
    assert [r["extra"]["dp-rounds"] for r in history] == [1, 2, 3]
    _, _, whole = run_secure({"num-server-rounds": 3}, seed=5)
    assert history[-1]["extra"]["epsilon"] == pytest.approx(whole[-1].extra["epsilon"], rel=1e-12)
    assert history[-1]["extra"]["epsilon"] == pytest.approx(fixed_size_epsilon(10, 5, 1.0, 3), rel=1e-12)
    summary = json.loads((resumed_dir / "summary.json").read_text())
    assert summary["epsilon (user level)"] == history[-1]["extra"]["epsilon"]
