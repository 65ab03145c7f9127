"""Helpers for tests that run the whole app: real processes, or the ServerApp in-process."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from fl_app.server.run_directory import latest_run

ROOT = Path(__file__).resolve().parents[1]


def run_launcher(args: list[str], timeout: float = 900, app: Path = ROOT) -> subprocess.CompletedProcess:
    """Run ``fl-keras-run --app app`` (through this interpreter) and return the finished process."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "fl_app.deploy.launcher", "--app", str(app), *args]
    with subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.terminate()  # the launcher stops its SuperLink tree on SIGTERM
            try:
                stdout, stderr = process.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                stdout, stderr = process.communicate()
            raise AssertionError(f"the launcher ran past {timeout} s:\n{(stdout + stderr)[-4000:]}") from None
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


@dataclasses.dataclass(frozen=True)
class FinishedRun:
    """A completed ``fl-keras-run``: its console output, run directory and history.json."""

    output: str
    run_dir: Path
    history: list[dict]


def run_to_completion(out: Path, clients: int, run_config: str) -> FinishedRun:
    """Run the app on ``clients`` simulated clients with ``run_config`` (``flwr run -c`` syntax),
    writing under ``out``; assert that the run completed and left no process behind."""
    proc = run_launcher(["--clients", str(clients), "--output-dir", str(out), "--", "-c", run_config])
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "run status: finished:completed" in output
    assert_launcher_cleaned_up(output)
    run_dir = latest_run(out)
    assert run_dir is not None, output[-4000:]
    return FinishedRun(output, run_dir, json.loads((run_dir / "history.json").read_text()))


def run_server_app_in_process(monkeypatch, run_config: dict, nodes: int, grid_class=None) -> Path:
    """The whole ServerApp (``fl_app.server_app.main``) in-process on a LocalGrid (or
    ``grid_class``, a LocalGrid subclass) of ``nodes`` nodes; returns the run directory.

    LocalGrid answers train and evaluate messages only, so the initial weights come from the
    seeded model built here instead of a query to a node (``run_config`` sets
    ``centralized-evaluation=false`` and ``output-dir``)."""
    from flwr.app import ArrayRecord

    import fl_app.server.initial_weights as initial_weights
    from fl_app import server_app
    from fl_app.config.settings import Settings
    from fl_app.simulation.local_grid import LocalGrid
    from fl_app.task.models import build_model

    monkeypatch.setattr(
        initial_weights,
        "query_initial_arrays",
        lambda grid, settings: ArrayRecord(build_model("mlp", (64,), 10, 42).get_weights()),
    )
    config = Settings.from_run_config(run_config).to_run_config()
    grid = (grid_class or LocalGrid)(config, nodes)
    server_app.main(grid, grid.contexts[1])
    out = Path(str(config["output-dir"]))
    run_dir = latest_run(out)
    assert run_dir is not None
    return run_dir


def load_script(name: str, module_name: str | None = None):
    """``scripts/<name>.py`` imported as module ``module_name`` (default ``name``), registered in
    ``sys.modules`` (dataclasses and pickling look their module up there)."""
    module_name = module_name or name
    spec = importlib.util.spec_from_file_location(module_name, ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module
