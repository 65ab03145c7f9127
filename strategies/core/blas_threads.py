"""How many threads the server's BLAS calls use (NumPy's and SciPy's OpenBLAS, through threadpoolctl).

Compute-bound products (the Gram matrix of Krum's distances, matrix-vector products) use every
core the aggregation has (:func:`server_cores`); memory-bound passes made of many small calls (the
streamed weighted sum's ``saxpy`` on cache-sized chunks) use one thread, since waking the others
costs a synchronisation per call and their reads share the same memory bus.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Any


@functools.cache
def _threadpools() -> Any:
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def server_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers and ``taskset``
    narrow; ``os.cpu_count()`` where the platform has no affinity)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def blas_thread_limit(threads: int) -> contextlib.AbstractContextManager:
    """A context that runs BLAS (NumPy's and SciPy's libraries) with ``threads`` threads.

    Set explicitly rather than left to the library, whose default is every core of the machine,
    not of the process's affinity: a server confined to fewer cores would oversubscribe them.
    """
    return _threadpools().limit(limits=threads, user_api="blas")
