"""``flower-superlink`` with a start-up grace that survives a loaded machine.

Flower 1.41's SuperLink hands a run's task (the simulation process) to its SuperExec with a token
that must be activated within ``HEARTBEAT_DEFAULT_INTERVAL`` = 30 s; otherwise the task returns to
*pending* and the SuperExec launches **another** simulation process, without stopping the first.
On a machine where starting Python with Flower takes longer than 30 s (seen here at load averages
of 50-130 on 2 cores: ~20 simulation processes launched 30 s apart, none ever running, ~10 GB
between them) a run never starts. ``fl-keras-run`` therefore starts the SuperLink through this
module, which sets that interval in Flower's task store to ``FL_KERAS_TASK_GRACE_S`` (default 300 s)
before running the unchanged ``flower-superlink`` entry point. The only other effect: a task that
stops sending heartbeats is declared dead after 2 x 300 s instead of 2 x 30 s.

A simulation SuperLink (``--simulation``) also starts its SuperExec through
:mod:`fl_app.deploy.superexec_entry` instead of ``flower-superexec``, with the same arguments, so
that simulation tasks honour the federation config's ``backend`` and can start warm.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

DEFAULT_GRACE_S = 300.0


def main() -> None:
    grace = float(os.environ.get("FL_KERAS_TASK_GRACE_S", DEFAULT_GRACE_S))
    import flwr.supercore.corestate.in_memory_corestate as in_memory
    import flwr.supercore.corestate.sql_corestate as sql

    for module in (in_memory, sql):
        if hasattr(module, "HEARTBEAT_DEFAULT_INTERVAL"):
            module.HEARTBEAT_DEFAULT_INTERVAL = max(grace, module.HEARTBEAT_DEFAULT_INTERVAL)  # type: ignore[attr-defined]
    if "--simulation" in sys.argv[1:]:
        use_superexec_entry()
    from flwr.superlink.cli import flower_superlink

    sys.argv[0] = "flower-superlink"
    flower_superlink()


def use_superexec_entry() -> None:
    """Make this SuperLink start ``python -m fl_app.deploy.superexec_entry`` as its SuperExec."""
    module = importlib.import_module("flwr.superlink.cli.flower_superlink")
    flower_command = module._get_superexec_command

    def command(*args: Any, **kwargs: Any) -> list[str]:
        flower = flower_command(*args, **kwargs)
        if flower[:1] != ["flower-superexec"]:
            raise RuntimeError(f"flwr's SuperExec command changed to {flower}; update {__name__}")
        return [sys.executable, "-m", "fl_app.deploy.superexec_entry", *flower[1:]]

    module._get_superexec_command = command  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
