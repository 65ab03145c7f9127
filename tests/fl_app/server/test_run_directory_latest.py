"""``<output-dir>/latest``: a symbolic link to the newest run directory, read by every tool."""

from __future__ import annotations

import os

from fl_app.server.checkpoint import find_checkpoint
from fl_app.server.run_directory import RunDirectory, latest_run


def test_latest_is_a_relative_symlink_to_the_newest_run(tmp_path):
    first = RunDirectory(tmp_path / "out", "fedavg")
    latest = tmp_path / "out" / "latest"
    assert latest.is_symlink() and os.readlink(latest) == first.path.name
    assert latest_run(tmp_path / "out") == first.path
    second = RunDirectory(tmp_path / "out", "fedavg")  # same second: a suffixed directory
    assert second.path != first.path
    assert latest.resolve() == second.path == latest_run(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(["latest", first.path.name, second.path.name])


def test_the_output_directory_can_move(tmp_path):
    run = RunDirectory(tmp_path / "out", "krum")
    (tmp_path / "out").rename(tmp_path / "moved")
    assert latest_run(tmp_path / "moved") == tmp_path / "moved" / run.path.name


def test_an_older_latest_file_is_still_read_and_replaced(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "latest").write_text(str(tmp_path / "elsewhere") + "\n")
    assert latest_run(out) == tmp_path / "elsewhere"
    run = RunDirectory(out, "fedavg")
    assert (out / "latest").is_symlink() and latest_run(out) == run.path
    assert latest_run(tmp_path / "empty") is None


def test_resume_from_an_output_directory_follows_the_link(tmp_path):
    run = RunDirectory(tmp_path / "out", "fedavg")
    checkpoint = run.path / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / "state.json").write_text("{}")
    (checkpoint / "weights.npz").write_bytes(b"")
    assert find_checkpoint(tmp_path / "out") == checkpoint
