"""Model registry: one name per buildable model, ``create_model(name, **kwargs)`` to build it.

Names and keyword arguments come from users (CLI flags, config files), so mistakes
become one-line :class:`EdgekitError` messages that say what is available.
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable

import torch.nn as nn

from edgekit.errors import EdgekitError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str):
    """Decorator registering ``fn(**kwargs) -> nn.Module`` under ``name``."""
    def decorator(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        known = _REGISTRY.get(name)
        if known is not None and known.__module__ != fn.__module__:
            raise ValueError(f"model name {name!r} is already registered by {known.__module__}")
        _REGISTRY[name] = fn
        return fn
    return decorator


def list_models(pattern: str | None = None) -> list[str]:
    """Sorted registered names, optionally filtered by a shell-style ``pattern``."""
    names = sorted(_REGISTRY)
    return fnmatch.filter(names, pattern) if pattern else names


def _keywords(fn: Callable) -> list[str]:
    params = inspect.signature(fn).parameters.values()
    return [p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]


def create_model(name: str, **kwargs) -> nn.Module:
    """Build the model registered as ``name`` with ``kwargs``."""
    fn = _REGISTRY.get(name)
    if fn is None:
        raise EdgekitError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    try:
        inspect.signature(fn).bind(**kwargs)
    except TypeError as exc:
        raise EdgekitError(f"model {name!r}: {exc}; accepted keywords: {', '.join(_keywords(fn))}") from None
    try:
        return fn(**kwargs)
    except TypeError as exc:
        # A builder taking **kwargs only finds a bad keyword when it calls its class.
        if "keyword argument" not in str(exc):
            raise
        raise EdgekitError(f"model {name!r}: {str(exc).splitlines()[0]}; remove that keyword (it is not an "
                           f"option of {name})") from None
