"""Integration: docs/deployment.md's "On one machine (loopback)" steps, run verbatim with bash.

They use the document's fixed ports (9092-9096) and write ``deploy/`` and ``outputs/`` in the
repository, so this test runs only when asked for: ``FL_KERAS_DOCS_DEPLOY=1 pytest
tests/fl_app/deploy/test_docs_deploy.py``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from fl_app.server.run_directory import latest_run

opt_in = pytest.mark.skipif(
    os.environ.get("FL_KERAS_DOCS_DEPLOY") != "1",
    reason="set FL_KERAS_DOCS_DEPLOY=1 (uses fixed ports and the repository's deploy/)",
)

ROOT = Path(__file__).resolve().parents[3]


def docs_loopback_block() -> str:
    text = (ROOT / "docs" / "deployment.md").read_text(encoding="utf-8")
    section = text.split("## On one machine (loopback)", 1)[1]
    match = re.search(r"```bash\n(.*?)```", section, re.S)
    assert match, "the loopback section has no bash block"
    return match.group(1)


def test_docs_block_is_complete():
    block = docs_loopback_block()
    for step in (
        "edge.py certs",
        "edge.py superlink",
        "edge.py wait",
        "edge.py register",
        "edge.py supernode",
        "flwr run . edge",
        "edge.py status",
        "edge.py stop",
    ):
        assert step in block


@pytest.mark.integration
@pytest.mark.timeout(1200)
@opt_in
def test_docs_loopback_steps_work_verbatim():
    for port in (9092, 9093, 9094, 9095, 9096):
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                pytest.skip(f"port {port} is in use")
    if (ROOT / "deploy").exists():
        shutil.rmtree(ROOT / "deploy")
    before = latest_run(ROOT / "outputs")
    process = subprocess.Popen(
        ["bash", "-e", "-c", docs_loopback_block()],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=1100)
    finally:
        if process.poll() is None:  # timed out: stop the block and everything it started
            os.killpg(process.pid, signal.SIGKILL)
    # The block's last step stopped every process it started (they share its process group).
    try:
        os.killpg(process.pid, 0)
        leftovers = True
    except ProcessLookupError:
        leftovers = False
    if leftovers:
        os.killpg(process.pid, signal.SIGKILL)
    assert not leftovers, "the document's last step left processes running"
    assert not list((ROOT / "deploy" / "processes").glob("*.json")), "edge.py stop left a service recorded"
    assert process.returncode == 0, output[-5000:]
    assert "Successfully started run" in output and "finished" in output, output[-5000:]
    run_dir = latest_run(ROOT / "outputs")
    assert run_dir is not None and run_dir != before
    assert (run_dir / "summary.json").exists()  # written after the last round
    history = json.loads((run_dir / "history.json").read_text())
    assert [r["round"] for r in history] == [1, 2, 3]
    assert all(r["clients_replied"] == 3 and r["clients_failed"] == 0 for r in history)
    assert history[-1]["federated_accuracy"] > 0.8
