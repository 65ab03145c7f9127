"""DP-FedAvg strategy: sampling, clipping, noise, honest epsilon, budget stop, resume, refusals."""

from __future__ import annotations

import json
import math

import dp_accounting
import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import FedAvg
from hypothesis import given, settings
from hypothesis import strategies as st

from fl_app.server.round_loop import run_rounds
from strategies.aggregation.steps import RuleStep
from strategies.core.clipping import clip_rows
from strategies.core.errors import PrivacyBudgetExhausted
from strategies.private.central_mechanism import CentralGaussianMechanism
from strategies.private.dp_fedavg import DpFedAvgStrategy, build_dp_strategy, calibrated_noise_multiplier
from strategies.private.mechanisms import insecure_seeded_generator
from tests.fakes import FakeGrid, reply, settings_of

SHAPES = [(20, 5), (5,)]


def zeros():
    return [np.zeros(s, np.float32) for s in SHAPES]


def answer_with(update_of):
    """A grid answer: node n replies global + update_of(n)."""

    def answer(message):
        g = message.content["arrays"].to_numpy_ndarrays()
        node = message.metadata.dst_node_id
        return reply(node, [a + u for a, u in zip(g, update_of(node, g))], 10)

    return answer


def gaussian_updates(scale=1.0):
    def update_of(node, g):
        rng = np.random.default_rng(node)
        return [(scale * rng.standard_normal(a.shape)).astype(np.float32) for a in g]

    return update_of


EVERY_NODE = dict(
    fraction_train=1.0, min_train_nodes=0, min_available_nodes=0, fraction_evaluate=1e-9, min_evaluate_nodes=0
)


def strategy(inner=None, **kwargs):
    """DP-FedAvg (mean rule) around Flower's FedAvg (or ``inner``); ``kwargs`` go to the mechanism."""
    defaults = dict(
        num_clients=20,
        sampling="poisson",
        sampling_rate=0.25,
        noise_multiplier=1.1,
        clip_norm=1.0,
        rng=insecure_seeded_generator(0),
    )
    defaults.update(kwargs)
    return DpFedAvgStrategy(inner or FedAvg(**EVERY_NODE), CentralGaussianMechanism(**defaults), min_available_nodes=1)


def run(strat, rounds, nodes=20, update_of=None, initial=None):
    grid = FakeGrid(range(1, nodes + 1), answer_with(update_of or gaussian_updates()))
    return run_rounds(grid, strat, ArrayRecord(initial or zeros()), num_rounds=rounds)


def independent_epsilon(event, rounds, delta, relation, method="rdp"):
    if method == "rdp":
        accountant = dp_accounting.rdp.RdpAccountant(neighboring_relation=relation)
    else:
        accountant = dp_accounting.pld.PLDAccountant(neighboring_relation=relation)
    return accountant.compose(event, rounds).get_epsilon(delta)


def test_poisson_epsilon_in_history_equals_dp_accounting_and_pld_is_not_above_rdp():
    _, history = run(strategy(), 4)
    event = dp_accounting.PoissonSampledDpEvent(0.25, dp_accounting.GaussianDpEvent(1.1))
    relation = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    for record in history:
        r = record.round
        expected = independent_epsilon(event, r, 1e-5, relation)
        assert record.extra["epsilon"] == pytest.approx(expected, rel=1e-9)
        assert record.extra["epsilon-rdp"] == record.extra["epsilon"]
        assert record.extra["epsilon-pld"] <= record.extra["epsilon-rdp"]
        assert record.extra["epsilon-pld"] == pytest.approx(
            independent_epsilon(event, r, 1e-5, relation, "pld"), rel=0.02
        )
        assert record.extra["dp-rounds"] == r and record.extra["delta"] == 1e-5
    assert history[-1].extra["epsilon"] > history[0].extra["epsilon"] > 0


def test_fixed_size_epsilon_equals_dp_accounting_replace_one():
    strat = strategy(sampling="fixed-size", clients_per_round=5)
    _, history = run(strat, 4)
    event = dp_accounting.SampledWithoutReplacementDpEvent(20, 5, dp_accounting.GaussianDpEvent(1.1 / 2))
    relation = dp_accounting.NeighboringRelation.REPLACE_ONE
    for record in history:
        assert record.clients_replied == 5
        expected = independent_epsilon(event, record.round, 1e-5, relation)
        assert record.extra["epsilon"] == pytest.approx(expected, rel=1e-9)
        assert "epsilon-pld" not in record.extra  # no PLD bound for sampling without replacement


def test_pld_with_fixed_size_sampling_is_refused():
    with pytest.raises(ValueError, match="dp-accounting='pld' cannot account dp-sampling='fixed-size'"):
        strategy(sampling="fixed-size", clients_per_round=5, accounting="pld")


def test_poisson_sampling_rate_and_rounds_without_clients_are_accounted():
    strat = strategy(sampling_rate=0.01, num_clients=20)
    _, history = run(strat, 8)
    assert any(r.clients_replied == 0 for r in history)  # 0.99**20 = 0.82 per round
    assert history[-1].extra["dp-rounds"] == 8
    strat = strategy(sampling_rate=0.3, num_clients=1000)
    sizes = [len(strat.mechanism.sample(list(range(1000)))) for _ in range(200)]
    assert np.mean(sizes) == pytest.approx(300, rel=0.02)
    assert len(set(sizes)) > 10  # the sample size varies, as Poisson sampling does


def test_zero_noise_and_huge_clip_equal_fedavg():
    initial = [np.full(s, 0.5, np.float32) for s in SHAPES]
    dp = strategy(sampling="fixed-size", clients_per_round=6, noise_multiplier=0.0, clip_norm=1e9)
    dp_arrays, dp_history = run(dp, 3, nodes=6, initial=initial)
    grid = FakeGrid(range(1, 7), answer_with(gaussian_updates()))
    fedavg = FedAvg(min_available_nodes=1, fraction_evaluate=1e-9, min_evaluate_nodes=0)
    fa_arrays, _ = run_rounds(grid, fedavg, ArrayRecord(initial), num_rounds=3)
    for a, b in zip(dp_arrays.to_numpy_ndarrays(), fa_arrays.to_numpy_ndarrays()):
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-6)
    assert math.isinf(dp_history[-1].extra["epsilon"])  # no noise: no privacy, and it says so


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 8), st.integers(1, 300), st.floats(1e-3, 1e3), st.floats(-6, 6), st.integers(0, 2**31))
def test_every_clipped_contribution_has_norm_at_most_c(k, p, clip, log_scale, seed):
    updates = (np.random.default_rng(seed).standard_normal((k, p)) * 10.0**log_scale).astype(np.float32)
    before = np.linalg.norm(updates.astype(np.float64), axis=1)
    clip_rows(updates, clip)
    after = np.linalg.norm(updates.astype(np.float64), axis=1)
    assert np.all(after <= clip)
    small = before <= clip
    np.testing.assert_array_equal(after[small], before[small])


def test_one_huge_update_moves_the_model_by_at_most_c_over_m():
    def update_of(node, g):
        return [np.full(a.shape, 1e6 if node == 1 else 0.0, np.float32) for a in g]

    strat = strategy(sampling="fixed-size", clients_per_round=4, noise_multiplier=0.0, clip_norm=2.0)
    arrays, history = run(strat, 1, nodes=4, update_of=update_of)
    moved = np.sqrt(sum(float(np.sum(a.astype(np.float64) ** 2)) for a in arrays.to_numpy_ndarrays()))
    assert moved <= 2.0 / 4 * (1 + 1e-6)
    assert "clipped-replies" not in history[0].extra  # an exact count of the clipped: not released


def test_measured_noise_std_is_z_c_over_m():
    big = [(200, 100)]
    strat = strategy(sampling="fixed-size", clients_per_round=8, noise_multiplier=1.3, clip_norm=0.7, num_clients=8)
    grid = FakeGrid(range(1, 9), answer_with(lambda node, g: [np.zeros_like(a) for a in g]))
    deltas = []
    arrays = ArrayRecord([np.zeros(s, np.float32) for s in big])
    for r in range(1, 4):
        list_msgs = list(strat.configure_train(r, arrays, ConfigRecord({}), grid))
        new, metrics = strat.aggregate_train(r, grid.send_and_receive(list_msgs))
        deltas.append(new.to_numpy_ndarrays()[0].ravel())
        assert metrics["noise-std"] == pytest.approx(1.3 * 0.7 / 8)
    measured = float(np.std(np.concatenate(deltas)))
    assert measured == pytest.approx(1.3 * 0.7 / 8, rel=0.05)
    assert abs(measured / (1.3 * 0.7 / 8) - 1) < 0.015  # 60,000 draws: 0.29% standard error, 5 sigma


def test_target_epsilon_stops_at_the_last_round_that_fits():
    event = dp_accounting.PoissonSampledDpEvent(0.25, dp_accounting.GaussianDpEvent(1.1))
    relation = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    eps = [independent_epsilon(event, r, 1e-5, relation) for r in range(1, 10)]
    target = (eps[6] + eps[7]) / 2  # rounds 1..7 fit, round 8 would not
    strat = strategy(target_epsilon=target)
    _, history = run(strat, 20)
    assert [r.round for r in history] == list(range(1, 8))
    assert history[-1].extra["epsilon"] <= target
    assert "round 8 would take epsilon" in strat.stop_reason and "dp-target-epsilon" in strat.stop_reason
    with pytest.raises(PrivacyBudgetExhausted):
        strat.configure_train(8, ArrayRecord(zeros()), ConfigRecord({}), FakeGrid(range(1, 21), None))


def test_resumed_run_continues_epsilon_and_adaptive_clip():
    kwargs = dict(clip_quantile=0.5, count_noise_std=1.0, noise_multiplier=1.0, sampling_rate=0.5)
    whole = strategy(rng=insecure_seeded_generator(1), **kwargs)
    _, history = run(whole, 6)

    first = strategy(rng=insecure_seeded_generator(1), **kwargs)
    arrays, part1 = run(first, 3)
    state = json.loads(json.dumps(first.state_dict(), default=lambda a: a.tolist()))
    resumed = strategy(rng=insecure_seeded_generator(99), **kwargs)
    resumed.load_state_dict(state)
    assert resumed.clip_norm == first.clip_norm != 1.0
    grid = FakeGrid(range(1, 21), answer_with(gaussian_updates()))
    _, part2 = run_rounds(grid, resumed, arrays, num_rounds=6, first_round=4)
    assert [r.round for r in part2] == [4, 5, 6]
    assert part2[-1].extra["dp-rounds"] == 6
    assert part2[-1].extra["epsilon"] == pytest.approx(history[-1].extra["epsilon"], rel=1e-12)
    assert part2[0].extra["epsilon"] > part1[-1].extra["epsilon"]


def test_adaptive_clipping_follows_the_quantile_and_splits_the_noise():
    strat = strategy(
        clip_quantile=0.5,
        count_noise_std=0.5,
        noise_multiplier=0.8,
        sampling_rate=1.0,
        clip_norm=0.01,
        clip_learning_rate=0.5,
    )
    _, history = run(strat, 25, update_of=gaussian_updates(scale=0.1))
    median_norm = 0.1 * math.sqrt(105)
    assert history[-1].extra["clip-norm"] == pytest.approx(median_norm, rel=0.3)
    z_update = (0.8**-2 - (2 * 0.5) ** -2) ** -0.5
    last = history[-1].extra
    assert last["noise-std"] == pytest.approx(z_update * last["clip-norm"] / 20, rel=1e-6)


def base_config(**overrides):
    config = {"strategy": "dp-fedavg", "num-partitions": 10, "fraction-train": 0.5, "num-server-rounds": 10}
    config.update(overrides)
    return config


def dp_strategy(config):
    """``build_dp_strategy`` from the typed parameters of ``config``."""
    settings = settings_of(config)
    return build_dp_strategy(settings.aggregation_params(), settings.dp_params())


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"client-weighting": "num-examples"}, "client-weighting='uniform'"),
        ({"norm-bound-quantile": 0.5}, "norm-bound-quantile"),
        ({"norm-bound": 1.0}, "norm-bound=0"),
        ({"dp-sampling": "fixed-size", "dp-accounting": "pld"}, "dp-accounting='pld'"),
        ({"dp-mode": "client-clipping", "dp-clip-quantile": 0.5}, "dp-mode='central'"),
    ],
)
def test_dishonest_combinations_are_refused(overrides, fragment):
    from fl_app.config.settings import Settings, SettingsError

    with pytest.raises(SettingsError, match=fragment.replace("(", r"\(")):
        Settings.from_run_config(base_config(**overrides))


def test_target_epsilon_without_z_calibrates_z():
    config = base_config(**{"dp-noise-multiplier": 0.0, "dp-target-epsilon": 2.0})
    settings = settings_of(config)
    z = calibrated_noise_multiplier(settings.sampling_params(), settings.dp_params())
    event = dp_accounting.PoissonSampledDpEvent(0.5, dp_accounting.GaussianDpEvent(z))
    relation = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    assert independent_epsilon(event, 10, 1e-5, relation) <= 2.0
    assert (
        independent_epsilon(
            dp_accounting.PoissonSampledDpEvent(0.5, dp_accounting.GaussianDpEvent(z * 0.98)), 10, 1e-5, relation
        )
        > 2.0
    )
    assert dp_strategy(config).noise_multiplier == z


def test_other_rules_use_the_ball_diameter_as_sensitivity():
    strat = dp_strategy(base_config(**{"aggregation-rule": "krum", "dp-noise-multiplier": 1.0}))
    assert strat.mechanism.noise_std() == pytest.approx(2.0 * 1.0)
    mean = dp_strategy(base_config())
    assert mean.mechanism.noise_std() == pytest.approx(1.0 / 5)


# --------------------------------------------------------------------------------- DP around any strategy


class SpyFedAvg(FedAvg):
    """FedAvg that records every reply it aggregates."""

    def __init__(self):
        super().__init__(**EVERY_NODE)
        self.seen = []

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        self.seen.append(replies)
        return super().aggregate_train(server_round, replies)


def test_the_inner_strategy_sees_only_the_released_aggregate():
    spy = SpyFedAvg()
    strat = strategy(inner=spy, sampling="fixed-size", clients_per_round=5)
    arrays, history = run(strat, 3)
    assert [len(replies) for replies in spy.seen] == [1, 1, 1]
    released = spy.seen[-1][0]
    assert released.content["metrics"]["num-examples"] == 1 and released.metadata.src_node_id in range(1, 21)
    for a, b in zip(arrays.to_numpy_ndarrays(), released.content["arrays"].to_numpy_ndarrays()):
        np.testing.assert_array_equal(a, b)  # FedAvg of one reply: the released w + Delta itself
    assert all(r.clients_replied == 5 for r in history)


def test_dp_around_fedadam_is_fedadam_on_the_dp_aggregate():
    from flwr.serverapp.strategy import FedAdam

    initial = [np.full(s, 0.5, np.float32) for s in SHAPES]
    dp = strategy(
        inner=FedAdam(**EVERY_NODE, eta=0.1),
        sampling="fixed-size",
        clients_per_round=6,
        num_clients=6,
        noise_multiplier=0.0,
        clip_norm=1e9,
    )
    dp_arrays, dp_history = run(dp, 3, nodes=6, initial=initial)
    grid = FakeGrid(range(1, 7), answer_with(gaussian_updates()))
    plain = FedAdam(min_available_nodes=1, min_train_nodes=6, fraction_evaluate=1e-9, min_evaluate_nodes=0, eta=0.1)
    plain_arrays, _ = run_rounds(grid, plain, ArrayRecord(initial), num_rounds=3)
    for a, b in zip(dp_arrays.to_numpy_ndarrays(), plain_arrays.to_numpy_ndarrays()):
        assert a.dtype == np.float32
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    assert math.isinf(dp_history[-1].extra["epsilon"])
    assert set(dp.state_dict()["inner"]) == {"m_t", "v_t"}  # Adam's moments are checkpointed


def test_epsilon_does_not_depend_on_the_inner_strategy():
    from flwr.serverapp.strategy import FedYogi

    _, with_fedavg = run(strategy(), 3)
    _, with_yogi = run(strategy(inner=FedYogi(**EVERY_NODE)), 3)
    assert [r.extra["epsilon"] for r in with_fedavg] == [r.extra["epsilon"] for r in with_yogi]


def test_an_inner_strategy_that_samples_on_its_own_is_refused():
    strat = strategy(
        inner=FedAvg(fraction_train=0.5, min_available_nodes=1), sampling="fixed-size", clients_per_round=8
    )
    grid = FakeGrid(range(1, 21), answer_with(gaussian_updates()))
    with pytest.raises(ValueError, match="must train every node of the grid it is handed"):
        list(strat.configure_train(1, ArrayRecord(zeros()), ConfigRecord({}), grid))


def test_the_mechanism_must_match_the_rule_and_the_mode():
    mechanism = CentralGaussianMechanism(noise_multiplier=1.0, clip_norm=1.0, num_clients=10, sampling_rate=0.5)
    with pytest.raises(ValueError, match="build it with mean=False"):
        DpFedAvgStrategy(FedAvg(**EVERY_NODE), mechanism, rule=RuleStep.builtin("median"))
    with pytest.raises(ValueError, match="dp-mode 'local-gaussian' needs a mechanism with a local round"):
        DpFedAvgStrategy(FedAvg(**EVERY_NODE), mechanism, mode="local-gaussian")
    with pytest.raises(ValueError, match="must be a plain strategy"):
        DpFedAvgStrategy(DpFedAvgStrategy(FedAvg(**EVERY_NODE), mechanism), mechanism)


def test_dp_inner_strategy_in_the_run_config():
    from flwr.serverapp.strategy import FedAdam

    from fl_app.config.settings import Settings, SettingsError
    from strategies.registry import build_strategy

    settings = Settings.from_run_config(base_config(**{"dp-inner-strategy": "fedadam"}))
    strat = build_strategy("dp-fedavg", settings.strategy_params())
    assert isinstance(strat, DpFedAvgStrategy) and isinstance(strat.inner.inner, FedAdam)
    assert strat.inner.inner.fraction_train == 1.0 and strat.inner.inner.min_available_nodes == 0
    with pytest.raises(SettingsError, match="dp-inner-strategy must be one of .* got 'median'"):
        Settings.from_run_config(base_config(**{"dp-inner-strategy": "median"}))


def test_fixed_size_with_fewer_connected_nodes_than_m_trains_them_all_and_accounts_it():
    strat = strategy(sampling="fixed-size", clients_per_round=5, num_clients=10, target_epsilon=50.0)
    _, history = run(strat, 3, nodes=3)  # m = 5 of N = 10, but only 3 nodes are connected
    assert [r.clients_replied for r in history] == [3, 3, 3] and all(r.extra["accepted-replies"] == 3 for r in history)
    relation = dp_accounting.NeighboringRelation.REPLACE_ONE  # every round: all 3 train, sensitivity 2C
    expected = independent_epsilon(dp_accounting.GaussianDpEvent(1.1 / 2), 3, 1e-5, relation)
    assert history[-1].extra["epsilon"] == pytest.approx(expected, rel=1e-9)


def test_a_local_dp_round_whose_rule_cannot_run_is_still_accounted():
    from strategies.private.accounting import LocalGaussianRound

    local = LocalGaussianRound(1.0, 2.0)
    mechanism = CentralGaussianMechanism(
        noise_multiplier=2.0, clip_norm=1.0, num_clients=20, sampling_rate=0.1, local_round=local
    )
    strat = DpFedAvgStrategy(
        FedAvg(**EVERY_NODE), mechanism, rule=RuleStep.builtin("krum", {"f": 1}), mode="local-gaussian"
    )
    _, history = run(strat, 2, nodes=2)  # 2 replies: Krum needs n > 2f + 2 = 4, so the rule cannot run
    assert all(r.extra["update-norm"] == 0.0 for r in history)  # the model is kept...
    assert history[-1].extra["dp-rounds"] == 2  # ...but the clients released noised updates: accounted
    expected = independent_epsilon(local.to_dp_event(), 2, 1e-5, dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
    assert history[-1].extra["epsilon"] == pytest.approx(expected, rel=1e-9)


def test_no_client_metric_reaches_the_private_history():
    def answer(message):
        g = message.content["arrays"].to_numpy_ndarrays()
        node = message.metadata.dst_node_id
        return reply(node, [a + 0.01 for a in g], 1, **{"train-loss": 0.5, "partition-id": float(node)})

    grid = FakeGrid(range(1, 21), answer)
    _, history = run_rounds(grid, strategy(), ArrayRecord(zeros()), num_rounds=2)
    for record in history:
        assert "train-loss" not in record.extra and "partition-id" not in record.extra
        assert record.train_loss is None and "epsilon" in record.extra
