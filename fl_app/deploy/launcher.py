"""``fl-keras-run``: run the app in Flower's simulation engine, start to finish, in one command.

``flwr run .`` alone starts a detached local SuperLink that outlives the command, is found again
only by its port, and keeps the environment and working directory of the run that started it
(docs/architecture.md). This launcher makes a run self-contained instead:

1. a private ``FLWR_HOME`` (``<app>/.flwr``) and free loopback ports for the local SuperLink;
2. runtime dependency installation off, so the SuperLink uses this (locked) environment;
3. it starts that SuperLink itself (the same command ``flwr run`` would), keeps its PID,
   runs ``flwr run <app> --stream`` against it, and stops it (by PID, bounded wait) at the end;
4. it exits non-zero when the run's final status is not ``finished:completed``, and with exit
   code 1 when the SuperLink exits, or stops answering for 30 s, during the run: Flower's ``flwr
   run --stream`` would end with exit code 0, or wait, the ServerApp would outlive the SuperLink, and
   ``flwr ls local`` against the dead port would start a new detached SuperLink. The launcher is
   the child subreaper of everything it starts, so processes orphaned by the SuperLink's death
   are adopted by it and stopped with the rest;
5. with the SuperLink it starts the simulation process, warm: it imports Flower's runtime and
   TensorFlow while the SuperLink starts, and the SuperLink's SuperExec hands it the run
   (:mod:`fl_app.deploy.simulation_entry`, :mod:`fl_app.deploy.superexec_entry`); ``--backend``
   (default ``inprocess``: the ClientApps run in that process, no Ray) goes to the federation
   config.

Everything after ``--`` (or any unknown option) is passed to ``flwr run``, e.g.
``fl-keras-run -- -c "strategy='fedprox' proximal-mu=0.1"``.

What it shows: the stream of the run without TensorFlow, Ray, CUDA and Flower start-up noise
(:mod:`fl_app.deploy.output_filter`; ``--verbose`` shows everything), one progress line per round,
and the run's summary once: the ServerApp's, or, when the stream did not show it, the
``summary.json`` this run wrote (never an earlier run's).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from fl_app.deploy.flwr_cli_entry import newest_run_status, superlink_healthy
from fl_app.deploy.output_filter import NoiseFilter, copy_filtered
from fl_app.deploy.simulation_entry import BACKENDS
from fl_app.deploy.startup_timeline import StartupTimeline
from fl_app.deploy.superexec_entry import WARM_SIMULATION_ENV

HEALTH_TIMEOUT_S = 60.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _bin(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def prepare_environment(flwr_home: Path, http_port: int, control_port: int) -> dict[str, str]:
    """Environment for ``flower-superlink`` and ``flwr``: private home, ports, no runtime installs.

    The SuperExec keeps Flower's task poll (``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``, 1 s): it
    launches the simulation process once, and a 0.05 s poll, tried, started it at most 1 s sooner
    but cost the SuperLink and the SuperExec 9 s more CPU in the first minute of the default run
    (16 s against 7 s: 20 looks a second, each about 8 ms of Python on both sides), taken from the
    TensorFlow imports of the simulation process and the actors on 2 cores."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n',
        encoding="utf-8",
    )
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(http_port),
        FLWR_LOCAL_CONTROL_API_PORT=str(control_port),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_DISABLE_UPDATE_CHECK="1",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    )
    return env


@contextmanager
def local_superlink(
    env: dict[str, str], cwd: Path, log_file: Path, started: Callable[[], None] | None = None
) -> Iterator[subprocess.Popen]:
    """Start a simulation SuperLink on the ports in ``env``, call ``started`` (if given) while it
    starts, and yield it once it answers; stop it (by PID) on exit."""
    http_port = int(env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"])
    command = [
        sys.executable,
        "-m",
        "fl_app.deploy.superlink_entry",
        "--insecure",
        "--simulation",
        "--isolation",
        "subprocess",
        "--control-api-address",
        f"127.0.0.1:{env['FLWR_LOCAL_CONTROL_API_PORT']}",
        "--host",
        "127.0.0.1",
        "--port",
        str(http_port),
        "--log-file",
        str(log_file),
    ]
    process = subprocess.Popen(
        command,
        env=env,
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        if started is not None:
            started()
        deadline = time.monotonic() + HEALTH_TIMEOUT_S
        while not superlink_healthy(http_port):
            if process.poll() is not None:
                raise RuntimeError(f"flower-superlink exited with code {process.returncode}; see {log_file}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"flower-superlink not healthy after {HEALTH_TIMEOUT_S:.0f} s; see {log_file}")
            time.sleep(0.2)
        yield process
    finally:
        stop_process_tree(process)


def start_warm_simulation(fifo: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen:
    """The simulation process, started before the SuperLink: it imports Flower's simulation runtime
    and TensorFlow while the SuperLink starts and the run is submitted, then runs the task the
    SuperExec hands it through ``fifo`` (:mod:`fl_app.deploy.simulation_entry`). Stopped with the
    launcher's other descendants."""
    return subprocess.Popen(
        [sys.executable, "-m", "fl_app.deploy.simulation_entry", "--warm", str(fifo)],
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def descendants(pid: int) -> list[int]:
    """PIDs of every live descendant of ``pid``.

    Flower's SuperLink starts its SuperExec in a process group of its own, and that one starts the
    simulation (and Ray), so killing the SuperLink's group alone would leave them running.
    """
    from fl_app.deploy.process_tools import process_tree

    return process_tree(pid)[1:]


def stop_process_tree(process: subprocess.Popen, timeout: float = 15.0, sig: int = signal.SIGTERM) -> None:
    """Stop ``process`` (a session leader), its process group and all its descendants, by PID:
    ``sig`` (default SIGTERM; SIGKILL simulates a crash), then SIGKILL after ``timeout`` seconds.

    The tree is collected before anything is signalled, since orphans are re-parented to init.
    """
    from fl_app.deploy.services import signal_pids, start_ticks

    tree = descendants(process.pid)
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
    signal_pids(tree, sig)
    deadline = time.monotonic() + timeout
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=timeout)
    while any(start_ticks(pid) is not None for pid in tree) and time.monotonic() < deadline:
        time.sleep(0.2)
    tree += [pid for pid in descendants(process.pid) if pid not in tree]
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    signal_pids(tree, signal.SIGKILL)
    if process.poll() is None:
        process.wait(timeout=timeout)


PR_SET_CHILD_SUBREAPER = 36
SUPERLINK_CHECK_INTERVAL_S = 1.0
HEALTH_CHECK_INTERVAL_S = 5.0
LOST_AFTER_S = 30.0


def become_subreaper() -> bool:
    """Make this process the child subreaper of its descendants (Linux ``prctl``): a process
    whose parent dies is re-parented here, not to init, so :func:`descendants` still finds it."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):  # not Linux: orphans go to init, as without the launcher
        return False


def start_streaming(command: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
    """``command`` with its stdout and stderr, in order, on one text pipe (for :func:`run_while_alive`)."""
    return subprocess.Popen(
        command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
    )


def run_while_alive(
    command: list[str],
    env: dict[str, str],
    cwd: Path,
    superlink: subprocess.Popen,
    port: int,
    noise_filter: NoiseFilter | None = None,
    summary_seen: list[str] | None = None,
    observe: Callable[[str], None] | None = None,
    process: subprocess.Popen | None = None,
) -> tuple[int | None, str]:
    """Run ``command`` (``flwr run``) while the SuperLink lives. Returns ``(exit code, "")``, or
    ``(None, why)`` as soon as the SuperLink has exited, or has not answered its health check on
    ``port`` for ``LOST_AFTER_S`` seconds (seen here: after SIGTERM during a run it stopped
    listening but did not exit). ``command`` is then stopped: it would go on waiting.

    Its output (stdout and stderr, in order) is copied to this process's stdout, without the lines
    ``noise_filter`` drops (None: all of it); the summary heading, if shown, goes into ``summary_seen``;
    ``observe`` sees every line as it arrives. ``process``: ``command`` already started with
    :func:`start_streaming` (e.g. while the SuperLink starts)."""
    if process is None:
        process = start_streaming(command, env, cwd)
    assert process.stdout is not None
    copier = threading.Thread(
        target=copy_filtered,
        args=(process.stdout, sys.stdout, noise_filter, summary_seen if summary_seen is not None else [], observe),
        daemon=True,
    )
    copier.start()
    last_answer = next_check = time.monotonic()
    try:
        while True:
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = process.wait(timeout=SUPERLINK_CHECK_INTERVAL_S)
                if superlink.poll() is not None:  # `flwr run` ended because the SuperLink died
                    return None, f"exited with code {superlink.returncode}"
                return code, ""
            if superlink.poll() is not None:
                return None, f"exited with code {superlink.returncode}"
            now = time.monotonic()
            if now >= next_check:
                next_check = now + HEALTH_CHECK_INTERVAL_S
                if superlink_healthy(port, timeout=2.0):
                    last_answer = now
                elif now - last_answer > LOST_AFTER_S:
                    return None, f"stopped answering on 127.0.0.1:{port} {now - last_answer:.0f} s ago"
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        copier.join(timeout=5)  # the rest of its output


def run_status(env: dict[str, str], app: Path, status_file: Path | None = None) -> str:
    """The status of the newest run on the SuperLink, e.g. ``finished:completed``: from
    ``status_file`` when the CLI wrote one (:mod:`fl_app.deploy.flwr_cli_entry`), else ``flwr ls``."""
    if status_file is not None and status_file.is_file():
        return status_file.read_text(encoding="utf-8").strip()
    result = subprocess.run(
        [_bin("flwr"), "ls", "local", "--format", "json"],
        env=env,
        cwd=app,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return newest_run_status(result.stdout or result.stderr)


def default_num_partitions(app: Path) -> int:
    config = tomllib.loads((app / "pyproject.toml").read_text(encoding="utf-8"))
    return int(config["tool"]["flwr"]["app"]["config"]["num-partitions"])


def print_summary(output_dir: Path, since: float) -> None:
    """Print the summary this run wrote: ``<output-dir>/latest``'s, if it was written after the
    wall-clock time ``since`` (the launch), never an earlier run's."""
    from fl_app.server.run_directory import latest_run

    latest = output_dir / "latest"
    run = latest_run(output_dir)
    if run is None or latest.lstat().st_mtime < since:  # the link itself: made when the run started
        print("This run wrote no run directory.")
        return
    summary_file = run / "summary.json"
    if not summary_file.exists() or summary_file.stat().st_mtime < since:
        print(f"This run wrote no summary ({summary_file} is missing).")
        return
    summary = json.loads(summary_file.read_text(encoding="utf-8"))
    print("\n=== Summary " + "=" * 50)
    for key, value in summary.items():
        if key != "settings":
            print(f"{key:<28} {value}")


def _threads(app: Path, cpus_per_client: int) -> str:
    """`` client-threads=N``: TensorFlow threads = the CPUs Ray gives each virtual client (only for
    apps that have the key; a later ``-c client-threads=…`` still wins)."""
    config = tomllib.loads((app / "pyproject.toml").read_text(encoding="utf-8"))
    return f" client-threads={cpus_per_client}" if "client-threads" in config["tool"]["flwr"]["app"]["config"] else ""


EPILOG = """\
passing options to flwr run:
  Everything after `--` goes to `flwr run <app> local --stream` unchanged (as does any option
  fl-keras-run does not know), most often the run config: -c "key=value key=value" (every key:
  docs/run-config.md). Strings are quoted with single quotes inside the double quotes.

examples:
  fl-keras-run
  fl-keras-run --clients 20 -- -c "strategy='fedprox' proximal-mu=0.1 num-server-rounds=20"
  fl-keras-run --verbose --output-dir /tmp/runs -- -c "model='examples.diabetes.model:build'"

It starts a private SuperLink on free loopback ports (FLWR_HOME=<app>/.flwr), stops it and
everything under it by PID at the end, and exits 1 unless the run finished as `completed`.
Each run writes <output-dir>/<timestamp>-<strategy>/; <output-dir>/latest links to the newest.
"""


def build_parser() -> argparse.ArgumentParser:
    """``fl-keras-run``'s options; ``--help`` documents each and ``--``."""
    parser = argparse.ArgumentParser(
        prog="fl-keras-run",
        usage="%(prog)s [options] [-- FLWR_RUN_OPTIONS ...]",
        description="Run the federation in Flower's simulation engine with a private local SuperLink.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--app", type=Path, default=Path.cwd(), help="the Flower app directory (default: the current directory)"
    )
    parser.add_argument(
        "--clients",
        type=int,
        default=None,
        help="simulated SuperNodes, also the run config's num-partitions (default: num-partitions in pyproject.toml)",
    )
    parser.add_argument(
        "--cpus-per-client",
        type=int,
        default=1,
        help="with --backend ray: CPUs Ray reserves for each virtual client, also TensorFlow's threads per client "
        "(client-threads) (default: 1)",
    )
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="inprocess",
        help="where the virtual clients run: 'inprocess' runs them one after another in the simulation "
        "process (no Ray; the fastest start), 'ray' in Flower's Ray actors, --cpus-per-client CPUs each "
        "(GPUs, Ray clusters) (default: inprocess)",
    )
    parser.add_argument(
        "--output-dir", type=Path, default=None, help="where run directories go (default: <app>/outputs)"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="print a timeline at the end: when the SuperLink answered, the run was submitted, the simulation "
        "process, the ServerApp, (with --backend ray) the first Ray actor and its TensorFlow import, and each of "
        "rounds 0, 1 and the last came (fl_app.deploy.startup_timeline)",
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show everything the run prints (by default a filter hides TensorFlow, Ray, CUDA and Flower "
        "start-up and shutdown lines, and Flower's per-phase lines that the progress line repeats)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args, flwr_args = build_parser().parse_known_args(argv)
    # SIGTERM (e.g. a test's timeout) unwinds like Ctrl-C, so the SuperLink's tree is always stopped
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if flwr_args and flwr_args[0] == "--":
        flwr_args = flwr_args[1:]

    app = args.app.resolve()
    clients = args.clients or default_num_partitions(app)
    output_dir = (args.output_dir or app / "outputs").resolve()
    flwr_home = app / ".flwr"
    env = prepare_environment(flwr_home, free_port(), free_port())
    noise_filter = None if args.verbose else NoiseFilter()
    timeline = StartupTimeline() if args.profile else None
    summary_seen: list[str] = []

    port = int(env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"])
    status_file = flwr_home / f"run-status-{os.getpid()}"
    status_file.unlink(missing_ok=True)
    command = [
        sys.executable,
        "-m",
        "fl_app.deploy.flwr_cli_entry",  # `flwr`, started with the SuperLink (its docstring)
        "--health-port",
        str(port),
        "--status-file",
        str(status_file),
        "--",
        "run",
        str(app),
        "local",
        "--stream",
        "--federation-config",
        f"backend='{args.backend}' num-supernodes={clients} client-resources-num-cpus={args.cpus_per_client} "
        "client-resources-num-gpus=0",
        "-c",
        f"output-dir='{output_dir}' num-partitions={clients}"
        + (_threads(app, args.cpus_per_client) if args.backend == "ray" else ""),
        *flwr_args,
    ]
    warm_fifo = flwr_home / f"warm-simulation-{os.getpid()}.fifo"
    warm_fifo.unlink(missing_ok=True)
    os.mkfifo(warm_fifo, 0o600)
    env[WARM_SIMULATION_ENV] = str(warm_fifo)
    started = time.perf_counter()
    launched_at = time.time()  # files this run writes are newer
    # SIGTERM (e.g. a benchmark's timeout) unwinds like Ctrl-C, so the SuperLink is stopped below
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    become_subreaper()
    log_file = flwr_home / "superlink.log"
    cli: list[subprocess.Popen] = []
    try:
        start_warm_simulation(warm_fifo, env, app)
        with local_superlink(
            env, app, log_file, started=lambda: cli.append(start_streaming(command, env, app))
        ) as link:
            superlink = link
            print(f"Local SuperLink started: pid {superlink.pid}, 127.0.0.1:{port}", flush=True)
            if timeline is not None:
                timeline.mark("local SuperLink answering")
            code, lost = run_while_alive(
                command,
                env,
                app,
                superlink,
                port,
                noise_filter,
                summary_seen,
                timeline.observe if timeline else None,
                process=cli[0],
            )
            if timeline is not None:
                timeline.mark("flwr run exited")
            # never `flwr ls local` once the SuperLink is gone: it would start a new, detached one
            status = run_status(env, app, status_file) if code is not None else "unknown"
    finally:
        status_file.unlink(missing_ok=True)
        warm_fifo.unlink(missing_ok=True)
        for process in cli:  # the SuperLink never answered: the CLI is still waiting for it
            if process.poll() is None:
                process.kill()
                process.wait()
        from fl_app.deploy.services import stop_tree

        stop_tree(descendants(os.getpid()))  # orphans of the SuperLink's tree, adopted by this process
    if code is None:
        print(
            f"\nfl-keras-run: the local SuperLink (pid {superlink.pid}) {lost} during the run, after "
            f"{time.perf_counter() - started:.1f} s; the run did not finish. See {log_file}",
            file=sys.stderr,
        )
        return 1
    hidden = f"; {noise_filter.hidden} noise lines hidden (--verbose shows them)" if noise_filter else ""
    print(f"\nflwr run exited with {code}; run status: {status}; {time.perf_counter() - started:.1f} s in all{hidden}")
    if not summary_seen:  # the stream did not show the ServerApp's summary: this run's file, if any
        print_summary(output_dir, launched_at)
    if timeline is not None:
        print(timeline.table(), flush=True)
    if code != 0 or status != "finished:completed":
        print(f"The run did not complete (status {status}); see {flwr_home / 'superlink.log'}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
