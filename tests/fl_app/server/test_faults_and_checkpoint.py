"""Unit tests: missing replies, min-train-replies, checkpoints and strategy state (no processes)."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedYogi
from flwr.supercore.task_identity import TaskIdentity

from fl_app.config.settings import Settings, SettingsError
from fl_app.server.checkpoint import (
    CheckpointError,
    check_compatible,
    load_checkpoint,
    restore_strategy_state,
    save_checkpoint,
    strategy_state,
)
from fl_app.server.round_loop import run_rounds
from fl_app.server.run_directory import RoundRecord
from strategies.aggregation.guard import GuardedStrategy
from tests.events import read_events
from tests.helpers import run_server_app_in_process


@pytest.fixture(autouse=True)
def task_identity():
    """Messages need a run id outside a Flower process."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    yield


class FakeGrid:
    """Nodes 1..n; ``silent`` nodes never answer, the others return weights + 1."""

    def __init__(self, nodes: int, silent: set[int] = frozenset(), unavailable: set[int] = frozenset()) -> None:
        self.nodes = list(range(1, nodes + 1))
        self.silent = silent
        self.unavailable = unavailable
        self.timeouts: list[float] = []

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, timeout=None):
        self.timeouts.append(timeout)
        replies = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = message.object_id  # as the real grid does
            if message.metadata.dst_node_id in self.unavailable:  # the SuperLink answers for it
                replies.append(
                    Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason="Node Unavailable"), reply_to=message)
                )
                replies[-1].metadata.__dict__["_src_node_id"] = 1
                continue
            if message.metadata.dst_node_id in self.silent:
                continue
            if message.metadata.message_type == "train":
                weights = [w + 1.0 for w in message.content["arrays"].to_numpy_ndarrays()]
                content = RecordDict(
                    {"arrays": ArrayRecord(weights), "metrics": MetricRecord({"num-examples": 10, "train-loss": 0.5})}
                )
            else:
                content = RecordDict({"metrics": MetricRecord({"num-examples": 10, "loss": 0.1, "accuracy": 0.9})})
            replies.append(Message(content=content, reply_to=message))
        return replies


def _arrays() -> ArrayRecord:
    return ArrayRecord([np.zeros((2, 3), np.float32), np.zeros(3, np.float32)])


def test_silent_node_is_recorded_and_the_round_aggregates_the_others():
    grid = FakeGrid(3, silent={3})
    strategy = FedAvg(min_train_nodes=3, min_evaluate_nodes=3, min_available_nodes=3)
    arrays, history = run_rounds(grid, strategy, _arrays(), num_rounds=1, timeout=7.0, min_train_replies=2)
    record = history[0]
    assert record.clients_replied == 2 and record.clients_failed == 1
    assert "node 3: no reply within the round timeout (7 s)" in record.failures
    assert "evaluate node 3: no reply within the round timeout (7 s)" in record.failures
    assert grid.timeouts == [7.0, 7.0]
    np.testing.assert_allclose(arrays.to_numpy_ndarrays()[0], 1.0)


def test_superlink_error_replies_are_attributed_to_the_destination_node():
    grid = FakeGrid(4, silent={3}, unavailable={4})
    strategy = FedAvg(min_train_nodes=4, min_evaluate_nodes=4, min_available_nodes=4)
    _, history = run_rounds(grid, strategy, _arrays(), num_rounds=1, timeout=2.0)
    train_failures = [f for f in history[0].failures if not f.startswith("evaluate")]
    assert sorted(train_failures) == ["node 3: no reply within the round timeout (2 s)", "node 4: Node Unavailable"]
    assert history[0].clients_failed == 2 and history[0].clients_replied == 2


def test_too_few_replies_keep_the_previous_model():
    grid = FakeGrid(3, silent={2, 3})
    strategy = FedAvg(min_train_nodes=3, min_evaluate_nodes=3, min_available_nodes=3)
    arrays, history = run_rounds(grid, strategy, _arrays(), num_rounds=2, timeout=1.0, min_train_replies=2)
    for record in history:
        assert record.clients_replied == 1
        assert any("round skipped: 1 valid replies < min-train-replies (2)" in f for f in record.failures)
        assert record.train_loss is None
    np.testing.assert_array_equal(arrays.to_numpy_ndarrays()[0], 0.0)


def test_sampling_is_seeded_per_round():
    def sampled(seed):
        grid = FakeGrid(10)
        strategy = FedAvg(
            fraction_train=0.3, fraction_evaluate=0.3, min_train_nodes=2, min_evaluate_nodes=2, min_available_nodes=2
        )
        seen = []
        original = grid.send_and_receive

        def spy(messages, timeout=None):
            messages = list(messages)
            seen.append(sorted(m.metadata.dst_node_id for m in messages))
            return original(messages, timeout)

        grid.send_and_receive = spy
        random.seed(12345)  # whatever state the process is in must not matter
        run_rounds(grid, strategy, _arrays(), num_rounds=2, first_round=1, sampling_seed=seed)
        return seen

    assert sampled(7) == sampled(7)
    assert sampled(7) != sampled(8)


@pytest.mark.parametrize(
    "factory",
    [
        lambda: FedAdam(eta=0.1),
        lambda: FedYogi(eta=0.1),
        lambda: FedAdagrad(eta=0.1),
        lambda: FedAvgM(server_learning_rate=1.0, server_momentum=0.9),
    ],
)
def test_builtin_server_optimizer_state_survives_a_restart(tmp_path, factory):
    """Two rounds, checkpoint, a fresh strategy resumes: round 3 equals the uninterrupted one."""
    kwargs = dict(num_rounds=3, timeout=1.0)

    def run(strategy, first_round, arrays, num_rounds):
        return run_rounds(
            FakeGrid(2), strategy, arrays, num_rounds=num_rounds, first_round=first_round, timeout=1.0, sampling_seed=0
        )

    uninterrupted, _ = run(factory(), 1, _arrays(), kwargs["num_rounds"])

    first = GuardedStrategy(factory())
    after_two, history = run(first, 1, _arrays(), 2)
    save_checkpoint(tmp_path, 2, after_two.to_numpy_ndarrays(), history, first, {"seed": 42})
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint.round == 2 and len(checkpoint.history) == 2
    resumed_strategy = GuardedStrategy(factory())
    restore_strategy_state(resumed_strategy, checkpoint.strategy_state)
    resumed, _ = run(resumed_strategy, 3, ArrayRecord(checkpoint.weights), 3)

    for a, b in zip(uninterrupted.to_numpy_ndarrays(), resumed.to_numpy_ndarrays()):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    # Without the restored state the third round differs: the test can fail.
    fresh, _ = run(factory(), 3, ArrayRecord(checkpoint.weights), 3)
    assert not np.allclose(fresh.to_numpy_ndarrays()[0], uninterrupted.to_numpy_ndarrays()[0])


class StatefulStrategy(FedAvg):
    """Uses the project's protocol: state_dict / load_state_dict with nested arrays."""

    def __init__(self):
        super().__init__()
        self.clip = 1.0
        self.noise = [np.arange(3.0), {"inner": np.eye(2)}]

    def state_dict(self):
        return {"clip": self.clip, "noise": self.noise, "steps": np.int64(4)}

    def load_state_dict(self, state):
        self.clip, self.noise, self.steps = state["clip"], state["noise"], state["steps"]


def test_state_dict_protocol_round_trips_nested_arrays(tmp_path):
    strategy = StatefulStrategy()
    strategy.clip = 0.25
    history = [RoundRecord(round=1, failures=["node 3: x"], extra={"epsilon": 1.5})]
    save_checkpoint(tmp_path, 1, [np.ones(2)], history, GuardedStrategy(strategy), {"a": 1})
    fresh = StatefulStrategy()
    checkpoint = load_checkpoint(tmp_path)
    restore_strategy_state(GuardedStrategy(fresh), checkpoint.strategy_state)
    assert fresh.clip == 0.25 and fresh.steps == 4
    np.testing.assert_array_equal(fresh.noise[0], np.arange(3.0))
    np.testing.assert_array_equal(fresh.noise[1]["inner"], np.eye(2))
    assert checkpoint.history == history and checkpoint.run_config == {"a": 1}
    with pytest.raises(CheckpointError, match=r"strategy FedAvg keeps \[\]; resume with the same strategy"):
        restore_strategy_state(GuardedStrategy(FedAvg()), checkpoint.strategy_state)


def test_checkpoint_errors_name_the_problem(tmp_path):
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        load_checkpoint(tmp_path)
    save_checkpoint(tmp_path, 3, [np.zeros((2, 2))], [], GuardedStrategy(FedAdam()), {})
    assert strategy_state(GuardedStrategy(FedAdam())) == {"state_dict": {"m_t": None, "v_t": None}}
    assert json.loads((tmp_path / "checkpoint" / "state.json").read_text())["strategy-class"].endswith(".FedAdam")
    with pytest.raises(CheckpointError, match="resume with the same strategy"):
        restore_strategy_state(GuardedStrategy(FedAvgM()), load_checkpoint(tmp_path).strategy_state)
    with pytest.raises(CheckpointError, match=r"arrays \(shape, dtype\) \[\(\(2, 2\), 'float64'\)\]"):
        check_compatible(load_checkpoint(tmp_path), [np.zeros(3)], 10)
    # an output directory's 'latest' leads to its newest run
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "latest").write_text(str(tmp_path) + "\n")
    assert load_checkpoint(tmp_path / "out").round == 3
    # a second save replaces the first and leaves no temporary folder behind
    save_checkpoint(tmp_path, 4, [np.zeros((2, 2))], [], GuardedStrategy(FedAdam()), {})
    assert json.loads((tmp_path / "checkpoint" / "state.json").read_text())["round"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "out"]


def test_checkpoints_of_unguarded_strategies_still_restore():
    """Checkpoints written before the guard kept Flower's optimizer state under 'attributes'."""
    strategy = GuardedStrategy(FedAvgM(server_momentum=0.9))
    restore_strategy_state(strategy, {"attributes": {"momentum_vector": {"0": np.ones(3)}}})
    np.testing.assert_array_equal(strategy.inner.momentum_vector["0"], np.ones(3))


def test_deployment_settings():
    settings = Settings.from_run_config({"min-train-replies": 3, "resume-from": "/elsewhere/run"})
    assert settings.min_train_replies == 3 and settings.resume_from == "/elsewhere/run"
    with pytest.raises(SettingsError, match=r"min-train-replies must be in \[1, 1000000\], got 0"):
        Settings.from_run_config({"min-train-replies": 0})
    # the server has no data in deployment: local-file without data-path is valid there
    Settings.from_run_config({"dataset": "local-file", "num-classes": 10, "input-shape": "64"})


def test_a_node_gone_for_good_does_not_stop_the_run():
    """Flower's strategies wait without limit for min-available nodes; the round timeout bounds it."""
    grid = FakeGrid(3)
    strategy = FedAvg(min_train_nodes=3, min_evaluate_nodes=3, min_available_nodes=3)

    def drop_node(record, _arrays):
        grid.nodes = [1, 2]  # node 3 crashed after round 1 and never comes back

    started = time.monotonic()
    arrays, history = run_rounds(grid, strategy, _arrays(), num_rounds=2, timeout=1.5, on_round_end=drop_node)
    assert time.monotonic() - started < 20
    assert history[0].clients_replied == 3 and not history[0].failures
    failures = history[1].failures
    assert any(f.startswith("train sampling: only 2 node(s) connected after waiting 1.5 s") for f in failures)
    assert any(f.startswith("evaluate sampling: only 2 node(s)") for f in failures)
    assert any("round skipped: 0 valid replies" in f for f in failures)
    np.testing.assert_allclose(arrays.to_numpy_ndarrays()[0], 1.0)  # round 1's model is kept


def run_server_app(monkeypatch, out, overrides: dict, nodes: int = 4) -> Path:
    """The whole ServerApp in-process on a LocalGrid of ``nodes`` nodes; its run dir."""
    base = {
        "num-partitions": nodes,
        "min-train-clients": 2,
        "min-available-clients": 2,
        "partitioner": "iid",
        "local-epochs": 1,
        "centralized-evaluation": False,
        "output-dir": str(out),
    }
    return run_server_app_in_process(monkeypatch, {**base, **overrides}, nodes)


PRIVATE = {"strategy": "dp-fedavg", "dp-mode": "central", "dp-noise-multiplier": 1.0, "dp-clip-norm": 1.0}


def test_private_run_refuses_to_resume_a_non_private_checkpoint(monkeypatch, tmp_path):
    """FedAvg rounds resumed under dp-fedavg would be reported as private (the true epsilon is
    infinite): refused, naming the checkpoint and the mismatch, before any round runs."""
    stopped = run_server_app(monkeypatch, tmp_path / "plain", {"strategy": "fedavg", "num-server-rounds": 1})
    with pytest.raises(CheckpointError) as refused:
        run_server_app(
            monkeypatch, tmp_path / "private", {**PRIVATE, "num-server-rounds": 2, "resume-from": str(stopped)}
        )
    message = str(refused.value)
    assert str(stopped / "checkpoint") in message
    assert "DpFedAvgStrategy" in message and "resume with the strategy" in message
    assert not (tmp_path / "private").exists()  # refused before the run directory is made


def test_non_private_run_refuses_to_resume_a_private_checkpoint(monkeypatch, tmp_path):
    stopped = run_server_app(monkeypatch, tmp_path / "private", {**PRIVATE, "num-server-rounds": 1})
    scalars, histograms = read_events(stopped)  # epsilon is tracked; the clients' update norms are not released
    assert scalars["privacy/epsilon"][1] > 0 and "clients/update_norm" not in histograms
    assert json.loads((stopped / "checkpoint" / "state.json").read_text())["privacy"] == {
        "private": True,
        "dp-mode": "central",
    }
    with pytest.raises(CheckpointError, match=f"{stopped / 'checkpoint'}' was written by strategy .*DpFedAvgStrategy"):
        run_server_app(
            monkeypatch, tmp_path / "plain", {"strategy": "fedavg", "num-server-rounds": 2, "resume-from": str(stopped)}
        )


def test_same_strategy_class_with_other_privacy_or_dp_mode_is_refused(tmp_path):
    """SecAgg+'s one strategy class runs with and without DP: the privacy state decides."""
    from fl_app.secagg.server import SecureDpFedAvg
    from fl_app.server.checkpoint import check_same_strategy, resume_strategy

    secure = {
        "secure-aggregation": True,
        "dp-sampling": "fixed-size",
        "num-partitions": 5,
        "min-train-clients": 5,
        "min-available-clients": 5,
    }
    initial = ArrayRecord([np.zeros(3, np.float32)])
    plain = SecureDpFedAvg(
        Settings.from_run_config({**secure, "strategy": "robust", "aggregation-rule": "mean"}), initial, None
    )
    private = SecureDpFedAvg(
        Settings.from_run_config({**secure, "strategy": "dp-fedavg", "dp-mode": "client-clipping"}), initial, None
    )
    save_checkpoint(tmp_path / "plain", 2, [np.zeros(3)], [], plain, {})
    save_checkpoint(tmp_path / "private", 2, [np.zeros(3)], [], private, {})
    with pytest.raises(CheckpointError, match=r"plain/checkpoint' holds no privacy state .*epsilon is infinite"):
        resume_strategy(load_checkpoint(tmp_path / "plain"), private)
    with pytest.raises(CheckpointError, match=r"private/checkpoint' holds a privacy accountant .* not private"):
        resume_strategy(load_checkpoint(tmp_path / "private"), plain)
    # same class and privacy: accepted, and the accountant comes back
    resume_strategy(load_checkpoint(tmp_path / "private"), private)
    check_same_strategy(load_checkpoint(tmp_path / "plain"), plain)
    # a checkpoint written before 'privacy' was recorded is judged by its strategy state
    state = json.loads((tmp_path / "plain" / "checkpoint" / "state.json").read_text())
    del state["privacy"]
    (tmp_path / "plain" / "checkpoint" / "state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match="holds no privacy state"):
        check_same_strategy(load_checkpoint(tmp_path / "plain"), private)


def test_private_strategy_with_another_dp_mode_is_refused(tmp_path):
    from fl_app.server.checkpoint import resume_strategy
    from fl_app.server.strategy_setup import make_strategy

    central = make_strategy(Settings.from_run_config(PRIVATE))
    local = make_strategy(Settings.from_run_config({**PRIVATE, "dp-mode": "client-clipping"}))
    save_checkpoint(tmp_path, 1, [np.zeros(3)], [], central, {})
    with pytest.raises(CheckpointError, match="written with dp-mode 'central', this run has dp-mode 'client-clipping'"):
        resume_strategy(load_checkpoint(tmp_path), local)
    resume_strategy(load_checkpoint(tmp_path), make_strategy(Settings.from_run_config(PRIVATE)))


def _corrupt(folder, what):
    """Damage a saved checkpoint in one way (``what``)."""
    state_file = folder / "checkpoint" / "state.json"
    state = json.loads(state_file.read_text())
    if what == "truncated weights.npz":
        data = (folder / "checkpoint" / "weights.npz").read_bytes()
        (folder / "checkpoint" / "weights.npz").write_bytes(data[: len(data) // 2])
    elif what == "missing history":
        del state["history"]
    elif what == "round 'abc'":
        state["round"] = "abc"
    elif what == "history ends elsewhere":
        state["round"] = 7
    elif what == "NaN weights":
        np.savez(folder / "checkpoint" / "weights.npz", np.full(3, np.nan, np.float32))
    elif what == "a history record of other fields":
        state["history"] = [{"round": 1, "colour": "red"}]
    state_file.write_text(json.dumps(state))


@pytest.mark.parametrize(
    ("what", "message"),
    [
        ("truncated weights.npz", "cannot be read: BadZipFile"),
        ("missing history", "state.json lacks history"),
        ("round 'abc'", "round must be a whole number >= 0, got 'abc'"),
        ("history ends elsewhere", "round is 7 but the history ends with round 1"),
        ("NaN weights", "weights array 0 .* is not finite"),
        ("a history record of other fields", "the history is not a list of round records"),
    ],
)
def test_every_bad_checkpoint_raises_a_checkpoint_error_naming_the_file(tmp_path, what, message):
    save_checkpoint(tmp_path, 1, [np.zeros(3, np.float32)], [RoundRecord(round=1)], GuardedStrategy(FedAvg()), {})
    _corrupt(tmp_path, what)
    with pytest.raises(CheckpointError, match=f"checkpoint '{tmp_path / 'checkpoint'}'.*{message}"):
        load_checkpoint(tmp_path)


def test_a_checkpoint_must_fit_the_run_and_hold_finite_state(tmp_path):
    from strategies.aggregation.steps import RuleStep, ServerStep
    from strategies.aggregation.strategy import AggregationStrategy

    save_checkpoint(tmp_path, 9, [np.zeros(3, np.float32)], [RoundRecord(round=9)], GuardedStrategy(FedAvg()), {})
    checkpoint = load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="after round 9, beyond this run's num-server-rounds=5"):
        check_compatible(checkpoint, [np.zeros(3, np.float32)], 5)
    with pytest.raises(CheckpointError, match=r"\(\(3,\), 'float32'\)\], the configured model \[\(\(3,\), 'float64'\)"):
        check_compatible(checkpoint, [np.zeros(3, np.float64)], 10)
    check_compatible(checkpoint, [np.zeros(3, np.float32)], 10)
    momentum = GuardedStrategy(AggregationStrategy(RuleStep.mean(), server_step=ServerStep(1.0, 0.9)))
    with pytest.raises(CheckpointError, match=r"NaN or infinite values at state\['momentum'\]"):
        restore_strategy_state(momentum, {"state_dict": {"momentum": np.array([np.nan, 0.0], np.float32)}})
