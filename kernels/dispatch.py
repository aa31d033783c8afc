"""Backend dispatch for edgekit.ops.

Each backend is a module in this package exposing:

- ``DEVICES``: the device types of the tensors it takes (e.g. ``{"cpu"}``);
- ``unavailable_reason() -> str | None``: None when it can run here, else why not;
- ``SUPPORTS_BACKWARD``: the set of op names whose autograd backward it implements;
- one function per op (``grn``, ``deform_conv2d``) with the positional signature used
  by :mod:`edgekit.ops` (pairs already normalised).

``auto`` picks, for the input's device, the first backend in ``AUTO_ORDER`` that is
available, implements the op, and (when a gradient is needed) its backward. It never
picks a missing backend; the torch reference is always there as the last resort.
"""

from __future__ import annotations

import importlib
import os
from functools import lru_cache
from types import ModuleType

import torch

from edgekit.errors import BackendUnavailableError

BACKEND_MODULES = {
    "torch": "edgekit.kernels.reference",
    "numba": "edgekit.kernels.numba_cpu",
    "numba-cuda": "edgekit.kernels.numba_cuda",
    "cuda": "edgekit.kernels.cuda_cpp",
}
BACKENDS = ("auto",) + tuple(BACKEND_MODULES)
AUTO_ORDER = {"cpu": ("numba", "torch"), "cuda": ("cuda", "numba-cuda", "torch")}


@lru_cache(maxsize=None)
def _load(name: str) -> tuple[ModuleType | None, str | None]:
    """Import a backend module once; return (module, None) or (None, reason)."""
    try:
        module = importlib.import_module(BACKEND_MODULES[name])
    except ImportError as exc:
        return None, f"its module could not be imported ({exc})"
    reason = module.unavailable_reason()
    return (None, reason) if reason else (module, None)


def unavailable_reason(name: str) -> str | None:
    """None if backend ``name`` can run on this machine, else a one-line reason."""
    if name not in BACKEND_MODULES:
        return f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}"
    return _load(name)[1]


def available_backends() -> list[str]:
    """Names of the backends that can run on this machine."""
    return [name for name in BACKEND_MODULES if _load(name)[0] is not None]


def _needs_grad(tensor: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and tensor.requires_grad


def resolve(op: str, backend: str, tensor: torch.Tensor, needs_grad: bool | None = None):
    """Return the implementation of ``op`` for ``backend`` (``auto`` resolved)."""
    if backend == "auto":
        backend = os.environ.get("EDGEKIT_BACKEND", "auto") or "auto"
    if backend not in BACKENDS:
        raise BackendUnavailableError(
            f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend != "auto":
        module, reason = _load(backend)
        if module is None:
            raise BackendUnavailableError(f"backend {backend!r} is unavailable: {reason}")
        if not hasattr(module, op):
            raise BackendUnavailableError(f"backend {backend!r} does not implement {op}")
        if (_needs_grad(tensor) if needs_grad is None else needs_grad) and op not in module.SUPPORTS_BACKWARD:
            raise BackendUnavailableError(
                f"backend {backend!r} has no backward for {op}; use backend 'auto' or 'torch' when training")
        if tensor.device.type not in module.DEVICES:
            raise BackendUnavailableError(
                f"backend {backend!r} runs on {'/'.join(sorted(module.DEVICES))} tensors, got a {tensor.device.type} tensor; "
                f"move the tensor or pick another backend")
        return getattr(module, op)
    grad = _needs_grad(tensor) if needs_grad is None else needs_grad
    for name in AUTO_ORDER.get(tensor.device.type, ("torch",)):
        module, _ = _load(name)
        if module is None or not hasattr(module, op) or tensor.device.type not in module.DEVICES:
            continue
        if grad and op not in module.SUPPORTS_BACKWARD:
            continue
        return getattr(module, op)
    return getattr(_load("torch")[0], op)
