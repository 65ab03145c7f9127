"""Integration: ``edge.py status`` and ``edge.py stop`` with real processes on loopback.

The SuperLink and the SuperNode are started the way docs/deployment.md starts them, behind a
wrapper process (``bash -c``, standing in for ``uv run``) and in the background, without TLS to
keep the test short (the process trees are the same with TLS). ``edge.py stop`` must leave no
process of either tree: not the SuperLink's SuperExec, not the SuperNode's SuperExec, not the
warm Keras worker.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fl_app.deploy import node_worker, services
from fl_app.deploy.launcher import free_port, stop_process_tree
from fl_app.deploy.operator import deployment_env, start

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[3]
EDGE = [sys.executable, str(ROOT / "scripts" / "edge.py")]


def _edge(*args: str, env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([*EDGE, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def _alive(tickets: dict[int, int | None]) -> list[str]:
    """Command lines of the processes in ``tickets`` (PID -> start time) that still run."""
    return [services.command_line(pid) for pid, ticks in tickets.items() if services.start_ticks(pid) == ticks]


def test_edge_stop_leaves_no_process_and_a_lost_superlink_fails_the_node(tmp_path):
    """``edge.py stop NAME`` stops a SuperNode's whole tree (SuperExec and warm worker included),
    then the SuperLink's; a SuperNode started with ``--max-wait-time`` exits with code 3 once the
    SuperLink is gone (Flower's own SuperNode gives up reconnecting but keeps running)."""
    state = tmp_path / "state"
    env = deployment_env(tmp_path / "flwr_home")
    env["XDG_RUNTIME_DIR"] = str(tmp_path / "no-runtime-dir")  # the worker falls back to <tmp>/fl-keras-<uid>
    port, runtime_port, second_port = free_port(), free_port(), free_port()
    socket_path = node_worker.default_socket_path(runtime_port)
    wrappers = {}

    def background(name: str, *args: str) -> None:
        """``edge.py ARGS &`` behind a wrapper process that outlives it (as ``uv run`` does)."""
        command = shlex.join([*EDGE, *args, "--state-dir", str(state)]) + "; exit $?"
        wrappers[name] = start(["bash", "-c", command], env, tmp_path / f"{name}.log", cwd=ROOT)

    def node_id_logged(name: str) -> bool:
        return "SuperNode ID" in (tmp_path / f"{name}.log").read_text()

    try:
        background("superlink", "superlink", "--insecure", "--port", str(port))
        assert _edge("wait", "--insecure", "--address", f"127.0.0.1:{port}", env=env).returncode == 0
        _edge("connection", "--name", "edge", "--address", f"127.0.0.1:{port}", "--insecure", env=env)
        link = ("--insecure", "--superlink", f"127.0.0.1:{port}")
        background("node", "supernode", *link, "--runtime-port", str(runtime_port))
        _wait_for(lambda: node_id_logged("node"), 180, "the SuperNode's id")

        status = _edge("status", "--state-dir", str(state), env=env)
        assert status.returncode == 0, status.stdout + status.stderr
        assert f"superlink-{port}: running" in status.stdout and f"supernode-{runtime_port}: running" in status.stdout
        assert "online" in status.stdout and "flower-superexec" in status.stdout
        assert f"fl_app.deploy.node_worker --socket {socket_path}" in status.stdout

        recorded = {service.name: service for service in services.recorded(state)}
        node_tree = services.tree(recorded[f"supernode-{runtime_port}"])
        assert len(node_tree) >= 4, node_tree  # edge.py, flower-supernode, its SuperExec, the worker
        tickets = {pid: services.start_ticks(pid) for pid in node_tree}
        stopped = _edge("stop", "--state-dir", str(state), f"supernode-{runtime_port}", env=env)
        assert stopped.returncode == 0 and f"supernode-{runtime_port}: stopped" in stopped.stdout, stopped.stderr
        assert not _alive(tickets)
        assert not socket_path.exists() and not node_worker.key_path(socket_path).exists()
        assert wrappers["node"].wait(timeout=30) == 0  # stopped on request: not a failure

        background(
            "lost", "supernode", *link, "--runtime-port", str(second_port), "--no-worker", "--max-wait-time", "10"
        )
        _wait_for(lambda: node_id_logged("lost"), 180, "the second SuperNode's id")
        lost = next(service for service in services.recorded(state) if service.name == f"supernode-{second_port}")
        lost_tickets = {pid: services.start_ticks(pid) for pid in services.tree(lost)}
        link_tree = services.tree(recorded[f"superlink-{port}"])
        assert len(link_tree) >= 2, link_tree  # flower-superlink and its SuperExec
        tickets = {pid: services.start_ticks(pid) for pid in link_tree}
        stopped = _edge("stop", "--state-dir", str(state), f"superlink-{port}", env=env)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert not _alive(tickets)
        assert wrappers["lost"].wait(timeout=120) == 3
        assert "has not answered for" in (tmp_path / "lost.log").read_text()
        assert lost_tickets and not _alive(lost_tickets)  # edge.py stopped its SuperNode's tree on the way out
        assert services.recorded(state) == []
        assert "Nothing recorded" in _edge("status", "--state-dir", str(state), env=env).stdout
    finally:
        for wrapper in wrappers.values():
            stop_process_tree(wrapper)
        _edge("stop", "--state-dir", str(state), env=env)
