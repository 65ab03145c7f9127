"""Object pulls that retry within milliseconds instead of Flower's first 1 s back-off.

A Flower 1.41 message travels as an object tree: the message is stored first, its objects (the
arrays, the config) follow in separate pushes. Whoever pulls the message before its last object
has landed gets ``ObjectUnavailableError`` for that object and retries after
``PULL_INITIAL_BACKOFF`` = 1 s, doubling up to ``PULL_BACKOFF_CAP`` = 10 s
(``flwr/supercore/inflatable/inflatable_utils.py``, ``pull_objects``). That race is the normal case
on a fast link, and it is paid at three hops per message: the SuperNode pulling from the SuperLink
(it stores the message, then pulls its objects), the ClientApp's executor pulling from the
SuperNode, and the ServerApp pulling each reply from the SuperLink. Measured on a loopback
deployment round (2 nodes, train + evaluate): the executor's pull of a message took 0.94-1.39 s,
of which the transfer is a few milliseconds.

:func:`shorten_object_pulls` changes the defaults of Flower's two pull functions in this process
(the functions' own keyword defaults, which every caller in Flower uses): the first retry after
``INITIAL_BACKOFF_S``, doubling up to ``BACKOFF_CAP_S``, and as many tries per object as keep
Flower's own patience (``PULL_MAX_TRIES_PER_OBJECT x PULL_BACKOFF_CAP`` seconds of retries) for
a slow link. Flower's overall ``PULL_MAX_TIME`` is unchanged.
"""

from __future__ import annotations

import math

INITIAL_BACKOFF_S = 0.01
BACKOFF_CAP_S = 0.5
FLOWER_INITIAL_BACKOFF_S = 1
FLOWER_BACKOFF_CAP_S = 10
FLOWER_MAX_TRIES_PER_OBJECT = 500


def tries_for_same_patience(cap: float) -> int:
    """Tries per object that, at ``cap`` seconds between tries, wait as long as Flower's
    ``FLOWER_MAX_TRIES_PER_OBJECT`` tries at ``FLOWER_BACKOFF_CAP_S``."""
    if cap <= 0:
        raise ValueError(f"the back-off cap must be positive, got {cap}")
    return math.ceil(FLOWER_MAX_TRIES_PER_OBJECT * FLOWER_BACKOFF_CAP_S / cap)


def shorten_object_pulls(initial: float = INITIAL_BACKOFF_S, cap: float = BACKOFF_CAP_S) -> None:
    """Give Flower's ``pull_objects`` and ``pull_and_inflate_object_from_tree`` (this process) a
    first retry after ``initial`` s, doubling up to ``cap`` s (module docstring).

    Raises ``RuntimeError`` when the functions' defaults are no longer Flower 1.41's (1 s, 10 s,
    500 tries, and not already shortened), i.e. Flower changed and this needs a second look.
    """
    if not 0 < initial <= cap:
        raise ValueError(f"need 0 < initial <= cap, got initial={initial}, cap={cap}")
    from flwr.supercore.inflatable import inflatable_utils

    tries = tries_for_same_patience(cap)
    for function in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
        defaults = function.__kwdefaults__ or {}
        current = tuple(defaults.get(key) for key in ("initial_backoff", "backoff_cap", "max_tries_per_object"))
        if current not in {
            (FLOWER_INITIAL_BACKOFF_S, FLOWER_BACKOFF_CAP_S, FLOWER_MAX_TRIES_PER_OBJECT),
            (initial, cap, tries),
        }:
            raise RuntimeError(
                f"flwr's {function.__name__} defaults changed to (initial_backoff, backoff_cap, "
                f"max_tries_per_object) = {current}; update {__name__}"
            )
        defaults.update(initial_backoff=initial, backoff_cap=cap, max_tries_per_object=tries)
