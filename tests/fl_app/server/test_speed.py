"""Fast simulation: compiled train/eval loop, short-poll send_and_receive, server without TF, memory."""

import os
import time

import numpy as np
import pytest
from flwr.app import Context, RecordDict

import tests.fakes as fakes
from fl_app.config.settings import Settings
from fl_app.deploy.process_tools import TreeMemorySampler, process_tree, tree_memory
from fl_app.server.polling import poll_delays, send_and_receive
from fl_app.task.compiled_loop import loop_for
from fl_app.task.data import client_data
from fl_app.task.keras_client import compile_model
from fl_app.task.models import build_model, make_optimizer

SETTINGS = Settings(num_partitions=4, partitioner="iid")


@pytest.fixture(scope="module")
def compiled():
    return compile_model(build_model("mlp", (8, 8, 1), 10, seed=0), make_optimizer("adam", 0.01))


def test_compiled_evaluate_matches_keras_evaluate(compiled):
    model, _ = compiled
    data = client_data(SETTINGS, 0)
    expected_loss, expected_accuracy = model.evaluate(data.x_test, data.y_test, verbose=0)
    results = loop_for(model).evaluate(data.x_test, data.y_test)  # Keras' names, as model.evaluate's
    assert results["loss"] == pytest.approx(expected_loss, rel=1e-4)
    assert results["accuracy"] == pytest.approx(expected_accuracy)


def test_compiled_fit_learns_and_is_traced_once_for_all_client_sizes(compiled):
    model, _ = compiled
    initial = model.get_weights()
    loop = loop_for(model)
    first, second = client_data(SETTINGS, 1), client_data(SETTINGS, 2)
    loss0 = loop.evaluate(first.x_train, first.y_train)["loss"]
    logs = loop.fit(first.x_train, first.y_train, epochs=3, batch_size=32, seed=1)
    assert set(logs) >= {"loss", "accuracy"} and logs["loss"] < loss0
    traced = [f.experimental_get_tracing_count() for f in loop._train_steps.values()]
    loop.fit(second.x_train[:37], second.y_train[:37], epochs=2, batch_size=16, seed=2)  # other size
    assert [f.experimental_get_tracing_count() for f in loop._train_steps.values()] == traced
    assert loop_for(model) is loop
    model.set_weights(initial)


def test_compiled_fit_equals_train_on_batch_in_the_same_order(compiled):
    """The fused fit (all epochs but the last in one call) runs exactly the batches that a slow
    loop of ``train_on_batch`` runs over the same seeded permutations, partial batches included,
    and reports the last epoch's running metrics."""
    from fl_app.task.keras_client import reset_optimizer

    model, _ = compiled
    initial = model.get_weights()
    data = client_data(SETTINGS, 3)
    x, y = data.x_train[:45], data.y_train[:45]  # batches of 16: 16, 16, 13 per epoch

    reset_optimizer(model.optimizer)
    logs = loop_for(model).fit(x, y, epochs=3, batch_size=16, seed=7)
    fused = model.get_weights()

    model.set_weights(initial)
    reset_optimizer(model.optimizer)
    rng = np.random.Generator(np.random.PCG64(7))
    for _ in range(3):
        model.reset_metrics()
        order = rng.permutation(len(y))
        for start in range(0, len(y), 16):
            index = order[start : start + 16]
            expected_logs = model.train_on_batch(x[index], y[index], reset_metrics=False, return_dict=True)
    for a, b in zip(fused, model.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert logs["loss"] == pytest.approx(expected_logs["loss"], rel=1e-5)
    assert logs["accuracy"] == pytest.approx(expected_logs["accuracy"])
    model.set_weights(initial)


class PollingGrid:
    """Replies become available ``delay`` seconds after the push, like a SuperLink's."""

    def __init__(self, delay: float, lose: int = 0) -> None:
        self.delay, self.lose, self.pulls = delay, lose, 0
        self.pushed: list = []

    def push_messages(self, messages):
        self.at = time.monotonic() + self.delay
        self.pushed = list(messages)
        return [str(i) for i in range(len(self.pushed))]

    def pull_messages(self, ids):
        self.pulls += 1
        if time.monotonic() < self.at:
            return []
        ready = [fakes.reply(m.metadata.dst_node_id, [np.zeros(1, np.float32)]) for m in self.pushed[self.lose :]]
        for i, r in enumerate(ready, start=self.lose):
            r.metadata.__dict__["_reply_to_message_id"] = str(i)
        self.pushed = []
        return [r for r in ready if r.metadata.reply_to_message_id in set(ids)]


def test_send_and_receive_returns_soon_after_the_replies_arrive():
    grid = PollingGrid(delay=0.2)
    started = time.monotonic()
    replies = send_and_receive(grid, [fakes.instruction(n) for n in (1, 2, 3)], timeout=10)
    elapsed = time.monotonic() - started
    assert len(replies) == 3 and 0.2 <= elapsed < 2.0  # Flower's own loop sleeps 3 s here; ~0.3 s idle
    assert grid.pulls < 20


def test_send_and_receive_stops_at_the_timeout_with_what_arrived():
    grid = PollingGrid(delay=0.0, lose=1)  # the first message never gets a reply
    started = time.monotonic()
    replies = send_and_receive(grid, [fakes.instruction(n) for n in (1, 2)], timeout=0.3)
    assert len(replies) == 1 and time.monotonic() - started < 2.0


def test_poll_delays_grow_to_the_cap():
    gen = poll_delays(0.01, 2.0, 0.05)
    assert [next(gen) for _ in range(5)] == [0.01, 0.02, 0.04, 0.05, 0.05]


def test_a_grid_without_push_and_pull_keeps_its_own_send_and_receive():
    grid = fakes.FakeGrid([1, 2], lambda m: fakes.reply(m.metadata.dst_node_id, [np.ones(1, np.float32)]))
    assert len(send_and_receive(grid, [fakes.instruction(1), fakes.instruction(2)], timeout=1)) == 2


def test_client_sends_the_same_initial_weights_as_the_server_builds():
    from flwr.app import ConfigRecord, Message, MessageType

    from fl_app.client.initial_weights import initial_weights_reply
    from fl_app.server.initial_weights import QUERY, server_model

    settings = Settings(num_partitions=4)
    context = Context(
        run_id=1,
        node_id=5,
        node_config={"partition-id": 2, "num-partitions": 4},
        state=RecordDict(),
        run_config=settings.to_run_config(),
    )
    message = Message(
        content=RecordDict({"config": ConfigRecord({"query": QUERY})}), dst_node_id=5, message_type=MessageType.QUERY
    )
    reply = initial_weights_reply(message, context)
    model, _ = server_model(settings)
    for sent, built in zip(reply.content["arrays"].to_numpy_ndarrays(), model.get_weights()):
        np.testing.assert_array_equal(sent, built)


def test_settings_refuse_a_bad_compression_and_builtin_strategies():
    from fl_app.config.settings import SettingsError

    with pytest.raises(SettingsError, match="compression must be one of"):
        Settings.from_run_config({"compression": "zip"})
    with pytest.raises(SettingsError, match="compression-topk-fraction must be in"):
        Settings.from_run_config({"compression-topk-fraction": 0.0})
    with pytest.raises(SettingsError, match="needs one of our aggregation strategies.*got strategy 'fedavg'"):
        Settings.from_run_config({"compression": "top-k", "strategy": "fedavg"})
    Settings.from_run_config({"compression": "top-k", "strategy": "robust"})


def test_tree_memory_counts_this_process():
    memory = tree_memory(os.getpid())
    assert memory["processes"] >= 1 and memory["rss"] > 50 * 2**20 and 0 < memory["pss"] <= memory["rss"] * 1.01
    assert os.getpid() in process_tree(os.getpid())
    sampler = TreeMemorySampler(os.getpid(), interval=0.05).start()
    time.sleep(0.2)
    result = sampler.stop()
    assert result["samples"] >= 1 and result["peak_rss_gib"] > 0


def test_server_without_tensorflow_gets_initial_weights_from_a_node():
    from fl_app.client.initial_weights import initial_weights_reply
    from fl_app.server.initial_weights import query_initial_arrays

    settings = Settings(num_partitions=4)
    contexts = {
        n: Context(
            run_id=1,
            node_id=n,
            node_config={"partition-id": n - 1, "num-partitions": 4},
            state=RecordDict(),
            run_config=settings.to_run_config(),
        )
        for n in (1, 2)
    }
    asked = []

    def answer(message):
        asked.append(message.metadata.dst_node_id)
        return initial_weights_reply(message, contexts[message.metadata.dst_node_id])

    arrays = query_initial_arrays(fakes.FakeGrid([2, 1], answer), settings, timeout=5)
    assert asked == [1] and [a.shape for a in arrays.to_numpy_ndarrays()] == [
        (64, 128),
        (128,),
        (128, 64),
        (64,),
        (64, 10),
        (10,),
    ]
    failing = fakes.FakeGrid([1], lambda m: fakes.error_reply(1, "boom"))
    with pytest.raises(RuntimeError, match="node 1 failed to send the initial weights: boom"):
        query_initial_arrays(failing, settings, timeout=5)


def test_server_modules_do_not_import_tensorflow():
    import subprocess
    import sys

    code = (
        "import sys; import fl_app.server_app, fl_app.server.initial_weights, fl_app.client.compression, fl_app.server.polling, "
        "strategies.registry; from fl_app.config.settings import Settings; Settings.from_run_config({}); "
        "print('tensorflow' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "False", out.stderr[-2000:]


def test_the_simulations_in_memory_grid_is_polled_at_most_every_20_ms(monkeypatch):
    from flwr.superlink.grid import InMemoryGrid

    from fl_app.server import polling

    caps = []
    monkeypatch.setattr(polling, "send_and_receive", lambda grid, messages, **kw: caps.append(kw["maximum"]) or [])
    polling.ShortPollGrid(InMemoryGrid.__new__(InMemoryGrid)).send_and_receive([], timeout=1)
    polling.ShortPollGrid(PollingGrid(delay=0.0)).send_and_receive([], timeout=1)  # a networked grid
    assert caps == [polling.IN_MEMORY_POLL_MAXIMUM_S, polling.POLL_MAXIMUM_S] == [0.02, 0.1]
