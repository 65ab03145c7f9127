"""``flwr-simulation`` with a choice of backend, and a warm start for ``fl-keras-run``.

``fl-keras-run``'s SuperExec (:mod:`fl_app.deploy.superexec_entry`) runs a simulation task through
this module instead of Flower's ``flwr-simulation`` command, with the same arguments. Four things
differ from Flower's:

1. **The backend is the one the federation config names.** Flower 1.41 reads ``backend`` from the
   run's federation config and then ignores it: ``start_vce`` always builds a ``RayBackend``.
   Here ``backend='inprocess'`` runs the ClientApps in the simulation process
   (:class:`~fl_app.deploy.inprocess_backend.InProcessBackend`), ``backend='ray'`` is Flower's, and
   any other name stops the run with an error that names the key, the value and what is allowed.

2. **A shorter sweep for messages.** Flower's simulation runtime looks for new messages in each
   node's queue every 0.1 s (``vce_api.add_messages_to_queue``), so every train and evaluate
   phase waits 0.05 s on average before its first client starts. :func:`add_messages_to_queue`
   is the same sweep every :func:`sweep_interval` seconds: 0.01 s for up to 20 nodes, growing
   with the number of nodes (0.5 ms each, one in-memory lookup per node per sweep) up to Flower's
   0.1 s. Measured on the default task (10 digits clients, one local epoch, in-process): the
   steady round went from 0.26-0.29 s to 0.23 s with this alone, and to 0.15-0.17 s with the
   ServerApp's 20 ms cap on polls of the in-memory grid (:mod:`fl_app.server.polling`).

   The runtime's worker and reply threads wait for their queues with a 1 s timeout, their only
   way to notice the end of the run: :class:`PromptQueue` caps those waits at
   ``QUEUE_WAIT_S`` = 0.05 s, so the simulation process ends about 1 s sooner.

3. **Warm start** (``--warm FIFO``): started by ``fl-keras-run`` together with the SuperLink, the
   process imports Flower's simulation runtime (and with it TensorFlow: 7 s of imports here, 25 s without compiled bytecode)
   while the SuperLink starts and the run is submitted, then waits for the SuperExec to write the
   task's ``flwr-simulation`` arguments to ``FIFO`` as one JSON line, and runs them. It serves one
   task, and exits without one if its parent exits first.

4. **No fixed sleep at the end.** Flower's exit handler flushes the run's logs to the SuperLink
   with a fixed 1 s sleep before it pushes the run's final status, which ``flwr run`` waits for.
   :func:`flush_logs` instead ends the log uploader, which pushes what is queued and exits, and
   waits for exactly that.
"""

from __future__ import annotations

import inspect
import json
import os
import queue
import select
import sys
import threading
from collections.abc import Callable
from logging import INFO
from typing import Any

INPROCESS_BACKEND = "inprocess"
RAY_BACKEND = "ray"
BACKENDS = (INPROCESS_BACKEND, RAY_BACKEND)
PARENT_CHECK_S = 1.0
FLOWER_SWEEP_S = 0.1
MIN_SWEEP_S = 0.01
SWEEP_S_PER_NODE = 0.0005
started_warm = False
"""Whether this process imported Flower's runtime before it got its task (``--warm``)."""


def check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"federation config backend={name!r} is not a backend; allowed: {', '.join(BACKENDS)}")
    return name


QUEUE_WAIT_S = 0.05


class PromptQueue(queue.Queue):
    """A ``queue.Queue`` whose blocking ``get`` waits at most ``QUEUE_WAIT_S`` per call (it still
    raises ``queue.Empty`` after that, as a timed-out ``get`` does): Flower's runtime threads then
    notice the run's end within ``QUEUE_WAIT_S`` instead of their 1 s timeout."""

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        if block:
            timeout = QUEUE_WAIT_S if timeout is None else min(timeout, QUEUE_WAIT_S)
        return super().get(block, timeout)


def sweep_interval(num_nodes: int) -> float:
    """Seconds between two sweeps of the nodes' message queues: ``SWEEP_S_PER_NODE`` per node,
    within [``MIN_SWEEP_S``, Flower's ``FLOWER_SWEEP_S``]."""
    return min(FLOWER_SWEEP_S, max(MIN_SWEEP_S, SWEEP_S_PER_NODE * num_nodes))


def add_messages_to_queue(state: Any, queue: Any, nodes_mapping: dict[int, int], f_stop: Any) -> None:
    """Flower's ``vce_api.add_messages_to_queue`` (put each node's next message in ``queue`` until
    ``f_stop``; the same parameters, so that it can stand in for it), sweeping every
    :func:`sweep_interval` seconds instead of 0.1 s."""
    wait = sweep_interval(len(nodes_mapping))
    while not f_stop.is_set():
        for node_id in nodes_mapping:
            for message in state.get_message_ins(node_id=node_id, limit=1):
                queue.put(message)
        f_stop.wait(wait)


LOG_UPLOADER_SUFFIX = "(_log_uploader)"
"""The end of the name Python gives the thread of Flower's ``start_log_uploader`` (``Thread-N (target)``)."""


def flush_logs(log_queue: queue.Queue, timeout: float = 3.0) -> bool:
    """Flower's ``flush_logs`` at the run's end without its fixed sleep (1 s, then Flower pushes the
    run's final status, which ``flwr run`` waits for).

    Puts the uploader's end marker (``None``) in ``log_queue`` and joins the uploader thread: it
    pushes everything queued before the marker to the SuperLink, then ends, so the flush is exact
    and takes as long as that last push. Flower's exit handler then stops the uploader, which has
    already ended. Log lines after this point are printed here but not uploaded: the only one
    Flower writes is the error of a failed final push, when the SuperLink is unreachable and their
    upload would fail too. Without such a thread, Flower's own ``flush_logs``.
    """
    from flwr.supercore.logger import flush_logs as flower_flush_logs

    uploader = next((t for t in threading.enumerate() if t.name.endswith(LOG_UPLOADER_SUFFIX)), None)
    if uploader is None:
        return flower_flush_logs(log_queue, timeout)
    log_queue.put(None)
    uploader.join(timeout)
    return not uploader.is_alive()


def install_prompt_log_flush() -> None:
    """Make Flower's simulation process end its run with :func:`flush_logs`."""
    from flwr.simulation import app

    if getattr(app, "flush_logs", None) is None or getattr(app, "start_log_uploader", None) is None:
        raise RuntimeError(f"flwr.simulation.app no longer flushes logs with flush_logs; update {__name__}")
    app.flush_logs = flush_logs


def install_backends() -> None:
    """Make Flower's ``start_vce`` (this process) build the backend the federation config names, and
    sweep for messages every :func:`sweep_interval` seconds."""
    from flwr.server.superlink.fleet import vce
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.supercore import log

    from fl_app.deploy.inprocess_backend import InProcessBackend

    flower_start_vce = vce.start_vce
    if getattr(flower_start_vce, "fl_keras_backends", False):
        return
    flower_run_api = vce_api.run_api
    flower_sweep = vce_api.add_messages_to_queue
    if list(inspect.signature(flower_sweep).parameters) != ["state", "queue", "nodes_mapping", "f_stop"]:
        raise RuntimeError(f"flwr's vce_api.add_messages_to_queue changed; update {__name__}")
    vce_api.add_messages_to_queue = add_messages_to_queue
    if vce_api.Queue is not queue.Queue:
        raise RuntimeError(f"flwr's vce_api no longer uses queue.Queue; update {__name__}")
    vce_api.Queue = PromptQueue  # type: ignore[misc]

    def start_vce(**kwargs: Any) -> None:  # Flower's _main_loop passes every argument by name
        backend_name = check_backend(kwargs["backend_name"])
        log(INFO, "Simulation backend: %s; %s start", backend_name, "warm" if started_warm else "cold")
        if backend_name == RAY_BACKEND:
            return flower_start_vce(**kwargs)
        config = json.loads(kwargs["backend_config_json_stream"])

        def run_api(app_fn: Callable[..., Any], backend_fn: Callable[..., Any], *rest: Any) -> None:
            flower_run_api(app_fn, lambda: InProcessBackend(config), *rest)

        vce_api.run_api = run_api  # type: ignore[assignment]
        try:
            return flower_start_vce(**kwargs)
        finally:
            vce_api.run_api = flower_run_api

    start_vce.fl_keras_backends = True  # type: ignore[attr-defined]
    vce.start_vce = start_vce  # type: ignore[assignment]


def open_task_fifo(fifo: str) -> int:
    """The read end of ``fifo``, opened before the imports so that the SuperExec can hand over a
    task at any time. Opened read-write (Linux never blocks that open, and the process's own
    write end means no end-of-file between writers); the task then waits in the pipe."""
    return os.open(fifo, os.O_RDWR)


def wait_for_task(descriptor: int, parent: int) -> list[str] | None:
    """The ``flwr-simulation`` arguments written to the FIFO (one JSON line), or ``None`` once
    ``parent`` is gone. Closes ``descriptor``."""
    buffer = b""
    try:
        while os.getppid() == parent:
            readable, _, _ = select.select([descriptor], [], [], PARENT_CHECK_S)
            if not readable:
                continue
            buffer += os.read(descriptor, 65536)
            if b"\n" in buffer:
                arguments = json.loads(buffer.split(b"\n", 1)[0])
                if not (isinstance(arguments, list) and all(isinstance(a, str) for a in arguments)):
                    raise ValueError(f"expected the task as a JSON list of strings, got {arguments!r}")
                return arguments
        return None
    finally:
        os.close(descriptor)


def run_flwr_simulation(arguments: list[str]) -> None:
    from flwr.simulation.app import flwr_simulation

    install_backends()
    install_prompt_log_flush()
    sys.argv = ["flwr-simulation", *arguments]
    flwr_simulation()


def main(argv: list[str] | None = None) -> None:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["--warm"]:
        if len(arguments) != 2:
            raise SystemExit("usage: python -m fl_app.deploy.simulation_entry --warm FIFO")
        parent = os.getppid()
        descriptor = open_task_fifo(arguments[1])
        import flwr.simulation.app  # noqa: F401  (Flower's runtime and TensorFlow, before the task)

        task = wait_for_task(descriptor, parent)
        if task is None:
            return
        arguments = task
        global started_warm
        started_warm = True
    run_flwr_simulation(arguments)


if __name__ == "__main__":
    main()
