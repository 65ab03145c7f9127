"""Objects named by a dotted path ``package.module:Name`` in the run config (a user's strategy or rule)."""

from __future__ import annotations

import importlib
from typing import Any


class StrategyNameError(ValueError):
    """A strategy name or dotted path that does not resolve to a strategy."""


def load_object(path: str, *, key: str = "strategy") -> Any:
    """Import ``package.module:Name`` and return the named attribute."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise StrategyNameError(f"{key} '{path}' is not of the form 'package.module:Name'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise StrategyNameError(f"{key} '{path}': cannot import module '{module_name}' ({err})") from err
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise StrategyNameError(f"{key} '{path}': module '{module_name}' has no attribute '{attr}'")
        obj = getattr(obj, part)
    if not callable(obj):
        raise StrategyNameError(f"{key} '{path}' names {type(obj).__name__}, which is not callable")
    return obj
