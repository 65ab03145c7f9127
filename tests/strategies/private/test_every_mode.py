"""Every server-side DP mode, built from the run config as the app builds it: the history's epsilon
equals an independent ``dp_accounting`` computation from the events of the mechanism as it ran,
round by round, and a run resumed from the strategy's checkpoint state continues it exactly (equal
to the uninterrupted run's). DP-FTRL, SecAgg+ (central and distributed noise) and DP-SGD have the
same two checks in their own test files (test_dp_ftrl.py, tests/fl_app/secagg/, test_privacy_dpsgd.py);
adaptive clipping in test_accounting.py and test_private_strategy.py."""

from __future__ import annotations

import json

import dp_accounting
import pytest
from flwr.app import ArrayRecord

from fl_app.server.round_loop import run_rounds
from strategies.private.dp_fedavg import build_dp_strategy
from strategies.private.mechanisms import insecure_seeded_generator
from tests.fakes import FakeGrid, settings_of
from tests.strategies.private.test_private_strategy import answer_with, gaussian_updates, zeros

ROUNDS, SPLIT, N = 6, 3, 10
ADD_REMOVE = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
REPLACE = dp_accounting.NeighboringRelation.REPLACE_ONE

# run config -> (the event of one round, written from the config's numbers, and its relation)
MODES = {
    "central, Poisson": (
        {"dp-noise-multiplier": 1.1},
        dp_accounting.PoissonSampledDpEvent(0.5, dp_accounting.GaussianDpEvent(1.1)),
        ADD_REMOVE,
    ),
    "central, fixed size": (
        {"dp-noise-multiplier": 1.1, "dp-sampling": "fixed-size"},
        dp_accounting.SampledWithoutReplacementDpEvent(N, 5, dp_accounting.GaussianDpEvent(1.1 / 2)),
        REPLACE,
    ),
    "client clipping": (
        {"dp-noise-multiplier": 0.9, "dp-mode": "client-clipping"},
        dp_accounting.PoissonSampledDpEvent(0.5, dp_accounting.GaussianDpEvent(0.9)),
        ADD_REMOVE,
    ),
    "local Gaussian": (  # clip C, noise z C per client: replace-one sensitivity 2C, no amplification
        {"dp-noise-multiplier": 3.0, "dp-mode": "local-gaussian"},
        dp_accounting.GaussianDpEvent(3.0 / 2),
        REPLACE,
    ),
    "local Laplace": (  # clip_L1 C, Laplace(2C / eps): eps per round, no amplification
        {"dp-mode": "local-laplace", "dp-local-epsilon": 0.5},
        dp_accounting.LaplaceDpEvent(1 / 0.5),
        REPLACE,
    ),
}


def _strategy(overrides: dict, seed: int):
    config = {"strategy": "dp-fedavg", "num-partitions": N, "fraction-train": 0.5, "num-server-rounds": ROUNDS}
    settings = settings_of({**config, **overrides})
    return build_dp_strategy(settings.aggregation_params(), settings.dp_params(), rng=insecure_seeded_generator(seed))


def _grid() -> FakeGrid:
    return FakeGrid(range(1, N + 1), answer_with(gaussian_updates()))


def _independent(event, relation, rounds: int) -> float:
    accountant = dp_accounting.rdp.RdpAccountant(neighboring_relation=relation)
    return accountant.compose(event, rounds).get_epsilon(1e-5)


@pytest.mark.parametrize("mode", list(MODES))
def test_epsilon_is_the_mechanism_as_run_and_a_resumed_run_continues_it(mode):
    overrides, event, relation = MODES[mode]
    whole = _strategy(overrides, seed=1)
    _, history = run_rounds(_grid(), whole, ArrayRecord(zeros()), num_rounds=ROUNDS)
    assert [r.round for r in history] == list(range(1, ROUNDS + 1))
    for record in history:
        expected = _independent(event, relation, record.round)
        assert record.extra["epsilon"] == pytest.approx(expected, rel=1e-9), (mode, record.round)
        assert record.extra["dp-rounds"] == record.round

    first = _strategy(overrides, seed=1)
    arrays, part1 = run_rounds(_grid(), first, ArrayRecord(zeros()), num_rounds=SPLIT)
    state = json.loads(json.dumps(first.state_dict(), default=lambda a: a.tolist()))  # as a checkpoint holds it
    resumed = _strategy(overrides, seed=2)
    resumed.load_state_dict(state)
    _, part2 = run_rounds(_grid(), resumed, arrays, num_rounds=ROUNDS, first_round=SPLIT + 1)
    assert [r.round for r in part2] == list(range(SPLIT + 1, ROUNDS + 1))
    for resumed_record, whole_record in zip(part2, history[SPLIT:], strict=True):
        assert resumed_record.extra["epsilon"] == pytest.approx(whole_record.extra["epsilon"], rel=1e-12)
    assert part2[0].extra["epsilon"] > part1[-1].extra["epsilon"]
