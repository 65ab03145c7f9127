"""Flower's ``flwr`` CLI as ``fl-keras-run`` runs it: started with the SuperLink, a shorter app walk,
and the run's status without a second CLI process.

``python -m fl_app.deploy.flwr_cli_entry --health-port PORT [--status-file FILE] -- run APP ...``
does what ``flwr run APP ...`` does, with three differences, each measured on the default run:

1. **It starts with the SuperLink.** The CLI's imports (2-3 s) overlap the SuperLink's start; the
   command itself runs only once ``http://127.0.0.1:PORT/health`` answers (at most
   ``HEALTH_TIMEOUT_S``), because against a ``:local:`` address nobody answers Flower's CLI starts a
   detached SuperLink of its own, which is what ``fl-keras-run`` exists to avoid.
2. **It walks the app without the ignored directories.** Flower's ``collect_files`` lists every
   file under the app, the virtualenv included (48,543 files here: 3.8 s of the FAB build), and
   only then drops what ``.gitignore`` and Flower's publish rules exclude. :func:`collect_app_files`
   does not descend into a directory those rules exclude as a whole (``.venv/``, ``outputs/``,
   ``.flwr/``, ``__pycache__/``), and returns the rest as Flower would: the same FAB, tested.
3. **It writes the run's status.** With ``--status-file``, after the command it asks the
   SuperLink's Control API (``ListRuns``, as ``flwr ls`` does, on the same ``local`` connection) and
   writes the newest run's status as ``flwr ls`` shows it (``finished:completed``) to FILE, where
   the launcher used to start a second ``flwr`` process for it (its imports: 2-3 s at the end of
   every run).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HEALTH_TIMEOUT_S = 120.0


def collect_app_files(root: Path) -> dict[str, Path]:
    """Flower's ``collect_files(root)`` less the directories that ``root/.gitignore`` or Flower's
    publish exclusions drop as a whole (module docstring), which it does not enter.

    Like Flower's: relative POSIX paths to absolute paths, no symlinks, nothing resolving outside
    ``root``.
    """
    from flwr.cli.utils import build_pathspec, load_gitignore_patterns
    from flwr.supercore.constant import APP_PUBLISH_EXCLUDE_PATTERNS

    resolved_root = root.resolve()
    gitignore = root / ".gitignore"
    ignored = build_pathspec(load_gitignore_patterns(gitignore) if gitignore.is_file() else [])
    excluded = build_pathspec(APP_PUBLISH_EXCLUDE_PATTERNS)

    def dropped_whole(relative_dir: str) -> bool:
        probe = f"{relative_dir}/"
        return bool(ignored.match_file(probe) or excluded.match_file(f"{probe}any-file"))

    files: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        relative = Path(dirpath).relative_to(root).as_posix()
        prefix = "" if relative == "." else f"{relative}/"
        dirnames[:] = [name for name in dirnames if not dropped_whole(f"{prefix}{name}")]
        for filename in filenames:
            path = Path(dirpath) / filename
            if path.is_symlink() or not path.resolve().is_relative_to(resolved_root):
                continue
            files[f"{prefix}{filename}"] = path
    return files


def superlink_healthy(port: int, timeout: float = 0.5) -> bool:
    """Whether the local SuperLink on ``port`` answers its health check within ``timeout`` seconds."""
    import httpx

    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=timeout).is_success
    except httpx.HTTPError:
        return False


def wait_healthy(port: int, timeout: float = HEALTH_TIMEOUT_S) -> bool:
    """Whether the SuperLink on ``port`` answered its health check within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not superlink_healthy(port):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def run_cli(argv: list[str]) -> int:
    """Flower's ``flwr`` with ``argv`` in this process; its exit code."""
    from flwr.cli.app import app

    try:
        app(args=argv, prog_name="flwr")
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    return 0


def newest_run_status(ls_json: str) -> str:
    """The status of the newest run in ``flwr ls --format json`` output, e.g. ``finished:completed``;
    ``unknown (...)`` when the output says nothing usable."""
    import json

    try:
        runs = json.loads(ls_json).get("runs", [])
    except (json.JSONDecodeError, AttributeError):
        return f"unknown ({ls_json.strip()[:500]})"
    if not runs:
        return "unknown (no run listed)"

    def run_id(run: dict) -> int:  # `flwr ls --format json` gives run ids as strings
        try:
            return int(run.get("run-id", 0))
        except (TypeError, ValueError):
            return 0

    return str(max(runs, key=run_id).get("status", "unknown"))


def newest_run_status_from_superlink(connection: str = "local") -> str:
    """The newest run's status on the SuperLink of ``connection``, formatted as ``flwr ls`` does
    (``status`` or ``status:sub_status``)."""
    from flwr.cli.flower_config import read_superlink_connection
    from flwr.cli.utils import init_http_client_from_connection
    from flwr.proto.control_pb2 import ListRunsRequest

    client = init_http_client_from_connection(read_superlink_connection(connection))
    try:
        runs = client.ListRuns(ListRunsRequest()).run_dict
    finally:
        client.close()
    if not runs:
        return "unknown (no run listed)"
    status = runs[max(runs)].status
    return f"{status.status}:{status.sub_status}" if status.sub_status else status.status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--health-port", type=int, required=True, help="the local SuperLink's HTTP port")
    parser.add_argument(
        "--health-timeout", type=float, default=HEALTH_TIMEOUT_S, help="seconds to wait for the SuperLink"
    )
    parser.add_argument("--status-file", type=Path, default=None, help="write the newest run's status here")
    parser.add_argument("flwr_args", nargs=argparse.REMAINDER, help="-- then the flwr command and its arguments")
    args = parser.parse_args(argv)
    flwr_args = args.flwr_args[1:] if args.flwr_args[:1] == ["--"] else args.flwr_args

    import flwr.cli.app  # the CLI's imports, while the SuperLink starts
    import flwr.cli.build

    flwr.cli.build.collect_files = collect_app_files
    if not wait_healthy(args.health_port, args.health_timeout):
        print(f"no SuperLink answered on 127.0.0.1:{args.health_port}; not running flwr", file=sys.stderr)
        return 1
    code = run_cli(flwr_args)
    sys.stdout.flush()
    if args.status_file is not None:
        status = "unknown (the SuperLink stopped answering)"
        if superlink_healthy(args.health_port):  # never connect to `local` without one: the CLI would start its own
            status = newest_run_status_from_superlink()
        args.status_file.write_text(status, encoding="utf-8")
    return code


if __name__ == "__main__":
    exit_code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)  # the CLI's interpreter teardown took 0.5 s of the run; nothing is left to do
