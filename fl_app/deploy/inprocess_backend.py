"""A Flower simulation backend that runs the ClientApp inside the simulation process, without Ray.

Flower 1.41's simulation engine hands every message to a ``Backend``
(``flwr/server/superlink/fleet/vce/backend/backend.py``) and ships only one, ``RayBackend``: it
starts a Ray cluster (GCS, raylet, dashboard agents) and a pool of actors, one per
``client-resources-num-cpus`` CPUs, and each actor imports TensorFlow again, since
``flwr.simulation`` imports it at module level. On the default run (2 cores, 10 digits clients)
that is ``ray.init`` at 5-14 s and 16 s of imports per actor before the first fit, for models that
train in milliseconds.

:class:`InProcessBackend` runs each message's ClientApp in the simulation process, which has
imported TensorFlow already (for the ServerApp and Flower's own import), one message at a time:

    out_message, context = client_app(message=copy(message), context=copy(context))

The copies stand in for Ray's serialisation: the ClientApp works on its own message and context,
never on the objects the simulation's link state holds, exactly as an actor does. An exception
in the ClientApp becomes ``ClientAppException`` (Flower's error reply,
``CLIENT_APP_RAISED_EXCEPTION``), as in Flower's ``ClientAppActor.run``; one that loading the app
raises stays ``LoadClientAppError``.

What changes against Ray: the virtual clients share one process and run one after another (a Ray
pool of two 1-CPU actors runs two at once; here TensorFlow's own thread pools use every core for
the one client), they share the process with the ServerApp, and the Ray-specific federation
options (``client-resources-*``, ``init-args-*``) and ``client-threads`` have no effect (TensorFlow's
thread pools are the process's). Use ``backend='ray'`` for GPUs,
for a Ray cluster of several machines, or for ClientApps that are not safe to run beside the
ServerApp (e.g. one that calls ``keras.backend.clear_session()``).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from flwr.clientapp.client_app import ClientAppException, LoadClientAppError
from flwr.server.superlink.fleet.vce.backend.backend import Backend, BackendConfig

from fl_app.client.node_client import SHARED_PROCESS_ENV

if TYPE_CHECKING:
    from flwr.app import Context, Message
    from flwr.clientapp.client_app import ClientApp


class InProcessBackend(Backend):
    """Run the ClientApp in this process, one message at a time (module docstring)."""

    def __init__(self, backend_config: BackendConfig) -> None:
        super().__init__(backend_config)
        self.app_fn: Callable[[], ClientApp] | None = None
        self.busy = False

    def build(self, app_fn: Callable[[], ClientApp]) -> None:
        os.environ[SHARED_PROCESS_ENV] = "1"  # the process's TensorFlow threads are not a client's
        self.app_fn = app_fn

    @property
    def num_workers(self) -> int:
        return 1

    def is_worker_idle(self) -> bool:
        return self.app_fn is not None and not self.busy

    def process_message(self, message: Message, context: Context) -> tuple[Message, Context]:
        if self.app_fn is None:
            raise ValueError("InProcessBackend.build() must be called before process_message()")
        own_message, own_context = copy.deepcopy(message), copy.deepcopy(context)
        self.busy = True
        try:
            app = self.app_fn()
            out_message = app(message=own_message, context=own_context)
        except LoadClientAppError:
            raise
        except Exception as ex:
            raise ClientAppException(str(ex)) from ex
        finally:
            self.busy = False
        return out_message, own_context

    def terminate(self) -> None:
        self.app_fn = None
