"""Integration: a real Flower simulation through ``flwr run`` (via the launcher)."""

import json
import re

import numpy as np
import pytest

from tests.helpers import assert_launcher_cleaned_up, run_launcher, run_to_completion

pytestmark = pytest.mark.integration


def test_flwr_run_simulation_writes_history_and_model(tmp_path):
    run = run_to_completion(
        tmp_path / "outputs",
        3,
        "num-server-rounds=2 local-epochs=1 min-train-clients=3 min-available-clients=3 "
        "partitioner='iid' strategy='strategies.examples:MinExamplesFedAvg'",
    )
    history = run.history
    assert [r["round"] for r in history] == [0, 1, 2]
    for record in history[1:]:
        assert record["clients_replied"] == 3 and record["clients_failed"] == 0
        assert record["bytes_received"] > 3 * 4 * 10_000  # three MLP replies of ~17k float32 each
        assert 0.0 <= record["centralized_accuracy"] <= 1.0
        assert record["federated_accuracy"] is not None
    assert history[2]["centralized_accuracy"] > history[0]["centralized_accuracy"] + 0.2
    csv_lines = (run.run_dir / "history.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 4 and csv_lines[0].startswith("round,")

    import tensorflow as tf

    model = tf.keras.models.load_model(run.run_dir / "model.keras")
    assert model.output_shape == (None, 10)
    summary = json.loads((run.run_dir / "summary.json").read_text())
    assert summary["rounds"] == 2
    assert np.isclose(summary["final centralized accuracy"], history[-1]["centralized_accuracy"])
    assert (run.run_dir / "metrics.png").stat().st_size > 1000
    # what a person sees (fl-keras-run without --verbose): a progress line per round, the summary
    # once, no start-up noise, and outputs/latest a symlink to this run
    from fl_app.deploy.output_filter import is_noise

    assert re.search(r"\[round 2/2 100%\] ETA 0:00 \| central accuracy 0\.\d{4}", run.output)
    assert run.output.count("=== Summary") == 1 and run.output.count("final centralized accuracy") == 1
    assert [line for line in run.output.splitlines() if is_noise(line)] == []
    assert "noise lines hidden (--verbose shows them)" in run.output
    assert (tmp_path / "outputs" / "latest").is_symlink()
    # the default backend: the clients ran in the simulation process, which had started warm
    assert "Simulation backend: inprocess; warm start" in run.output


def test_the_ray_backend_trains_the_same_model_as_the_in_process_one(tmp_path):
    config = "num-server-rounds=1 local-epochs=1 partitioner='iid' fraction-evaluate=0.01 min-evaluate-clients=0"
    accuracy = {}
    for backend in ("ray", "inprocess"):
        out = tmp_path / backend
        proc = run_launcher(
            ["--backend", backend, "--clients", "2", "--output-dir", str(out), "--verbose", "--", "-c", config]
        )
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, output[-3000:]
        assert f"Simulation backend: {backend}; warm start" in output
        assert_launcher_cleaned_up(output)
        actors = re.search(r"^\S*\((ClientAppActor )?pid=\d+\)", output, flags=re.MULTILINE)
        assert (actors is not None) == (backend == "ray"), backend  # Ray's actors print, prefixed
        history = json.loads(next(out.glob("*/history.json")).read_text())
        accuracy[backend] = history[-1]["centralized_accuracy"]
    assert accuracy["ray"] == pytest.approx(accuracy["inprocess"], abs=1e-6)


def test_bad_run_config_fails_before_training(tmp_path):
    proc = run_launcher(
        [
            "--clients",
            "2",
            "--output-dir",
            str(tmp_path),
            "--",
            "-c",
            "dirichlet-alpha=-1.0",
        ]
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "dirichlet-alpha must be in [0.001, 1000], got -1.0" in output
    assert_launcher_cleaned_up(output)
    assert not (tmp_path / "latest").exists()


def test_a_superlink_that_dies_mid_run_fails_the_launcher_at_once(tmp_path):
    """The launcher's SuperLink alone crashes (SIGKILL) while the run trains: ``fl-keras-run``
    exits 1 at once naming the SuperLink, leaves none of the SuperLink's tree running (its orphans
    are adopted by the launcher and stopped), and starts no new local SuperLink."""
    import os
    import re
    import signal
    import subprocess
    import sys
    import time

    from fl_app.deploy import services
    from fl_app.deploy.process_tools import process_tree
    from tests.helpers import ROOT, processes_using_port

    command = [sys.executable, "-m", "fl_app.deploy.launcher", "--app", str(ROOT), "--clients", "2"]
    command += ["--output-dir", str(tmp_path), "--", "-c", "num-server-rounds=50"]
    launcher = subprocess.Popen(
        command,
        cwd=ROOT,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert launcher.stdout is not None
        match = None
        while match is None:
            line = launcher.stdout.readline()
            assert line, "the launcher ended before starting its SuperLink"
            match = re.search(r"Local SuperLink started: pid (\d+), 127\.0\.0\.1:(\d+)", line)
        superlink, port = int(match.group(1)), int(match.group(2))
        deadline = time.monotonic() + 300
        while not (tmp_path / "latest").exists():  # the ServerApp has started writing its run
            assert time.monotonic() < deadline and launcher.poll() is None, "the run never started"
            time.sleep(0.5)
        tree = {pid: services.start_ticks(pid) for pid in process_tree(superlink)}
        assert len(tree) >= 2, tree  # the SuperLink and its SuperExec
        # the simulation (ServerApp and clients): the warm process the launcher started beside them
        simulation = [pid for pid in process_tree(launcher.pid) if "simulation_entry" in services.command_line(pid)]
        assert len(simulation) == 1, [services.command_line(pid) for pid in process_tree(launcher.pid)]
        tree[simulation[0]] = services.start_ticks(simulation[0])
        killed_at = time.monotonic()
        os.kill(superlink, signal.SIGKILL)
        output, _ = launcher.communicate(timeout=120)
        took = time.monotonic() - killed_at
    finally:
        if launcher.poll() is None:
            launcher.terminate()
            launcher.communicate(timeout=60)
    assert launcher.returncode == 1
    assert f"the local SuperLink (pid {superlink}) exited with code -9 during the run" in output, output[-3000:]
    left = [services.command_line(pid) for pid, ticks in tree.items() if services.start_ticks(pid) == ticks]
    assert not left and not processes_using_port(port), left
    assert took < 90, f"the launcher took {took:.0f} s to notice and clean up"  # 20.8 s measured
