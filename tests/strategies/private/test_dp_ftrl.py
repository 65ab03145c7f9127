"""DP-FTRL: one contribution per node per epoch, the FTRL iterate, epsilon from dp_accounting, budget, resume."""

from __future__ import annotations

import dp_accounting
import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import FedAvg

from fl_app.config.privacy_scope import privacy_scope
from fl_app.config.settings import Settings, SettingsError
from fl_app.delivery.model_card import privacy_lines
from fl_app.server.checkpoint import CheckpointError, load_checkpoint, resume_strategy, save_checkpoint
from fl_app.server.round_loop import run_rounds
from fl_app.server.strategy_setup import make_strategy
from strategies.aggregation.guard import GuardedStrategy
from strategies.private.dp_ftrl import DpFtrlStrategy
from strategies.private.mechanisms import insecure_seeded_generator
from strategies.private.participation import EpochParticipation
from tests.fakes import FakeGrid, reply
from tests.strategies.private.test_private_strategy import EVERY_NODE, answer_with, gaussian_updates, strategy, zeros

DELTA = 1e-5


def ftrl(**kwargs) -> DpFtrlStrategy:
    defaults = dict(
        noise_multiplier=1.0,
        clip_norm=1.0,
        clients_per_round=3,
        evaluation=FedAvg(**EVERY_NODE),
        rng=insecure_seeded_generator(0),
    )
    return DpFtrlStrategy(**{**defaults, **kwargs})


class RecordingGrid(FakeGrid):
    """A FakeGrid that remembers which nodes every round asked."""

    def __init__(self, nodes, answer):
        super().__init__(nodes, answer)
        self.asked: list[list[int]] = []

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self.asked.append(sorted(m.metadata.dst_node_id for m in messages))
        return super().send_and_receive(messages, timeout=timeout)


def run(strat, rounds, nodes=10, first_round=1, arrays=None):
    grid = RecordingGrid(range(1, nodes + 1), answer_with(gaussian_updates()))
    final, history = run_rounds(grid, strat, arrays or ArrayRecord(zeros()), num_rounds=rounds, first_round=first_round)
    return final, history, grid.asked


def independent_epsilon(epoch_steps: list[int], z: float, delta: float = DELTA) -> float:
    """Epsilon of DP-FTRL epochs of these lengths, straight from dp_accounting: one
    SingleEpochTreeAggregationDpEvent per epoch (tree restart), composed, RDP under REPLACE_SPECIAL."""
    accountant = dp_accounting.rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_SPECIAL)
    event = dp_accounting.ComposedDpEvent(
        [dp_accounting.SingleEpochTreeAggregationDpEvent(z, steps) for steps in epoch_steps]
    )
    return accountant.compose(event).get_epsilon(delta)


def epochs_of(asked_per_round: list[list[int]], epoch_per_round: list[int]) -> dict[int, list[list[int]]]:
    epochs: dict[int, list[list[int]]] = {}
    for asked, epoch in zip(asked_per_round, epoch_per_round):
        epochs.setdefault(epoch, []).append(asked)
    return epochs


@pytest.mark.parametrize(("epoch_rounds", "lengths"), [(0, [4, 4, 3]), (2, [2, 2, 2, 2, 2, 1])])
def test_no_node_is_asked_twice_in_an_epoch_and_the_tree_restarts_when_none_is_left(epoch_rounds, lengths):
    _, history, asked = run(ftrl(epoch_rounds=epoch_rounds), 11)
    epochs = epochs_of(asked, [int(r.extra["dp-ftrl-epoch"]) for r in history])
    assert [len(rounds) for rounds in epochs.values()] == lengths
    for rounds in epochs.values():
        flat = [node for nodes in rounds for node in nodes]
        assert len(flat) == len(set(flat)), f"a node was asked twice in one epoch: {rounds}"
        assert all(len(nodes) <= 3 for nodes in rounds)
    if epoch_rounds == 0:  # an epoch ends when every node has been asked once
        assert all(
            sorted(n for nodes in rounds for n in nodes) == list(range(1, 11)) for rounds in list(epochs.values())[:-1]
        )
    assert [int(r.extra["dp-ftrl-epoch-round"]) for r in history][: lengths[0]] == list(range(1, lengths[0] + 1))


def test_a_node_that_joins_mid_epoch_is_asked_and_one_that_left_is_not_counted():
    participation = EpochParticipation(2)
    rng = insecure_seeded_generator(0)
    first, restart = participation.select([1, 2, 3], rng)
    assert restart and len(first) == 2
    second, restart = participation.select([1, 2, 3, 4], rng)
    assert not restart and sorted(first + second) == [1, 2, 3, 4]
    third, restart = participation.select([1, 2, 3, 4], rng)  # everyone asked: a new epoch
    assert restart and participation.epoch == 2 and len(third) == 2


def test_a_reply_from_a_node_already_asked_in_the_epoch_is_left_out():
    """The same seeded mechanism with and without a forged second reply of a round-1 node: the
    models are equal, and the forged reply is named in the round's rejections."""

    def two_rounds(forge: bool):
        strat = ftrl(rng=insecure_seeded_generator(7))
        grid = FakeGrid(range(1, 11), None)
        arrays = ArrayRecord(zeros())
        first = [m.metadata.dst_node_id for m in strat.configure_train(1, arrays, ConfigRecord({}), grid)]
        ones = [np.full(s.shape, 0.1, np.float32) for s in zeros()]
        arrays, _ = strat.aggregate_train(1, [reply(n, ones) for n in first])
        second = [m.metadata.dst_node_id for m in strat.configure_train(2, arrays, ConfigRecord({}), grid)]
        assert not set(first) & set(second)
        g = arrays.to_numpy_ndarrays()
        replies = [reply(n, [a + 0.1 for a in g]) for n in second]
        if forge:
            replies.append(reply(first[0], [a + 100.0 for a in g]))
        arrays, metrics = strat.aggregate_train(2, replies)
        return arrays, metrics, strat.rejections(), first[0]

    honest, _, none_refused, _ = two_rounds(False)
    forged, metrics, refused, node = two_rounds(True)
    assert not none_refused
    assert refused == [
        f"node {node}: already asked in round 1 of DP-FTRL epoch 1: a user contributes at most once per "
        "epoch, the reply is left out"
    ]
    assert metrics["refused-replies"] == 1
    for a, b in zip(honest.to_numpy_ndarrays(), forged.to_numpy_ndarrays()):
        np.testing.assert_array_equal(a, b)


def test_without_noise_the_iterate_is_fedavg_with_a_fixed_denominator():
    strat = ftrl(noise_multiplier=1e-12, clip_norm=1e6, server_learning_rate=0.5)
    final, _, asked = run(strat, 5)
    expected = [np.zeros(s, np.float64) for s in [(20, 5), (5,)]]
    for nodes in asked:  # every node's update is the same fixed vector, whatever the model
        for node in nodes:
            update = gaussian_updates()(node, zeros())
            expected = [e + 0.5 * u / 3 for e, u in zip(expected, update)]
    for got, want in zip(final.to_numpy_ndarrays(), expected):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_epsilon_in_the_history_equals_dp_accounting_of_the_epochs_that_ran():
    z = 1.3
    _, history, _ = run(ftrl(noise_multiplier=z), 11)
    lengths = [4, 4, 3]  # 10 nodes, 3 per round: 3 + 3 + 3 + 1 per epoch
    steps = [s for length in lengths for s in range(1, length + 1)]
    for record, step in zip(history, steps):
        ended = lengths[: int(record.extra["dp-ftrl-epoch"]) - 1]
        expected = independent_epsilon([*ended, step], z)
        assert record.extra["epsilon"] == pytest.approx(expected, rel=1e-12)
        assert record.extra["dp-rounds"] == record.round
    assert history[-1].extra["epsilon"] == pytest.approx(independent_epsilon([4, 4, 3], z), rel=1e-12)


def test_the_budget_stops_before_the_round_that_would_exceed_it():
    """Six rounds (epochs of 4 and 2) fit exactly; the seventh is free (3 leaves, like 2, make a tree
    of depth 2); the eighth would make epoch 2's tree depth 3."""
    target = independent_epsilon([4, 2], 1.0) * (1 + 1e-9)
    strat = ftrl(target_epsilon=target)
    _, history, _ = run(strat, 20)
    assert [r.round for r in history] == [1, 2, 3, 4, 5, 6, 7]
    assert history[5].extra["epsilon"] == history[6].extra["epsilon"] <= target
    assert "round 8 would take epsilon" in strat.stop_reason and "dp-target-epsilon" in strat.stop_reason


def test_a_resumed_run_continues_epsilon_the_tree_and_the_epoch(tmp_path):
    """Four rounds, a checkpoint, a fresh strategy resumes with the first one's generator: rounds
    5-9 (mid-epoch 2) are bit for bit those of an uninterrupted run, and so is epsilon."""
    whole, whole_history, whole_asked = run(ftrl(rng=insecure_seeded_generator(1)), 9)

    first = ftrl(rng=insecure_seeded_generator(1))
    arrays, part1, asked1 = run(first, 5)
    save_checkpoint(tmp_path, 5, arrays.to_numpy_ndarrays(), part1, GuardedStrategy(first), {})
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint.privacy == {"private": True, "dp-mode": "dp-ftrl"}
    resumed = ftrl(rng=first.rng)
    resume_strategy(checkpoint, GuardedStrategy(resumed))
    final, part2, asked2 = run(resumed, 9, first_round=6, arrays=ArrayRecord(checkpoint.weights))
    assert asked1 + asked2 == whole_asked
    assert [r.extra["epsilon"] for r in part1 + part2] == [r.extra["epsilon"] for r in whole_history]
    for a, b in zip(final.to_numpy_ndarrays(), whole.to_numpy_ndarrays()):
        np.testing.assert_array_equal(a, b)


def test_resuming_another_private_strategy_or_a_plain_one_is_refused(tmp_path):
    dp_fedavg = strategy()
    save_checkpoint(tmp_path / "fedavg", 0, zeros(), [], GuardedStrategy(dp_fedavg), {})
    with pytest.raises(CheckpointError, match="was written by strategy .*DpFedAvgStrategy.*DpFtrlStrategy"):
        resume_strategy(load_checkpoint(tmp_path / "fedavg"), GuardedStrategy(ftrl()))


BASE = {"strategy": "dp-ftrl", "num-partitions": 10, "fraction-train": 0.3, "min-train-clients": 2}


def test_the_run_config_builds_dp_ftrl_with_a_budget():
    settings = Settings.from_run_config({**BASE, "dp-target-epsilon": 8.0, "dp-ftrl-epoch-rounds": 3})
    strat = make_strategy(settings).inner
    assert isinstance(strat, DpFtrlStrategy)
    assert (strat.clients_per_round, strat.participation.epoch_rounds, strat.target_epsilon) == (3, 3, 8.0)
    scope = privacy_scope(settings)["user level"]
    assert "REPLACE_SPECIAL" in scope["neighbouring relation"] and "node id" in scope["outside the guarantee"]
    card = "\n".join(privacy_lines(settings, []))
    assert "user level (dp-ftrl, tree aggregation)" in card and "zero-out" in card


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"dp-noise-multiplier": 0.0, "dp-target-epsilon": 5.0}, "dp-noise-multiplier must be > 0, got 0"),
        ({"dp-accounting": "pld"}, "dp-accounting must be 'rdp'"),
        ({"dp-mode": "local-gaussian"}, "dp-mode must be 'central'"),
        ({"dp-clip-quantile": 0.5}, "dp-clip-quantile must be 0"),
        ({"aggregation-rule": "median"}, "aggregation-rule must be 'mean'"),
        ({"client-weighting": "num-examples"}, "client-weighting must be 'uniform'"),
        ({"server-momentum": 0.9}, "server-momentum must be 0"),
        ({"dp-inner-strategy": "fedadam"}, "dp-inner-strategy is dp-fedavg's"),
        ({"dp-ftrl-epoch-rounds": -1}, r"dp-ftrl-epoch-rounds must be in \[0, 100000\], got -1"),
    ],
)
def test_settings_dp_ftrl_cannot_honour_are_refused_naming_the_key(overrides, fragment):
    with pytest.raises(SettingsError, match=fragment):
        Settings.from_run_config({**BASE, **overrides})
