"""``flower-superexec`` that runs simulation tasks through :mod:`fl_app.deploy.simulation_entry`.

``fl-keras-run``'s SuperLink (:mod:`fl_app.deploy.superlink_entry`) starts its SuperExec through
this module. It is Flower's ``flower-superexec``, unchanged but for how a simulation task starts:
Flower's ``SubprocessExecutor`` builds the ``flwr-simulation`` command as usual (address, token,
TLS, parent PID), and then

- if ``FL_KERAS_WARM_SIMULATION`` names a FIFO that a warm simulation process is reading (the one
  ``fl-keras-run`` started with the SuperLink, already past its imports or on its way), the
  command's arguments go to it as one JSON line, once per SuperExec;
- otherwise the same arguments start ``python -m fl_app.deploy.simulation_entry``, which is
  ``flwr-simulation`` with the federation config's backend honoured.

Other task types (a deployment's ServerApp) start exactly as Flower starts them.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import types
from typing import Any

WARM_SIMULATION_ENV = "FL_KERAS_WARM_SIMULATION"
SIMULATION_COMMAND = [sys.executable, "-m", "fl_app.deploy.simulation_entry"]


def hand_to_warm(fifo: str, arguments: list[str]) -> bool:
    """Write ``arguments`` to the warm process reading ``fifo``; ``False`` if none is reading."""
    line = (json.dumps(arguments) + "\n").encode()
    if len(line) > 4096:  # PIPE_BUF: larger writes are not atomic
        return False
    try:
        descriptor = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as error:
        if error.errno in (errno.ENXIO, errno.ENOENT):  # no reader (it exited), or no FIFO
            return False
        raise
    try:
        return os.write(descriptor, line) == len(line)
    except BlockingIOError:
        return False
    finally:
        os.close(descriptor)


class SimulationLauncher:
    """Stands in for ``subprocess`` in Flower's ``subprocess_executor`` module: ``Popen`` of a
    ``flwr-simulation`` command goes to the warm process or :data:`SIMULATION_COMMAND`."""

    def __init__(self, warm_fifo: str | None) -> None:
        self.warm_fifo = warm_fifo
        self.DEVNULL = subprocess.DEVNULL

    def Popen(self, args: list[str], **kwargs: Any) -> Any:
        if not args or os.path.basename(args[0]) != "flwr-simulation":
            return subprocess.Popen(args, **kwargs)
        fifo, self.warm_fifo = self.warm_fifo, None
        if fifo is not None and hand_to_warm(fifo, list(args[1:])):
            return None  # Flower's launch ignores the Popen object
        return subprocess.Popen([*SIMULATION_COMMAND, *args[1:]], **kwargs)


def install_simulation_launcher(warm_fifo: str | None) -> SimulationLauncher:
    from flwr.supercore.superexec.executor import subprocess_executor

    if not isinstance(getattr(subprocess_executor, "subprocess", None), types.ModuleType):
        raise RuntimeError(f"flwr's {subprocess_executor.__name__} no longer launches through subprocess")
    launcher = SimulationLauncher(warm_fifo)
    subprocess_executor.subprocess = launcher  # type: ignore[assignment]
    return launcher


def main() -> None:
    install_simulation_launcher(os.environ.get(WARM_SIMULATION_ENV) or None)
    from flwr.supercore.cli import flower_superexec

    sys.argv[0] = "flower-superexec"
    flower_superexec()


if __name__ == "__main__":
    main()
