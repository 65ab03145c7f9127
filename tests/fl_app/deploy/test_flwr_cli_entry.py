"""fl-keras-run's ``flwr``: the same FAB from a shorter walk, the status, and no run without a SuperLink."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from flwr.cli.build import build_fab_from_files
from flwr.cli.utils import collect_files, filter_paths_for_publish

from fl_app.deploy import flwr_cli_entry
from fl_app.deploy.flwr_cli_entry import collect_app_files, newest_run_status

ROOT = Path(__file__).resolve().parents[3]


def _app(tmp_path: Path) -> Path:
    app = tmp_path / "app"
    for relative, text in {
        "pyproject.toml": (ROOT / "pyproject.toml").read_text(encoding="utf-8"),
        ".gitignore": ".venv/\noutputs/\n__pycache__/\n*.pyc\n/deploy/\n",
        "fl_app/__init__.py": "",
        "fl_app/a.py": "A = 1\n",
        "fl_app/__pycache__/a.cpython-311.pyc": "x",
        "examples/m/model.py": "M = 2\n",
        "README.md": "# app\n",
        ".venv/lib/site.py": "ignored\n",
        ".venv/lib/deep/er/mod.py": "ignored\n",
        "outputs/run/history.json": "{}",
        "deploy/keys/k.py": "ignored\n",
        "nested/deploy/kept.py": "kept: /deploy/ is anchored\n",
        ".flwr/apps/x/fl_app/a.py": "excluded by Flower\n",
        "notes.txt": "not a FAB type\n",
    }.items():
        path = app / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    (app / "link.py").symlink_to(app / "fl_app" / "a.py")
    return app


def test_the_short_walk_gives_flowers_fab_byte_for_byte(tmp_path):
    app = _app(tmp_path)
    flowers, ours = collect_files(app), collect_app_files(app)
    assert set(ours) < set(flowers)  # it skipped something ...
    assert not any(path.startswith((".venv/", "outputs/", "deploy/", ".flwr/")) for path in ours)
    assert "nested/deploy/kept.py" in ours and "link.py" not in ours
    assert set(filter_paths_for_publish(ours)) == set(filter_paths_for_publish(flowers))  # ... only what Flower drops
    assert build_fab_from_files(ours)[0] == build_fab_from_files(flowers)[0]


def test_the_short_walk_gives_the_same_fab_for_this_repository():
    flowers, ours = collect_files(ROOT), collect_app_files(ROOT)
    assert build_fab_from_files(ours)[0] == build_fab_from_files(flowers)[0]


def test_newest_run_status_reads_flwr_ls_json():
    listing = {"runs": [{"run-id": "9", "status": "running"}, {"run-id": "12", "status": "finished:completed"}]}
    assert newest_run_status(json.dumps(listing)) == "finished:completed"
    assert newest_run_status(json.dumps({"runs": []})) == "unknown (no run listed)"
    assert newest_run_status("Traceback ...").startswith("unknown (Traceback")


def test_nothing_runs_without_a_superlink_answering(monkeypatch):
    called = []
    monkeypatch.setattr(flwr_cli_entry, "run_cli", lambda argv: called.append(argv) or 0)
    from fl_app.deploy.launcher import free_port

    started = time.monotonic()
    code = flwr_cli_entry.main(["--health-port", str(free_port()), "--health-timeout", "0.3", "--", "run", "."])
    assert code == 1 and called == [] and time.monotonic() - started < 10


def test_the_entry_point_runs_as_a_module():
    result = subprocess.run(
        [sys.executable, "-m", "fl_app.deploy.flwr_cli_entry", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 0 and "--health-port" in result.stdout
