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

Safety (another local user must not be able to stand in for the worker or for the ClientApp):
* the socket and its key file (``PATH.key``, 32 random bytes) live in a directory that belongs to
  the node's user and that nobody else may enter (mode 0700): by default
  ``$XDG_RUNTIME_DIR/fl-keras`` when that runtime directory is the user's own and private, else
  ``<system temp dir>/fl-keras-<uid>`` (:func:`default_socket_path`). The worker creates the
  directory 0700, or refuses to start when it exists with another owner, a looser mode, or as a
  symlink; it creates the key with ``O_EXCL`` and mode 0600, and refuses to start when another
  worker already answers on its socket;
* the ClientApp refuses a socket whose directory, or a key file, is not the user's own and private
  (:class:`UnsafeWorkerPath`: the message fails with that error, naming the path and the problem),
  so it never reads a key, or a reply, that someone else planted;
* every connection is authenticated both ways with that key (HMAC challenge of
  :mod:`multiprocessing.connection`) before anything is read, and nothing that crosses the socket
  is unpickled: messages and contexts travel as Flower's own protobuf serialisation
  (:mod:`flwr.common.serde`) and the rest as JSON;
* the worker runs the app code installed on the node. The mod sends a digest of its own
  ``fl_app`` and ``strategies`` sources (those of the submitted app); if the worker's code
  differs, or the worker does not answer, the message runs in-process as without a worker;
* an exception in the worker (e.g. a bad data file) comes back as its class name and text and is
  raised in the ClientApp under the same name, so Flower's error reply reads as without a worker.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import re
import secrets
import select
import signal
import socket
import stat
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from logging import INFO, WARNING
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.common import serde
from flwr.common.logger import log
from flwr.proto.message_pb2 import Context as ProtoContext
from flwr.proto.message_pb2 import Message as ProtoMessage
from google.protobuf.message import DecodeError

NODE_CONFIG_KEY = "keras-worker"
CONNECT_TIMEOUT_S = 5.0
HEADER_MAX_BYTES = 1 << 16
OWNED = b"owned\n"


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


class UnsafeWorkerPath(RuntimeError):
    """The worker's socket directory or key file is not the node user's own and private, or the
    socket is taken: using it could hand the message to, or take a reply from, someone else."""


# --------------------------------------------------------------------------- private paths


def _is_private_directory(path: Path) -> bool:
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and not info.st_mode & 0o077


def worker_directory() -> Path:
    """Where this user's worker sockets live: ``$XDG_RUNTIME_DIR/fl-keras`` when the runtime
    directory is this user's own with mode 0700 (as systemd makes it), else
    ``<system temp dir>/fl-keras-<uid>``. :func:`claim_directory` creates and checks it."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and _is_private_directory(Path(runtime)):
        return Path(runtime) / "fl-keras"
    return Path(tempfile.gettempdir()) / f"fl-keras-{os.getuid()}"


def default_socket_path(runtime_port: int) -> Path:
    """The worker socket of the SuperNode whose Runtime API listens on ``runtime_port``."""
    return worker_directory() / f"worker-{runtime_port}.sock"


def check_private(path: Path, info: os.stat_result, *, directory: bool) -> None:
    """Raise :class:`UnsafeWorkerPath` unless ``info`` (an ``lstat`` of ``path``) shows a
    directory (or a regular file) owned by this user that no one else may access."""
    uid = os.getuid()
    kind, mode = ("directory", "0700") if directory else ("key file", "0600")
    problems = []
    if stat.S_ISLNK(info.st_mode):
        problems.append("is a symlink")
    elif directory and not stat.S_ISDIR(info.st_mode):
        problems.append("is not a directory")
    elif not directory and not stat.S_ISREG(info.st_mode):
        problems.append("is not a regular file")
    if info.st_uid != uid:
        problems.append(f"belongs to uid {info.st_uid}, not to this user (uid {uid})")
    if info.st_mode & 0o077:
        problems.append(f"has mode {stat.S_IMODE(info.st_mode):04o}, open to group or others")
    if problems:
        raise UnsafeWorkerPath(
            f"worker {kind} {path} {' and '.join(problems)}: it must be this user's own {kind} "
            f"with mode {mode}. Someone else may have planted it; remove it (or choose another "
            "--worker-socket) and restart the SuperNode"
        )


def claim_directory(directory: Path) -> None:
    """Create ``directory`` with mode 0700, or accept it only if it already is this user's own
    private directory (a symlink, another owner or a looser mode raise :class:`UnsafeWorkerPath`)."""
    try:
        directory.mkdir(mode=0o700)
    except FileExistsError:
        pass
    except OSError as err:
        raise UnsafeWorkerPath(f"cannot create the worker directory {directory}: {err}") from err
    check_private(directory, os.lstat(directory), directory=True)


def _answers(socket_path: Path) -> bool:
    """Whether something accepts connections on ``socket_path`` (a live worker)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(socket_path))
        except OSError:
            return False
    return True


def claim_socket(socket_path: Path) -> tuple[Listener, bytes]:
    """Own ``socket_path``: its private directory, a new 0600 key (``O_EXCL``) and the listening
    socket. Raises :class:`UnsafeWorkerPath` when the worker cannot own them."""
    claim_directory(socket_path.parent)
    if _answers(socket_path):
        raise UnsafeWorkerPath(
            f"another worker already serves {socket_path}: stop it, or give this SuperNode another "
            "runtime port or --worker-socket"
        )
    key = key_path(socket_path)
    # Leftovers of a worker that did not clean up: only this user can create files in the directory.
    socket_path.unlink(missing_ok=True)
    key.unlink(missing_ok=True)
    authkey = secrets.token_bytes(32)
    try:
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except OSError as err:
        raise UnsafeWorkerPath(f"cannot create the worker key {key} exclusively: {err}") from err
    with os.fdopen(fd, "wb") as key_file:
        os.fchmod(key_file.fileno(), 0o600)
        key_file.write(authkey)
    old_umask = os.umask(0o177)
    try:
        listener = Listener(str(socket_path), family="AF_UNIX", authkey=authkey)
    except OSError as err:
        key.unlink(missing_ok=True)
        raise UnsafeWorkerPath(f"cannot listen on {socket_path}: {err}") from err
    finally:
        os.umask(old_umask)
    return listener, authkey


def read_key(socket_path: Path) -> bytes:
    """The worker's key, read only after its directory and the open key file are checked to be
    this user's own and private. Raises :class:`WorkerUnavailable` when there is no key (no
    worker), :class:`UnsafeWorkerPath` when the directory or the key is not safe to trust."""
    key = key_path(socket_path)
    try:
        check_private(socket_path.parent, os.lstat(socket_path.parent), directory=True)
        fd = os.open(key, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError as err:
        raise WorkerUnavailable(f"no worker key at {key}: {err}") from err
    except OSError as err:  # ELOOP: the key is a symlink
        raise UnsafeWorkerPath(f"worker key file {key} cannot be opened safely ({err}): remove it") from err
    with os.fdopen(fd, "rb") as key_file:
        check_private(key, os.fstat(key_file.fileno()), directory=False)
        return key_file.read()


# --------------------------------------------------------------------------- the wire format


def _send(connection: Connection, header: dict[str, Any], message: Message | None, context: Context | None) -> None:
    """One JSON header, then (when given) the message and the context as Flower protobufs."""
    connection.send_bytes(json.dumps(header).encode())
    if message is not None and context is not None:
        connection.send_bytes(serde.message_to_proto(message).SerializeToString())
        connection.send_bytes(serde.context_to_proto(context).SerializeToString())


def _receive_header(connection: Connection) -> dict[str, Any]:
    header = json.loads(connection.recv_bytes(HEADER_MAX_BYTES))
    if not isinstance(header, dict):
        raise ValueError("the worker protocol's header is not a JSON object")
    return header


def _receive_records(connection: Connection) -> tuple[Message, Context]:
    message = serde.message_from_proto(ProtoMessage.FromString(connection.recv_bytes()))
    context = serde.context_from_proto(ProtoContext.FromString(connection.recv_bytes()))
    return message, context


@dataclass(frozen=True)
class Request:
    """A message forwarded by the ClientApp, with its context and the identity of its code."""

    digest: str
    task_id: int | None
    message: Message
    context: Context


@dataclass(frozen=True)
class Answer:
    """The worker's answer: ``ok`` (reply and the context after it), ``error`` (the handler's
    exception as module, class name and text) or ``code-mismatch``."""

    status: str
    detail: str = ""
    error_module: str = ""
    error_name: str = ""
    reply: Message | None = None
    context: Context | None = None


_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def remote_exception(module: str, name: str, text: str) -> Exception:
    """The worker's exception, to raise in the ClientApp: a new exception class with the original
    module and name (so Flower's error reply, ``<class 'module.Name'>:<'text'>``, reads as without
    a worker). Nothing is imported or unpickled from the answer."""
    if not (_DOTTED.fullmatch(module) and _DOTTED.fullmatch(name)):
        module, name = __name__, "WorkerError"
    cls = type(name.rpartition(".")[2], (Exception,), {"__module__": module, "__qualname__": name})
    return cls(text)


def forward(socket_path: str, message: Message, context: Context, timeout: float | None = None) -> Message:
    """Run ``message`` in the worker at ``socket_path``; return its reply (and update
    ``context.state`` in place). Raises :class:`WorkerUnavailable`, :class:`UnsafeWorkerPath`,
    or the handler's exception."""
    from flwr.supercore.task_identity import TaskIdentity

    path = Path(socket_path)
    authkey = read_key(path)
    deadline = time.monotonic() + (CONNECT_TIMEOUT_S if timeout is None else timeout)
    while True:
        try:
            connection = Client(str(path), family="AF_UNIX", authkey=authkey)
            break
        except (OSError, EOFError) as err:
            if time.monotonic() > deadline:
                raise WorkerUnavailable(f"worker at {socket_path} does not answer: {err}") from err
            time.sleep(0.2)
    with connection:
        _send(connection, {"digest": code_digest(), "task_id": TaskIdentity.task_id}, message, context)
        header = _receive_header(connection)
        if header.get("status") == "code-mismatch":
            raise WorkerUnavailable(str(header.get("detail")))
        if header.get("status") == "error":
            raise remote_exception(str(header.get("module")), str(header.get("name")), str(header.get("detail")))
        if header.get("status") != "ok":
            raise WorkerUnavailable(f"worker at {socket_path} answered an unknown status {header.get('status')!r}")
        reply, worker_context = _receive_records(connection)
    context.state = worker_context.state
    return reply


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


def handle(request: Request, app: Callable[..., Message]) -> Answer:
    """Run one forwarded message through ``app`` (the worker's ClientApp)."""
    from flwr.supercore.task_identity import TaskIdentity

    if request.digest != code_digest():
        return Answer(
            "code-mismatch",
            "the worker runs different fl_app/strategies code than the submitted app "
            "(restart it from the app's version)",
        )
    message, context = request.message, request.context
    context.node_config = {k: v for k, v in context.node_config.items() if k != NODE_CONFIG_KEY}
    TaskIdentity.task_id = request.task_id  # type: ignore[assignment]  # None when the ClientApp had none
    TaskIdentity.run_id = message.metadata.run_id
    TaskIdentity.node_id = context.node_id
    try:
        reply = app(message=message, context=context)
    except Exception as err:  # goes back to the ClientApp, which raises it there
        log(WARNING, "Message %s failed in the worker: %r", message.metadata.message_type, err)
        return Answer("error", str(err), type(err).__module__, type(err).__qualname__)
    return Answer("ok", reply=reply, context=context)


def _serve_one(connection: Connection, app: Callable[..., Message]) -> None:
    header = _receive_header(connection)
    message, context = _receive_records(connection)
    task_id = header.get("task_id")
    request = Request(str(header.get("digest")), task_id if isinstance(task_id, int) else None, message, context)
    answer = handle(request, app)
    _send(
        connection,
        {"status": answer.status, "detail": answer.detail, "module": answer.error_module, "name": answer.error_name},
        answer.reply,
        answer.context,
    )


def serve(
    socket_path: str | Path,
    app_ref: str = "fl_app.client_app:app",
    *,
    warm_up: bool = True,
    on_owned: Callable[[], None] | None = None,
) -> None:
    """Own ``socket_path`` (:func:`claim_socket`; ``on_owned`` is called once it is), then run
    forwarded messages one at a time, until SIGTERM/SIGINT. Raises :class:`UnsafeWorkerPath` when
    the socket cannot be owned."""
    import importlib
    import threading

    def stop(signum, _frame):
        raise SystemExit(128 + signum)

    if threading.current_thread() is threading.main_thread():  # set before the socket exists: always removed
        signal.signal(signal.SIGTERM, stop)
    socket_path = Path(socket_path)
    listener, _ = claim_socket(socket_path)
    try:
        if on_owned is not None:
            on_owned()
        module_name, _, attr = app_ref.partition(":")
        app = getattr(importlib.import_module(module_name), attr)
        if warm_up:
            _warm_up()
        log(INFO, "Keras worker ready on %s (code %s)", socket_path, code_digest()[:12])
        while True:
            try:
                connection = listener.accept()
            except (AuthenticationError, OSError, EOFError) as err:  # wrong key, or a vanished client
                log(WARNING, "Refused a connection: %r", err)
                continue
            with connection:
                try:
                    _serve_one(connection, app)
                except (OSError, EOFError) as err:
                    log(WARNING, "Lost the ClientApp during a message: %r", err)
                except (ValueError, DecodeError) as err:  # a header or a record that does not parse
                    log(WARNING, "Refused a malformed request: %r", err)
    finally:
        if threading.current_thread() is threading.main_thread():
            # a second SIGTERM (a stop signals the whole process tree) must not cut the clean-up short:
            # it once left the key behind after the socket was gone
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        listener.close()
        for path in (key_path(socket_path), socket_path):
            path.unlink(missing_ok=True)


def _warm_up() -> None:
    """Import TensorFlow before the first message arrives (it is what makes messages slow)."""
    import tensorflow  # noqa: F401

    import fl_app  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)


def wait_until_owned(read_fd: int, timeout: float) -> bool:
    """Whether the worker started with ``--owned-fd`` (the write end of the pipe whose read end is
    ``read_fd``) reports that it owns its socket within ``timeout`` seconds. ``False`` when it exits
    (or closes the pipe) without owning it, or takes longer. Closes ``read_fd``."""
    try:
        ready, _, _ = select.select([read_fd], [], [], timeout)
        return bool(ready) and os.read(read_fd, len(OWNED)) == OWNED
    finally:
        os.close(read_fd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fl_app.deploy.node_worker",
        description="Warm Keras worker for one SuperNode (start the SuperNode with "
        "--node-config \"keras-worker='SOCKET'\").",
    )
    parser.add_argument(
        "--socket",
        type=Path,
        required=True,
        help="Unix socket path, in a directory only this user may access (its key goes to SOCKET.key)",
    )
    parser.add_argument("--app", default="fl_app.client_app:app", help="the ClientApp to run")
    parser.add_argument(
        "--owned-fd", type=int, default=None, help="write 'owned' to this inherited pipe once the socket is owned"
    )
    args = parser.parse_args(argv)

    def report_owned() -> None:
        if args.owned_fd is not None:
            os.write(args.owned_fd, OWNED)
            os.close(args.owned_fd)

    try:
        serve(args.socket, args.app, on_owned=report_owned)
    except UnsafeWorkerPath as err:
        print(f"node_worker: refusing to start: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
