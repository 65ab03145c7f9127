"""Helpers for integration tests that start real processes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_launcher(args: list[str], timeout: float = 900) -> subprocess.CompletedProcess:
    """Run ``fl-keras-run`` (through this interpreter) and return the finished process."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-m", "fl_app.launcher", "--app", str(ROOT), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )


def superlink_pid(output: str) -> int:
    match = re.search(r"Local SuperLink started: pid (\d+)", output)
    assert match, "the launcher did not report its SuperLink"
    return int(match.group(1))


def process_group_alive(pgid: int) -> bool:
    """Whether any process is still in the process group ``pgid``."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
