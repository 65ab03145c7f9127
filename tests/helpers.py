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
    command = [sys.executable, "-m", "fl_app.launcher", "--app", str(ROOT), *args]
    with subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.terminate()  # the launcher stops its SuperLink tree on SIGTERM
            try:
                stdout, stderr = process.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                stdout, stderr = process.communicate()
            raise AssertionError(f"the launcher ran past {timeout} s:\n{(stdout + stderr)[-4000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def superlink_pid(output: str) -> int:
    match = re.search(r"Local SuperLink started: pid (\d+)", output)
    assert match, "the launcher did not report its SuperLink"
    return int(match.group(1))


def superlink_port(output: str) -> int:
    match = re.search(r"Local SuperLink started: pid \d+, 127\.0\.0\.1:(\d+)", output)
    assert match, "the launcher did not report its SuperLink's port"
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


def processes_using_port(port: int) -> list[str]:
    """Command lines of live processes that name 127.0.0.1:<port> (the SuperLink's SuperExec,
    simulation and ServerApp processes all do)."""
    needle = f"127.0.0.1:{port}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(os.getpid()):
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if needle in cmdline:
                found.append(cmdline.replace(b"\0", b" ").decode(errors="replace"))
    return found


def assert_launcher_cleaned_up(output: str) -> None:
    """The launcher stopped its SuperLink and everything the SuperLink started."""
    assert not process_group_alive(superlink_pid(output)), "the launcher left its SuperLink running"
    leftovers = processes_using_port(superlink_port(output))
    assert not leftovers, f"processes of the run are still alive: {leftovers}"
