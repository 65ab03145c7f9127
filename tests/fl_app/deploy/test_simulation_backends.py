"""The simulation's backends (in-process and Ray) and the warm simulation process's hand-off."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.client_app import ClientAppException

from fl_app.client.node_client import SHARED_PROCESS_ENV, set_tf_threads
from fl_app.deploy import simulation_entry, superexec_entry
from fl_app.deploy.inprocess_backend import InProcessBackend
from fl_app.deploy.simulation_entry import check_backend, open_task_fifo, wait_for_task
from fl_app.deploy.superexec_entry import SIMULATION_COMMAND, SimulationLauncher, hand_to_warm
from fl_app.simulation.local_grid import _ensure_task_identity


def counting_app() -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        if msg.content["config"]["fail"]:
            raise RuntimeError("the client's own error")
        context.state["seen"] = ConfigRecord({"n": int(context.state.get("seen", {"n": 0})["n"]) + 1})
        msg.content["config"]["touched"] = True  # must not reach the sender's message
        return Message(RecordDict({"metrics": ConfigRecord({"pid": os.getpid()})}), reply_to=msg)

    return app


def train_message(fail: bool = False) -> Message:
    _ensure_task_identity()
    return Message(RecordDict({"config": ConfigRecord({"fail": fail})}), dst_node_id=7, message_type="train")


def node_context() -> Context:
    return Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(), run_config={})


def test_in_process_backend_runs_the_client_app_here_on_copies(monkeypatch):
    monkeypatch.delenv(SHARED_PROCESS_ENV, raising=False)
    backend = InProcessBackend({})
    assert not backend.is_worker_idle()  # not built yet
    with pytest.raises(ValueError, match=r"build\(\)"):
        backend.process_message(train_message(), node_context())
    app = counting_app()
    backend.build(lambda: app)
    assert os.environ[SHARED_PROCESS_ENV] == "1" and backend.is_worker_idle() and backend.num_workers == 1

    message, context = train_message(), node_context()
    reply, updated = backend.process_message(message, context)
    assert reply.content["metrics"]["pid"] == os.getpid()
    assert updated.state["seen"]["n"] == 1
    # the ClientApp worked on copies, as a Ray actor does on what Ray deserialised
    assert "seen" not in context.state and "touched" not in message.content["config"]
    reply, updated = backend.process_message(train_message(), updated)
    assert updated.state["seen"]["n"] == 2

    with pytest.raises(ClientAppException, match="the client's own error"):
        backend.process_message(train_message(fail=True), node_context())
    assert backend.is_worker_idle()  # an error frees the worker
    backend.terminate()
    assert not backend.is_worker_idle()


def test_a_shared_process_keeps_its_tensorflow_threads(monkeypatch):
    monkeypatch.setenv(SHARED_PROCESS_ENV, "1")
    set_tf_threads.cache_clear()
    import tensorflow as tf

    before = tf.config.threading.get_intra_op_parallelism_threads()
    set_tf_threads(before + 3)
    assert tf.config.threading.get_intra_op_parallelism_threads() == before
    set_tf_threads.cache_clear()


def test_an_unknown_backend_is_refused_with_the_key_and_what_is_allowed():
    assert check_backend("inprocess") == "inprocess" and check_backend("ray") == "ray"
    with pytest.raises(ValueError, match=r"backend='rey' is not a backend; allowed: inprocess, ray"):
        check_backend("rey")


SIMULATION = """
import os, sys, time
from fl_app.deploy.simulation_entry import install_backends
install_backends()
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

client = ClientApp()

@client.train()
def train(msg, context):
    return Message(RecordDict({"m": ConfigRecord({"pid": os.getpid(), "node": context.node_id})}), reply_to=msg)

server = ServerApp()

@server.main()
def main(grid: Grid, context: Context) -> None:
    deadline = time.monotonic() + 60
    while len(nodes := list(grid.get_node_ids())) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    messages = [Message(RecordDict(), dst_node_id=n, message_type="train") for n in nodes]
    replies = list(grid.send_and_receive(messages, timeout=120))
    pids = sorted({r.content["m"]["pid"] for r in replies})
    print("RESULT", len(replies), len({r.content["m"]["node"] for r in replies}), pids == [os.getpid()],
          "ray" in sys.modules, flush=True)

run_simulation(server_app=server, client_app=client, num_supernodes=3, backend_name=sys.argv[1])
"""


def test_flower_simulation_runs_every_client_app_in_process_without_ray(tmp_path):
    script = tmp_path / "sim.py"
    script.write_text(textwrap.dedent(SIMULATION))
    done = subprocess.run(
        [sys.executable, str(script), "inprocess"], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    output = done.stdout + done.stderr
    # three replies from three nodes, all from this very process, and Ray never imported
    assert "RESULT 3 3 True False" in output, output[-3000:]
    assert "Simulation backend: inprocess; cold start" in output


def test_the_patched_start_vce_refuses_an_unknown_backend_before_flower_runs(monkeypatch):
    from flwr.server.superlink.fleet import vce
    from flwr.server.superlink.fleet.vce import vce_api

    monkeypatch.setattr(vce, "start_vce", vce.start_vce)  # both restored after the test
    monkeypatch.setattr(vce_api, "add_messages_to_queue", vce_api.add_messages_to_queue)
    monkeypatch.setattr(vce_api, "Queue", vce_api.Queue)
    simulation_entry.install_backends()
    assert vce_api.add_messages_to_queue is simulation_entry.add_messages_to_queue
    assert vce_api.Queue is simulation_entry.PromptQueue
    with pytest.raises(ValueError, match="backend='rey'"):
        vce.start_vce(backend_name="rey", backend_config_json_stream="{}")


def test_a_task_handed_to_the_warm_process_arrives_whole(tmp_path):
    fifo = str(tmp_path / "warm.fifo")
    os.mkfifo(fifo)
    assert not hand_to_warm(fifo, ["--token", "t"])  # nobody reads yet
    assert not hand_to_warm(str(tmp_path / "missing.fifo"), ["x"])
    descriptor = open_task_fifo(fifo)
    arguments = ["--runtime-api-address", "127.0.0.1:9091", "--token", "abc", "--insecure"]
    assert hand_to_warm(fifo, arguments)
    assert wait_for_task(descriptor, os.getppid()) == arguments
    assert not hand_to_warm(fifo, arguments)  # the reader closed it: the next task starts cold


def test_the_warm_process_gives_up_when_its_parent_is_gone_and_rejects_a_bad_task(tmp_path):
    fifo = str(tmp_path / "warm.fifo")
    os.mkfifo(fifo)
    assert wait_for_task(open_task_fifo(fifo), parent=os.getppid() + 1_000_000) is None
    descriptor = open_task_fifo(fifo)
    with open(fifo, "wb") as writer:
        writer.write(json.dumps({"not": "a list"}).encode() + b"\n")
    with pytest.raises(ValueError, match="JSON list of strings"):
        wait_for_task(descriptor, os.getppid())


class Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, args, **kwargs):
        self.calls.append((list(args), kwargs))
        return "process"


def test_the_superexec_starts_simulations_warm_once_then_cold_and_other_tasks_as_flower(tmp_path, monkeypatch):
    recorder = Recorder()
    monkeypatch.setattr(superexec_entry.subprocess, "Popen", recorder)
    fifo = str(tmp_path / "warm.fifo")
    os.mkfifo(fifo)
    descriptor = open_task_fifo(fifo)
    launcher = SimulationLauncher(fifo)

    assert launcher.Popen(["flwr-serverapp", "--token", "s"]) == "process"
    assert recorder.calls[-1][0] == ["flwr-serverapp", "--token", "s"]
    assert launcher.Popen(["/venv/bin/flwr-simulation", "--token", "a"]) is None  # handed over
    assert len(recorder.calls) == 1 and wait_for_task(descriptor, os.getppid()) == ["--token", "a"]
    assert launcher.Popen(["flwr-simulation", "--token", "b"], stdout=-3) == "process"  # once only
    assert recorder.calls[-1] == ([*SIMULATION_COMMAND, "--token", "b"], {"stdout": -3})


def test_flowers_subprocess_executor_launches_simulations_through_ours(monkeypatch):
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor import subprocess_executor
    from flwr.supercore.superexec.executor.types import ExecutionSpec

    recorder = Recorder()
    monkeypatch.setattr(superexec_entry.subprocess, "Popen", recorder)
    monkeypatch.setattr(subprocess_executor, "subprocess", subprocess_executor.subprocess)  # restored
    superexec_entry.install_simulation_launcher(None)
    spec = ExecutionSpec(
        task_type=TaskType.SIMULATION,
        runtime_api_address="127.0.0.1:9091",
        token="tok",
        insecure=True,
        root_certificates_path=None,
        runtime_dependency_install=False,
        parent_pid=4321,
        suppress_output=False,
        task_id=1,
        fab_hash=None,
    )
    subprocess_executor.SubprocessExecutor().launch(spec)
    assert recorder.calls == [
        (
            [
                *SIMULATION_COMMAND,
                "--runtime-api-address",
                "127.0.0.1:9091",
                "--token",
                "tok",
                "--insecure",
                "--parent-pid",
                "4321",
            ],
            {},
        )
    ]


def test_a_simulation_superlink_starts_our_superexec_with_flowers_arguments(monkeypatch):
    import importlib

    from fl_app.deploy import superlink_entry

    module = importlib.import_module("flwr.superlink.cli.flower_superlink")
    flower = module._get_superexec_command
    monkeypatch.setattr(module, "_get_superexec_command", flower)  # restored after the test
    arguments = {
        "runtime_address": "127.0.0.1:9091",
        "runtime_certificates": None,
        "runtime_root_certificates_path": None,
        "parent_pid": 99,
        "runtime_dependency_install": False,
    }
    expected = flower(**arguments)
    superlink_entry.use_superexec_entry()
    assert module._get_superexec_command(**arguments) == [
        sys.executable,
        "-m",
        "fl_app.deploy.superexec_entry",
        *expected[1:],
    ]
    assert expected[0] == "flower-superexec"


def test_the_message_sweep_is_short_for_few_nodes_and_flowers_for_many():
    from fl_app.deploy.simulation_entry import sweep_interval

    assert [sweep_interval(n) for n in (1, 10, 20, 100, 200, 10_000)] == [0.01, 0.01, 0.01, 0.05, 0.1, 0.1]


def test_the_sweep_puts_each_nodes_next_message_in_the_queue_until_stopped():
    import queue
    import threading

    from fl_app.deploy.simulation_entry import add_messages_to_queue

    class State:
        def __init__(self):
            self.pending = {1: ["a1", "a2"], 2: ["b1"], 3: []}
            self.sweeps = 0

        def get_message_ins(self, node_id, limit):
            assert limit == 1
            self.sweeps += node_id == 1
            taken, self.pending[node_id] = self.pending[node_id][:limit], self.pending[node_id][limit:]
            return taken

    state, found, stop = State(), queue.Queue(), threading.Event()
    worker = threading.Thread(target=add_messages_to_queue, args=(state, found, {1: 0, 2: 1, 3: 2}, stop))
    started = time.monotonic()
    worker.start()
    messages = [found.get(timeout=5) for _ in range(3)]
    took = time.monotonic() - started
    stop.set()
    worker.join(timeout=5)
    assert not worker.is_alive() and sorted(messages) == ["a1", "a2", "b1"]
    assert took < 0.09  # the second of node 1's messages, one 10 ms sweep later (Flower's: 0.1 s)


def test_the_runtimes_queues_give_up_a_wait_within_50_ms():
    import queue

    from fl_app.deploy.simulation_entry import QUEUE_WAIT_S, PromptQueue

    waiting = PromptQueue()
    started = time.monotonic()
    with pytest.raises(queue.Empty):
        waiting.get(timeout=1.0)  # Flower's runtime threads wait 1 s for their next item
    assert QUEUE_WAIT_S <= time.monotonic() - started < 0.5
    waiting.put("message")
    assert waiting.get(timeout=1.0) == "message" and waiting.empty()
    with pytest.raises(queue.Empty):
        waiting.get(block=False)


class SlowLogClient:
    """Stands in for the SuperLink's PushLogs: records the lines, taking 0.1 s per push."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def PushLogs(self, request):  # Flower's method name
        time.sleep(0.1)
        self.lines.extend(request.logs)


def test_the_log_flush_waits_for_the_last_push_and_no_longer():
    """Flower's flush sleeps a fixed 1 s after the queue empties; ours ends the uploader (Flower's own
    thread) and returns once it has pushed every queued line, whatever that push takes; Flower's
    later stop of the uploader then returns at once."""
    import queue

    from flwr.supercore.logger import start_log_uploader, stop_log_uploader

    client = SlowLogClient()
    log_queue: queue.Queue = queue.Queue()
    uploader = start_log_uploader(log_queue, 1, 1, client)
    assert uploader.name.endswith(simulation_entry.LOG_UPLOADER_SUFFIX)
    for line in ("first", "second", "last"):
        log_queue.put(line)
    started = time.monotonic()
    assert simulation_entry.flush_logs(log_queue) is True
    elapsed = time.monotonic() - started
    assert client.lines == ["first", "second", "last"] and not uploader.is_alive()
    # at most a push under way, Flower's 0.2 s upload interval and the last push: 0.4 s; Flower's
    # flush would sleep 1 s after the queue empties
    assert elapsed < 0.9
    started = time.monotonic()
    stop_log_uploader(log_queue, uploader)
    assert time.monotonic() - started < 0.1


def test_without_an_uploader_the_flush_is_flowers(monkeypatch):
    import queue

    calls = []
    monkeypatch.setattr("flwr.supercore.logger.flush_logs", lambda q, timeout=3.0: calls.append(q) or True)
    log_queue: queue.Queue = queue.Queue()
    assert simulation_entry.flush_logs(log_queue) is True
    assert calls == [log_queue] and log_queue.empty()


def test_the_simulation_process_flushes_with_ours(monkeypatch):
    from flwr.simulation import app

    monkeypatch.setattr(app, "flush_logs", app.flush_logs)  # restored after the test
    simulation_entry.install_prompt_log_flush()
    assert app.flush_logs is simulation_entry.flush_logs
