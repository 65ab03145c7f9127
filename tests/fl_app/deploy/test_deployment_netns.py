"""Integration: SuperNodes on separate network stacks (Linux network namespaces), one link cut mid-round.

Each SuperNode runs in its own namespace, joined to the SuperLink's (the root namespace) by a
veth pair with its own /30 subnet, and reaches the SuperLink by that subnet's address, which the
SuperLink's certificate names. Cutting a node's veth link during round 2 is what a device that
drops off the network looks like to the server: no RST, no reply, no heartbeat.

Needs root and ``ip netns``; skipped otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from fl_app.config.settings import Settings
from fl_app.deploy.operator import LoopbackDeployment, write_node_files
from fl_app.deploy.supernode_entry import HEARTBEAT_ENV
from fl_app.server.run_directory import latest_run

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[3]
NODES = 3


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


def _netns_usable() -> bool:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    probe = f"flk-probe-{os.getpid()}"
    ok = _ip("netns", "add", probe).returncode == 0
    _ip("netns", "del", probe)
    return ok


@pytest.fixture
def namespaces():
    """NODES namespaces, node i at 10.231.<i>.2 with the SuperLink's side at 10.231.<i>.1."""
    if not _netns_usable():
        pytest.skip("network namespaces need root and a working `ip netns`")
    tag = os.getpid() % 10000
    created, spaces = [], []
    try:
        for i in range(NODES):
            ns, outer, inner = f"flk{tag}n{i}", f"flk{tag}r{i}", f"flk{tag}n{i}"
            for args in (
                ("netns", "add", ns),
                ("link", "add", outer, "type", "veth", "peer", "name", inner),
                ("link", "set", inner, "netns", ns),
                ("addr", "add", f"10.231.{i}.1/30", "dev", outer),
                ("link", "set", outer, "up"),
                ("-n", ns, "addr", "add", f"10.231.{i}.2/30", "dev", inner),
                ("-n", ns, "link", "set", inner, "up"),
                ("-n", ns, "link", "set", "lo", "up"),
            ):
                result = _ip(*args)
                assert result.returncode == 0, f"ip {' '.join(args)}: {result.stderr}"
                if args[0] == "netns":
                    created.append(ns)
            spaces.append({"ns": ns, "link": outer, "superlink_ip": f"10.231.{i}.1"})
        yield spaces
    finally:
        for ns in created:
            _ip("netns", "del", ns)  # also removes the veth pair


def test_node_on_another_network_stack_loses_its_link_mid_round(tmp_path, namespaces):
    files = write_node_files(tmp_path / "data", Settings(num_partitions=NODES, partitioner="iid"))
    out = tmp_path / "outputs"
    hosts = ["localhost", "127.0.0.1"] + [space["superlink_ip"] for space in namespaces]
    with LoopbackDeployment(tmp_path / "deploy", ROOT, host="0.0.0.0", cert_hosts=hosts) as deployment:
        # the node cut off is declared offline after 2 x 10 s without a heartbeat, not 2 x 30 s
        deployment.env[HEARTBEAT_ENV] = "10"
        for i, space in enumerate(namespaces):
            key, _ = deployment.node_keys(f"node-{i}")
            deployment.start_node(
                f"node-{i}",
                {"data-path": str(files[i]), "partition-id": i},
                private_key=key,
                executor=True,  # in the node's namespace too: it reaches the node's Runtime API on its loopback
                superlink=f"{space['superlink_ip']}:{deployment.port}",
                prefix=["ip", "netns", "exec", space["ns"]],
            )
        ids = [deployment.node_id(f"node-{i}") for i in range(NODES)]
        run_id = deployment.submit(
            "num-server-rounds=2 dataset='local-file' num-classes=10 input-shape='8,8,1' local-epochs=1 "
            "min-available-clients=2 min-train-clients=2 min-evaluate-clients=2 min-train-replies=2 "
            f"round-timeout=120 output-dir='{out}'"
        )
        deadline = time.monotonic() + 400
        while deployment.log("node-2").count("Receiving: train message") < 2:
            assert time.monotonic() < deadline, "node-2 never received its round-2 train message"
            time.sleep(0.3)
        cut = _ip("link", "set", namespaces[2]["link"], "down")
        assert cut.returncode == 0, cut.stderr
        status = deployment.wait(run_id, timeout=420)
        assert status == "finished:completed", deployment.log("superlink")[-3000:]

    run_dir = latest_run(out)
    assert run_dir is not None
    round1, round2 = json.loads((run_dir / "history.json").read_text())
    assert round1["clients_replied"] == 3 and round1["clients_failed"] == 0, round1["failures"]
    assert round2["clients_replied"] == 2, round2["failures"]
    assert [f for f in round2["failures"] if f.startswith(f"node {ids[2]}:")], round2["failures"]
    assert round2["federated_accuracy"] is not None
