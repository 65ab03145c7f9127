"""Integration: the operator's commands (``edge.py certs/superlink/register/supernode/status/stop``)
with real processes on loopback, TLS and SuperNode authentication on, the SuperLink behind its
nginx gateway.

The SuperLink and the SuperNodes are started the way docs/deployment.md starts them, behind a
wrapper process (``bash -c``, standing in for ``uv run``) and in the background. An intruder who
holds ``ca.pem`` and reaches the public port cannot use the Control API (register a key, list
nodes or runs, unregister a node, submit a run), not even with path tricks, while the operator on
the loopback Control address can. ``edge.py stop`` must leave no process of either tree: not
nginx, not the SuperLink's SuperExec, not the SuperNode's SuperExec, not the warm Keras worker.
"""

from __future__ import annotations

import json
import shlex
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from fl_app.deploy import node_worker, services
from fl_app.deploy.launcher import free_port, stop_process_tree
from fl_app.deploy.operator import (
    _bin,
    deployment_env,
    make_node_keys,
    start,
    supernode_list_command,
    write_connection,
)

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


def _flwr(env: dict[str, str], command: list[str]) -> subprocess.CompletedProcess:
    """A ``flwr`` CLI command, run from the repository root."""
    return subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)


def _flwr_succeeded(result: subprocess.CompletedProcess) -> bool:
    """Whether a flwr CLI call succeeded: with ``--format json`` flwr exits 0 and says
    ``"success": false`` when it did not."""
    if result.returncode != 0:
        return False
    try:
        return json.loads(result.stdout).get("success", True) is not False
    except ValueError:
        return True


def _intruder_is_refused(tmp_path: Path, env: dict[str, str], public: str, ca: Path, node_id: int) -> None:
    """A fresh FLWR_HOME with ``ca.pem`` and a connection to the public port: every Control call
    gets nginx's 404; raw requests to Control and Runtime routes, path tricks included, too."""
    home = tmp_path / "intruder"
    write_connection(home, "public", public, root_certificates=ca)
    intruder_env = dict(env, FLWR_HOME=str(home))
    _, key = make_node_keys(tmp_path / "intruder-keys", "mine")
    attempts = {
        "register": ("supernode", "register", str(key), "public"),
        "list nodes": ("supernode", "list", "public", "--format", "json"),
        "list runs": ("ls", "public", "--format", "json"),
        "unregister": ("supernode", "unregister", str(node_id), "public"),
        "submit": ("run", str(ROOT), "public", "--format", "json"),
    }
    for what, args in attempts.items():
        result = _flwr(intruder_env, [_bin("flwr"), *args])
        assert not _flwr_succeeded(result), f"the intruder could {what}: {result.stdout}{result.stderr}"
        assert "404 Not Found" in result.stdout + result.stderr, (what, result.stdout, result.stderr)
    with httpx.Client(base_url=f"https://{public}", verify=ssl.create_default_context(cafile=ca)) as client:
        for path in (
            "/v1/control/list-runs",
            "/v1/fleet/../control/list-runs",
            "/v1/fleet/%2e%2e/control/list-runs",
            "/v1/fleet/..%2fcontrol/list-runs",
            "//v1/control/list-runs",
            "/v1/fleet/./../control/list-runs",
            "/v1/runtime/get-run",
            "/docs",
            "/openapi.json",
            "/health",  # GET only
        ):
            response = client.post(path, content=b"", headers={"content-type": "application/protobuf"})
            assert response.status_code in (403, 404), (path, response.status_code, response.text[:200])
        assert client.get("/v1/fleet/pull-messages").status_code == 403  # Fleet routes: POST only
        assert client.get("/health").status_code == 200  # nodes can tell whether the SuperLink is up


def test_edge_commands_behind_the_gateway_refuse_an_intruder_and_stop_every_process(tmp_path):
    """The intruder is refused (above) while the operator registers and lists; ``edge.py stop
    NAME`` stops a SuperNode's whole tree (with ``--flower-runtime``: SuperExec and warm worker
    included), then the SuperLink's (nginx included); a SuperNode started with ``--max-wait-time``
    (by default: with the warm executor, no SuperExec) exits with code 3 once the SuperLink is gone,
    its executor stopped with it (Flower's own SuperNode gives up reconnecting but keeps running)."""
    state = tmp_path / "state"
    env = deployment_env(tmp_path / "flwr_home")
    env["XDG_RUNTIME_DIR"] = str(tmp_path / "no-runtime-dir")  # the worker falls back to <tmp>/fl-keras-<uid>
    port, control_port, runtime_port, second_port = free_port(), free_port(), free_port(), free_port()
    pki = tmp_path / "pki"
    ca = pki / "ca.pem"
    socket_path = node_worker.default_socket_path(runtime_port)
    wrappers = {}

    def background(name: str, *args: str) -> None:
        """``edge.py ARGS &`` behind a wrapper process that outlives it (as ``uv run`` does)."""
        command = shlex.join([*EDGE, *args, "--state-dir", str(state)]) + "; exit $?"
        wrappers[name] = start(["bash", "-c", command], env, tmp_path / f"{name}.log", cwd=ROOT)

    def node_id_logged(name: str) -> bool:
        return "SuperNode ID" in (tmp_path / f"{name}.log").read_text()

    try:
        made = _edge("certs", "--out", str(pki), "--hosts", "localhost", "--nodes", "2", env=env)
        assert made.returncode == 0, made.stdout + made.stderr
        background(
            "superlink", "superlink", "--certs", str(pki), "--port", str(port), "--control-port", str(control_port)
        )
        waited = _edge("wait", "--address", f"127.0.0.1:{port}", "--ca", str(ca), env=env)  # through nginx
        assert waited.returncode == 0, waited.stdout + waited.stderr + (tmp_path / "superlink.log").read_text()
        _edge("connection", "--name", "edge", "--address", f"127.0.0.1:{control_port}", "--ca", str(ca), env=env)
        keys = [str(pki / "keys" / f"node-{i}.pub") for i in range(2)]
        registered = _edge("register", "--connection", "edge", *keys, env=env)
        assert registered.returncode == 0, registered.stdout + registered.stderr
        listed = _flwr(env, supernode_list_command("edge"))
        assert _flwr_succeeded(listed), listed.stdout + listed.stderr
        nodes = json.loads(listed.stdout)["nodes"]
        assert len(nodes) == 2
        _intruder_is_refused(tmp_path, env, f"127.0.0.1:{port}", ca, int(nodes[0]["node-id"]))
        superlink_log = (tmp_path / "superlink.log").read_text()
        assert "/v1/control/list-runs" not in superlink_log and "/v1/runtime/" not in superlink_log  # none got through
        relisted = _flwr(env, supernode_list_command("edge"))
        assert json.loads(relisted.stdout)["nodes"] == nodes  # nothing registered or unregistered

        link = ("--superlink", f"127.0.0.1:{port}", "--ca", str(ca))
        background(
            "node",
            "supernode",
            *link,
            *("--key", str(pki / "keys" / "node-0"), "--runtime-port", str(runtime_port), "--flower-runtime"),
        )
        _wait_for(lambda: node_id_logged("node"), 180, "the SuperNode's id")

        status = _edge("status", "--state-dir", str(state), env=env)
        assert status.returncode == 0, status.stdout + status.stderr
        assert f"superlink-{port}: running" in status.stdout and f"supernode-{runtime_port}: running" in status.stdout
        assert "online" in status.stdout and "flower-superexec" in status.stdout and "nginx" in status.stdout
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
            "lost",
            "supernode",
            *link,
            "--key",
            str(pki / "keys" / "node-1"),
            "--runtime-port",
            str(second_port),
            "--max-wait-time",
            "10",
        )
        _wait_for(lambda: node_id_logged("lost"), 180, "the second SuperNode's id")
        lost = next(service for service in services.recorded(state) if service.name == f"supernode-{second_port}")
        lost_tree = services.tree(lost)
        assert any("fl_app.deploy.node_executor" in services.command_line(pid) for pid in lost_tree), lost_tree
        assert not any(
            "flower-superexec" in services.command_line(pid) for pid in lost_tree
        )  # the default: no SuperExec
        lost_tickets = {pid: services.start_ticks(pid) for pid in lost_tree}
        link_tree = services.tree(recorded[f"superlink-{port}"])
        assert len(link_tree) >= 5, link_tree  # edge.py, flower-superlink, its SuperExec, nginx (master, worker)
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
