"""Integration: a real deployment on loopback, SuperLink and SuperNodes as separate processes.

TLS and SuperNode authentication are on. Each SuperNode reads its own data file. The nodes run
their messages in the warm executor (fl_app.deploy.node_executor: no process per message), except
two: in the first test node-2 runs them through Flower's SuperExec with the warm Keras worker
(fl_app.deploy.node_worker), and the node with the corrupt file the Flower way (a fresh process
per message, TensorFlow imported in each).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from fl_app.config.settings import Settings
from fl_app.deploy.launcher import stop_process_tree
from fl_app.deploy.operator import LoopbackDeployment, write_node_files
from fl_app.deploy.supernode_entry import HEARTBEAT_ENV
from fl_app.server.run_directory import latest_run
from tests.events import read_events

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[3]
LOCAL = "dataset='local-file' num-classes=10 input-shape='8,8,1' local-epochs=1"
BINARY = "examples.breast_cancer"
"""The user's binary classifier (examples/breast_cancer: a model module and a data module outside fl_app)."""
BINARY_LOCAL = f"dataset='local-file' model='{BINARY}.model:build' num-classes=2 input-shape='30' local-epochs=1"


def _history(output_dir: Path) -> tuple[Path, list[dict]]:
    run_dir = latest_run(output_dir)
    assert run_dir is not None
    return run_dir, json.loads((run_dir / "history.json").read_text())


def _wait_for(predicate, timeout: float, what: str, interval: float = 0.3) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


def test_tls_auth_run_survives_a_killed_node_and_a_corrupt_file(tmp_path):
    files = write_node_files(tmp_path / "data", Settings(num_partitions=3, partitioner="iid"))
    corrupt = tmp_path / "data" / "corrupt.npz"
    np.savez(corrupt, x=np.zeros((20, 64), np.float32), y=np.full(20, 12))  # labels outside [0, 10)
    out = tmp_path / "outputs"

    with LoopbackDeployment(tmp_path / "deploy", ROOT) as deployment:
        # the node cut off is declared offline after 2 x 10 s without a heartbeat, not 2 x 30 s
        deployment.env[HEARTBEAT_ENV] = "10"
        worker = deployment.start_worker("node-2", wait=False)
        # An unregistered key is refused: that SuperNode gives up and exits.
        stranger_key, _ = deployment.node_keys("stranger", register=False)
        stranger = deployment.start_node("stranger", {"data-path": str(files[0])}, private_key=stranger_key)
        assert stranger.wait(timeout=120) != 0
        assert "Failed to activate SuperNode" in deployment.log("stranger")

        deployment.wait_worker("node-2")
        nodes = {}
        for i in range(3):
            key, _ = deployment.node_keys(f"node-{i}")
            nodes[i] = deployment.start_node(
                f"node-{i}",
                {"data-path": str(files[i]), "partition-id": i},
                private_key=key,
                worker=worker if i == 2 else None,
                executor=i != 2,
            )
        key, _ = deployment.node_keys("node-bad")
        deployment.start_node("node-bad", {"data-path": str(corrupt), "partition-id": 3}, private_key=key)
        ids = {name: deployment.node_id(name) for name in ("node-0", "node-1", "node-2", "node-bad")}

        run_id = deployment.submit(
            f"num-server-rounds=2 {LOCAL} min-available-clients=3 min-train-clients=3 "
            # 180 s: on a loaded 2-core machine the Flower-way node (TensorFlow imported per message)
            # and the worker's node once missed a 90 s round 1 while the executors warmed up
            f"min-evaluate-clients=3 min-train-replies=2 round-timeout=180 output-dir='{out}'"
        )
        # Kill node-2 (SIGKILL, no goodbye) once it has received its round-2 train message.
        _wait_for(
            lambda: deployment.log("node-2").count("Receiving: train message") >= 2,
            400,
            "node-2 to receive its round-2 train message",
        )
        stop_process_tree(nodes[2], sig=signal.SIGKILL)
        status = deployment.wait(run_id, timeout=420)
        assert status == "finished:completed", deployment.log("superlink")[-3000:]

    run_dir, history = _history(out)
    assert [r["round"] for r in history] == [1, 2]
    round1, round2 = history
    # Round 1: three nodes trained; the corrupt file is reported by its node, with the reason.
    assert round1["clients_replied"] == 3
    bad = [f for f in round1["failures"] if f.startswith(f"node {ids['node-bad']}:")]
    assert bad and "DataFileError" in bad[0] and "label 12 is outside [0, 10)" in bad[0], round1["failures"]
    # Round 2: node-2 was killed mid-round; the others trained and the round aggregated.
    assert round2["clients_replied"] == 2 and round2["clients_failed"] == 2, round2["failures"]
    killed = [f for f in round2["failures"] if f.startswith(f"node {ids['node-2']}:")]
    assert len(killed) == 1, round2["failures"]  # Node Unavailable, or no reply within round-timeout
    assert not any("round skipped" in f for f in round2["failures"])
    assert round2["train_loss"] is not None and round2["federated_accuracy"] > 0.5
    assert (run_dir / "model.keras").exists() and (run_dir / "checkpoint" / "weights.npz").exists()


def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_run(tmp_path):
    """A user's model (the binary example, each node holding its share of the breast-cancer data as
    its own file): an uninterrupted run, exported to TFLite and checked by the model's own metric on
    the nodes, and a run stopped after round 2 and resumed, which ends with the same weights."""
    files = write_node_files(
        tmp_path / "data", Settings(num_partitions=2, partitioner="iid", dataset=f"{BINARY}.data:load")
    )
    config = (
        f"num-server-rounds=4 {BINARY_LOCAL} strategy='fedadam' server-learning-rate=0.05 "
        "min-available-clients=2 min-train-clients=2 fraction-evaluate=0.01 "
        "min-evaluate-clients=0 round-timeout=120"
    )

    with LoopbackDeployment(tmp_path / "deploy", ROOT) as deployment:
        for i in range(2):
            key, _ = deployment.node_keys(f"node-{i}")
            deployment.start_node(
                f"node-{i}", {"data-path": str(files[i]), "partition-id": i}, private_key=key, executor=True
            )

        whole = tmp_path / "whole"
        export = "export='tflite' export-tflite-types='float32'"
        status = deployment.wait(deployment.submit(f"{config} output-dir='{whole}' {export}"), timeout=500)
        assert status == "finished:completed", deployment.log("superlink")[-3000:]

        # Stop the server process after round 2 of 4, then resume from its run directory.
        parts = tmp_path / "parts"
        run_id = deployment.submit(f"{config} output-dir='{parts}'")

        def completed_round() -> int:
            latest = latest_run(parts)
            state = latest / "checkpoint" / "state.json" if latest is not None else None
            return json.loads(state.read_text())["round"] if state and state.exists() else -1

        _wait_for(lambda: completed_round() >= 2, 400, "round 2 of the interrupted run", interval=0.05)
        # Rounds take seconds: freeze the nodes' executors so that no further round can complete
        # before the stop takes effect, and let them go once the run is over.
        for executor in deployment.executors.values():
            os.kill(executor.pid, signal.SIGSTOP)
        try:
            deployment.stop_run(run_id)
            assert deployment.wait(run_id, timeout=120).startswith("finished:")
        finally:
            for executor in deployment.executors.values():
                os.kill(executor.pid, signal.SIGCONT)
        stopped_dir = latest_run(parts)
        assert stopped_dir is not None
        assert json.loads((stopped_dir / "checkpoint" / "state.json").read_text())["round"] in (2, 3)

        resumed = tmp_path / "resumed"
        status = deployment.wait(
            deployment.submit(f"{config} output-dir='{resumed}' resume-from='{stopped_dir}'"), timeout=400
        )
        assert status == "finished:completed", deployment.log("superlink")[-3000:]

    whole_dir, whole_history = _history(whole)
    resumed_dir, resumed_history = _history(resumed)
    # the user's model trained on the nodes' own files and was exported; the check used its metric
    assert 0.5 < whole_history[-1]["train_accuracy"] <= 1.0 and 0.5 < whole_history[-1]["metrics"]["train_auc"] <= 1.0
    report = json.loads((whole_dir / "export_check.json").read_text())
    final = report["models"]["final"]
    assert report["metric"] == "accuracy" and report["ready"], report["reasons"]  # ready: within export-tolerance
    assert final["tflite"]["float32"]["federated_accuracy"] > 0.5 and final["keras"]["federated_accuracy"] > 0.5
    assert (whole_dir / "export" / "final_float32.tflite").stat().st_size > 0
    # the deployed server's TensorBoard events hold the history under the model's metric names
    scalars, _ = read_events(resumed_dir)
    assert scalars["train/auc"] == pytest.approx(
        {r["round"]: r["metrics"]["train_auc"] for r in resumed_history if "train_auc" in r["metrics"]}, rel=1e-6
    )
    assert [r["round"] for r in resumed_history] == [1, 2, 3, 4]
    with (
        np.load(whole_dir / "checkpoint" / "weights.npz") as a,
        np.load(resumed_dir / "checkpoint" / "weights.npz") as b,
    ):
        assert len(a.files) == len(b.files) == 6
        for name in a.files:
            np.testing.assert_allclose(a[name], b[name], rtol=1e-4, atol=1e-5)
        moved = max(float(np.abs(a[n]).max()) for n in a.files)
        assert moved > 0
    # FedAdam's moments were restored, not restarted: the server state matches too.
    for name in ("strategy.npz",):
        with np.load(whole_dir / "checkpoint" / name) as a, np.load(resumed_dir / "checkpoint" / name) as b:
            assert a.files and sorted(a.files) == sorted(b.files)
            for key in a.files:
                np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-6)
    assert [r["train_loss"] for r in resumed_history] == pytest.approx(
        [r["train_loss"] for r in whole_history], rel=1e-4
    )
