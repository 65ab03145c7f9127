"""A warm ClientApp runtime for a SuperNode: Flower's SuperExec and ``flwr-clientapp`` in one process.

In Flower 1.41 a SuperNode started with ``--isolation subprocess`` starts a ``flower-superexec``
that looks for a task every second and, for **every** message, starts a fresh ``flwr-clientapp``
process: Python, Flower's imports and the app's imports (1.8 s here, far more on a loaded
machine), then the ClientApp, then exit. With ``--isolation process`` the SuperNode leaves that
job to a process the operator runs; this module is that process:

    flower-supernode ... --isolation process --port 9094
    python -m fl_app.deploy.node_executor --runtime-api-address 127.0.0.1:9094

It speaks the SuperNode's Runtime API exactly as those two Flower processes do, with Flower's own
functions (``AcquireTask``; then, with the task's token, ``pull_task_input``, the ClientApp,
``push_message`` and ``push_task_output``, with a task heartbeat meanwhile), but stays alive: this
app's ClientApp is imported once, TensorFlow is imported once and the compiled model and the data
stay in memory between messages, as in simulation. It looks for tasks with short polls that grow
while idle (``POLL_INITIAL_S`` … ``POLL_MAXIMUM_S``).

It runs **only the code installed on the node**: a task whose FAB (the app the operator submitted)
has other ``fl_app`` / ``strategies`` sources than the ones this process imported, another
ClientApp than ``fl_app.client_app:app``, or another version of a Python file of the user's
packages that the run config names (``model='examples.breast_cancer.model:build'``: ``examples/``)
and that this process would import, gets an error reply that says so, and its message fails
as any failing ClientApp's does. The node never executes code that arrives over the network (with
Flower's default SuperExec it does: the ``flwr-clientapp`` process installs and imports the FAB).
Install the submitted version on the node, or run the node with Flower's SuperExec
(``scripts/edge.py supernode --flower-runtime``), to run another app.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib
import io
import re
import signal
import sys
import threading
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from logging import ERROR, INFO
from pathlib import Path

from flwr.app import Context, Error, Message
from flwr.common.constant import ErrorCode, SubStatus
from flwr.common.logger import log

from fl_app.deploy.node_worker import code_digest
from fl_app.server.object_pulls import shorten_object_pulls
from fl_app.server.polling import poll_delays

CLIENT_APP_REF = "fl_app.client_app:app"
CODE_PACKAGES = ("fl_app/", "strategies/")
POLL_INITIAL_S = 0.01
POLL_GROWTH = 1.5
POLL_MAXIMUM_S = 0.5


class ForeignApp(RuntimeError):
    """The task's FAB is not the app installed on this node."""


def fab_code_digest(fab_content: bytes) -> str:
    """SHA-256 over the FAB's ``fl_app`` and ``strategies`` Python sources, computed as
    :func:`fl_app.deploy.node_worker.code_digest` computes it over the imported packages (relative
    path, then bytes, for each ``.py`` file in sorted path order), so the two are equal exactly
    when the sources are."""
    digest = hashlib.sha256()
    with zipfile.ZipFile(io.BytesIO(fab_content)) as fab:
        names = sorted(name for name in fab.namelist() if name.endswith(".py") and name.startswith(CODE_PACKAGES))
        for name in names:
            digest.update(name.encode())
            digest.update(fab.read(name))
    return digest.hexdigest()


def fab_client_app(fab_content: bytes) -> str | None:
    """The ``clientapp`` component of the FAB's ``pyproject.toml`` (None when it has none)."""
    from flwr.common.config import get_fab_config

    config = get_fab_config(fab_content)
    return config.get("tool", {}).get("flwr", {}).get("app", {}).get("components", {}).get("clientapp")


class FabCheck:
    """Remembers, per FAB hash and set of user packages, whether that FAB's code is this process's
    (computed once)."""

    def __init__(
        self, installed_digest: Callable[[], str] = code_digest, search_path: Sequence[str] | None = None
    ) -> None:
        self._installed_digest = installed_digest
        self._search_path = search_path
        self._verdicts: dict[tuple[str, frozenset[str]], str | None] = {}

    def problem(self, fab_hash: str, fab_content: bytes, run_config: Mapping[str, object] | None = None) -> str | None:
        """None when the FAB runs this node's code; otherwise what differs. ``run_config`` (the
        task's) names the user's packages to compare too (:func:`user_packages`)."""
        packages = user_packages(run_config or {})
        key = (fab_hash, packages)
        if key not in self._verdicts:
            self._verdicts[key] = self._compare(fab_content, packages)
        return self._verdicts[key]

    def _compare(self, fab_content: bytes, packages: frozenset[str]) -> str | None:
        client_app = fab_client_app(fab_content)
        if client_app != CLIENT_APP_REF:
            return f"its ClientApp is {client_app!r}, this node runs {CLIENT_APP_REF!r}"
        if fab_code_digest(fab_content) != self._installed_digest():
            return "its fl_app / strategies sources differ from the ones installed on this node"
        return self._user_code_problem(fab_content, packages)

    def _user_code_problem(self, fab_content: bytes, packages: frozenset[str]) -> str | None:
        """The FAB's Python files in the user's ``packages`` (e.g. ``examples`` for
        ``model='examples.breast_cancer.model:build'``): each that this process would import, i.e.
        found at the same relative path under an entry of its import path, must have the same
        bytes. A file the node cannot import is left alone: the ClientApp cannot run it (a run
        that needs it fails with ImportError)."""
        search_path = sys.path if self._search_path is None else self._search_path
        with zipfile.ZipFile(io.BytesIO(fab_content)) as fab:
            for name in sorted(fab.namelist()):
                if not name.endswith(".py") or name.split("/")[0].removesuffix(".py") not in packages:
                    continue
                node_copy = _importable_copy(name, search_path)
                if node_copy is not None and node_copy.read_bytes() != fab.read(name):
                    return f"its {name} differs from this node's {node_copy}"
        return None


USER_REFERENCE = re.compile(r"^([A-Za-z_]\w*)(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")


def user_packages(run_config: Mapping[str, object]) -> frozenset[str]:
    """Top-level packages of the user code a run config names as ``package.module:attribute``
    (the ``model``, ``dataset`` and ``callbacks`` keys, a user's strategy or rule), other than
    this app's own ``fl_app`` and ``strategies``."""
    named = (USER_REFERENCE.match(value) for value in run_config.values() if isinstance(value, str))
    return frozenset(match.group(1) for match in named if match) - {"fl_app", "strategies"}


def _importable_copy(relative: str, search_path: Sequence[str]) -> Path | None:
    """The first file ``relative`` under an entry of ``search_path`` ("" is the working
    directory), as the import system would find a module at that path (None: nowhere)."""
    for entry in search_path:
        candidate = Path(entry or ".") / relative
        if candidate.is_file():
            return candidate
    return None


class WarmExecutor:
    """Acquires the SuperNode's ClientApp tasks and runs each in this process (module docstring)."""

    def __init__(
        self,
        runtime_api_address: str,
        *,
        root_certificates: bytes | None = None,
        client_app: Callable[..., Message] | None = None,
        fab_check: FabCheck | None = None,
    ) -> None:
        self.address = runtime_api_address
        self.root_certificates = root_certificates
        self._client_app = client_app
        self.fab_check = fab_check or FabCheck()
        self.tasks_run = 0

    @functools.cached_property
    def client_app(self) -> Callable[..., Message]:
        if self._client_app is None:
            module, attribute = CLIENT_APP_REF.split(":")
            self._client_app = getattr(importlib.import_module(module), attribute)
        return self._client_app

    def _client(self, interceptors: list):
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient

        return RuntimeHttpClient.from_server_address(
            server_address=self.address,
            insecure=self.root_certificates is None,
            root_certificates=self.root_certificates,
            interceptors=interceptors,
            retry_invoker=make_simple_http_retry_invoker(),
        )

    def serve(self, stop: threading.Event) -> None:
        """Acquire and run ClientApp tasks until ``stop`` is set."""
        from flwr.proto.runtime_pb2 import AcquireTaskRequest
        from flwr.supercore.constant import TaskType
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor

        client = self._client([RuntimeVersionHttpInterceptor(component_name="SuperExec")])
        request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value], agentapp_fab_hashes=[])
        try:
            while not stop.is_set():
                for delay in poll_delays(POLL_INITIAL_S, POLL_GROWTH, POLL_MAXIMUM_S):
                    response = client.AcquireTask(request)
                    if response.HasField("task") and response.token:
                        self.run_task(response.token)
                        break
                    if stop.wait(delay):
                        return
        finally:
            client.close()

    def run_task(self, token: str) -> None:
        """Run one ClientApp task, as ``flwr-clientapp --token TOKEN`` would, in this process."""
        from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
        from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
        from flwr.supercore.runtime.tracing import RuntimeTracingInterceptor
        from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

        client = self._client(
            [
                RuntimeTracingInterceptor(),
                RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                RuntimeTokenHttpInterceptor(token),
            ]
        )
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        message: Message | None = None
        context: Context | None = None
        reply: Message | None = None
        sub_status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
        started = time.perf_counter()
        marks: list[tuple[str, float]] = []
        try:
            heartbeat.start()
            message, context, _run, fab = pull_task_input(client)
            marks.append(("pull", time.perf_counter()))
            problem = self.fab_check.problem(fab.hash_str, fab.content, context.run_config)
            marks.append(("check", time.perf_counter()))
            if problem is not None:
                raise ForeignApp(
                    f"this node runs only the app installed on it: the submitted app (FAB {fab.hash_str[:12]}) "
                    f"is refused because {problem}. Install that version on the node, or run the node with "
                    "Flower's SuperExec (scripts/edge.py supernode --flower-runtime)"
                )
            reply = self.client_app(message=message, context=context)
            marks.append(("app", time.perf_counter()))
            sub_status, details = SubStatus.COMPLETED, ""
        except Exception as ex:  # every failure becomes the message's error reply, as in flwr-clientapp
            code = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
            reason = f"{type(ex)}:<'{ex}'>"
            log(ERROR, "ClientApp raised an exception", exc_info=ex)
            details = reason
            if message is not None:
                reply = Message(Error(code=code, reason=reason), reply_to=message)
        finally:
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
                    marks.append(("push reply", time.perf_counter()))
            except Exception as ex:  # logged; the task output still reports the status
                log(ERROR, "Failed to push reply message", exc_info=ex)
            push_task_output(client, context, sub_status, details)
            marks.append(("push output", time.perf_counter()))
            if heartbeat.is_running:
                heartbeat.stop()
            client.close()
            marks.append(("close", time.perf_counter()))
        self.tasks_run += 1
        log(
            INFO,
            "[warm executor] task %d done in %.3f s (%s): %s",
            self.tasks_run,
            time.perf_counter() - started,
            sub_status,
            phase_seconds(started, marks),
        )


def phase_seconds(started: float, marks: Sequence[tuple[str, float]]) -> str:
    """``"pull 0.012 s, app 0.300 s, ..."``: each phase's duration from its predecessor's mark."""
    parts, previous = [], started
    for name, at in marks:
        parts.append(f"{name} {at - previous:.3f} s")
        previous = at
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API, e.g. 127.0.0.1:9094")
    parser.add_argument(
        "--root-certificates", default=None, help="CA of a TLS Runtime API (default: plain HTTP on loopback)"
    )
    parser.add_argument("--no-warm-up", action="store_true", help="do not import TensorFlow before the first task")
    args = parser.parse_args(argv)
    certificates = Path(args.root_certificates).read_bytes() if args.root_certificates else None
    executor = WarmExecutor(args.runtime_api_address, root_certificates=certificates)
    stop = threading.Event()

    def request_stop(_signum, _frame) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    code_digest()  # read the installed sources before any task, as the worker does
    shorten_object_pulls()  # the message's objects follow it: retry them within milliseconds
    if not args.no_warm_up:
        started = time.perf_counter()
        _ = executor.client_app
        import tensorflow  # noqa: F401 - the first message then pays no import

        log(INFO, "[warm executor] ClientApp and TensorFlow imported in %.1f s", time.perf_counter() - started)
    log(INFO, "[warm executor] serving ClientApp tasks of the SuperNode at %s", args.runtime_api_address)
    executor.serve(stop)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
