"""A warm Keras worker per SuperNode: TensorFlow imported once, not once per message.

In deployment a SuperNode starts a fresh ``flwr-clientapp`` process for every message, so a
ClientApp that trains with TensorFlow pays the TensorFlow import (8-15 s here) and a model build
for every train and every evaluate message. Simulation pays it once per worker (docs/architecture.md).

This module gives deployment the simulation's cost model. ``python -m fl_app.deploy.node_worker --socket
PATH`` runs next to the SuperNode on the same machine and keeps TensorFlow, the data and the
compiled model in memory. The ClientApp carries :func:`keras_worker_mod`: when the SuperNode's
node config names the worker (``keras-worker='PATH'``), the mod forwards the message and the
context over a Unix socket, the worker runs the very same ClientApp (with every other mod and
handler) on them, and the mod returns the worker's reply. The per-message process then never
imports TensorFlow.

Safety:
* the socket and its key file (``PATH.key``, 32 random bytes) are readable by the node's user
  only; every connection is authenticated with that key (HMAC challenge of
  :mod:`multiprocessing.connection`) before anything is unpickled;
* the worker runs the app code installed on the node. The mod sends a digest of its own
  ``fl_app`` and ``strategies`` sources (those of the submitted app); if the worker's code
  differs, or the worker does not answer, the message runs in-process as without a worker;
* an exception in the worker (e.g. a bad data file) comes back and is raised in the ClientApp,
  so Flower turns it into the same error reply as without a worker.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import secrets
import signal
import sys
import time
from collections.abc import Callable
from logging import INFO, WARNING
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Listener
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.common.logger import log

NODE_CONFIG_KEY = "keras-worker"
CONNECT_TIMEOUT_S = 5.0


@functools.cache
def code_digest() -> str:
    """SHA-256 over the ``fl_app`` and ``strategies`` sources this process imported."""
    import fl_app
    import strategies

    digest = hashlib.sha256()
    for package in (fl_app, strategies):
        root = Path(str(package.__file__)).parent
        for path in sorted(root.rglob("*.py")):
            digest.update(str(path.relative_to(root.parent)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def key_path(socket_path: str | Path) -> Path:
    return Path(f"{socket_path}.key")


class WorkerUnavailable(RuntimeError):
    """The worker is not running, not reachable, or runs different app code."""


def forward(socket_path: str, message: Message, context: Context, timeout: float | None = None) -> Message:
    """Run ``message`` in the worker at ``socket_path``; return its reply (and update
    ``context.state`` in place). Raises :class:`WorkerUnavailable`, or the handler's exception."""
    from flwr.supercore.task_identity import TaskIdentity

    try:
        authkey = key_path(socket_path).read_bytes()
    except OSError as err:
        raise WorkerUnavailable(f"no worker key at {key_path(socket_path)}: {err}") from err
    deadline = time.monotonic() + (CONNECT_TIMEOUT_S if timeout is None else timeout)
    while True:
        try:
            connection = Client(socket_path, family="AF_UNIX", authkey=authkey)
            break
        except (OSError, EOFError) as err:
            if time.monotonic() > deadline:
                raise WorkerUnavailable(f"worker at {socket_path} does not answer: {err}") from err
            time.sleep(0.2)
    with connection:
        connection.send(
            {"digest": code_digest(), "message": message, "context": context, "task_id": TaskIdentity.task_id}
        )
        answer = connection.recv()
    if answer["status"] == "code-mismatch":
        raise WorkerUnavailable(answer["detail"])
    if answer["status"] == "error":
        raise answer["exception"]
    context.state = answer["context"].state
    return answer["reply"]


def keras_worker_mod(message: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """ClientApp mod: hand the message to the node's warm worker when the node config names one."""
    socket_path = context.node_config.get(NODE_CONFIG_KEY)
    if not socket_path:
        return call_next(message, context)
    try:
        return forward(str(socket_path), message, context)
    except WorkerUnavailable as err:
        log(WARNING, "Keras worker unavailable (%s); running this message in-process", err)
        return call_next(message, context)


def handle(request: dict[str, Any], app) -> dict[str, Any]:
    """Run one forwarded message through ``app`` (the worker's ClientApp)."""
    from flwr.supercore.task_identity import TaskIdentity

    if request.get("digest") != code_digest():
        return {
            "status": "code-mismatch",
            "detail": "the worker runs different fl_app/strategies code than the submitted app "
            "(restart it from the app's version)",
        }
    message: Message = request["message"]
    context: Context = request["context"]
    context.node_config = {k: v for k, v in context.node_config.items() if k != NODE_CONFIG_KEY}
    task_id: Any = request.get("task_id")  # None when the ClientApp process had none set
    TaskIdentity.task_id = task_id
    TaskIdentity.run_id = message.metadata.run_id
    TaskIdentity.node_id = context.node_id
    try:
        reply = app(message=message, context=context)
    except Exception as err:  # goes back to the ClientApp, which raises it there
        log(WARNING, "Message %s failed in the worker: %r", message.metadata.message_type, err)
        return {"status": "error", "exception": _portable(err)}
    return {"status": "ok", "reply": reply, "context": context}


def _portable(err: Exception) -> Exception:
    import pickle

    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:  # an exception class that does not survive pickling
        return RuntimeError(f"{type(err).__name__}: {err}")


def serve(socket_path: str | Path, app_ref: str = "fl_app.client_app:app", *, warm_up: bool = True) -> None:
    """Listen on ``socket_path`` and run forwarded messages one at a time, until SIGTERM/SIGINT."""
    import importlib
    import threading

    socket_path = Path(socket_path)
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    if socket_path.exists():
        socket_path.unlink()
    key = key_path(socket_path)
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as key_file:
        key_file.write(secrets.token_bytes(32))
    module_name, _, attr = app_ref.partition(":")
    app = getattr(importlib.import_module(module_name), attr)
    old_umask = os.umask(0o177)
    try:
        listener = Listener(str(socket_path), family="AF_UNIX", authkey=key.read_bytes())
    finally:
        os.umask(old_umask)

    def stop(signum, _frame):
        raise SystemExit(128 + signum)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)
    if warm_up:
        _warm_up()
    log(INFO, "Keras worker ready on %s (code %s)", socket_path, code_digest()[:12])
    try:
        while True:
            try:
                connection = listener.accept()
            except (AuthenticationError, OSError, EOFError) as err:  # wrong key, or a vanished client
                log(WARNING, "Refused a connection: %r", err)
                continue
            with connection:
                try:
                    connection.send(handle(connection.recv(), app))
                except (OSError, EOFError) as err:
                    log(WARNING, "Lost the ClientApp during a message: %r", err)
    finally:
        listener.close()
        for path in (socket_path, key):
            path.unlink(missing_ok=True)


def _warm_up() -> None:
    """Import TensorFlow before the first message arrives (it is what makes messages slow)."""
    import tensorflow  # noqa: F401

    import fl_app  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fl_app.deploy.node_worker",
        description="Warm Keras worker for one SuperNode (start the SuperNode with "
        "--node-config \"keras-worker='SOCKET'\").",
    )
    parser.add_argument("--socket", required=True, help="Unix socket path (its key goes to SOCKET.key)")
    parser.add_argument("--app", default="fl_app.client_app:app", help="the ClientApp to run")
    args = parser.parse_args(argv)
    serve(args.socket, args.app)
    return 0


if __name__ == "__main__":
    sys.exit(main())
