"""Reuse of the memory of large CPU kernel outputs once their tensors are freed.

Why: glibc serves every allocation above its largest mmap threshold (32 MiB on 64-bit)
with fresh pages from the OS, which the kernel zeroes on first touch, one 4 KiB page
fault at a time. For a memory-bound op such as GRN that is a fourth pass over the
output on top of its two reads and one write: on the 2-core EPYC a GRN of an 8x128x128x80
float32 tensor (40 MiB) took 7.8 ms into a fresh array and 5.3 ms into a reused one
(three passes at the copy bandwidth: 4.7 ms). Transparent huge pages do not help here:
with the ``madvise`` defrag setting every new 2 MiB page compacts memory synchronously
(24.6 ms for the same call).

The pool keeps a few freed output blocks, per exact size, and hands them out again. A
block is handed out only after every array and tensor that could see it is gone: the
lease ends when the root buffer object of the returned array (which numpy views and
``torch.from_numpy`` tensors all keep alive) is collected.

``EDGEKIT_OUTPUT_POOL_MB`` caps the memory the pool keeps while nothing uses it (default
128 MiB; 0 turns pooling off); :func:`release` frees what it holds.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import weakref

import numpy as np

from edgekit.errors import EdgekitError

MIN_BYTES = 32 << 20  # glibc's largest mmap threshold: smaller outputs come from its warm heap
ALIGN_BYTES = 1 << 20  # outputs from this size on start on a cache line (malloc gives 16 bytes)
ALIGNMENT = 64
DEFAULT_CAPACITY_MB = 128
ENV_CAPACITY = "EDGEKIT_OUTPUT_POOL_MB"


class OutputPoolSettingError(EdgekitError, ValueError):
    """``EDGEKIT_OUTPUT_POOL_MB`` is not a number of MiB >= 0 (the CLI prints one line)."""


def capacity_from_env() -> int:
    """The pool's capacity in bytes from ``EDGEKIT_OUTPUT_POOL_MB``."""
    text = os.environ.get(ENV_CAPACITY, "").strip()
    if not text:
        return DEFAULT_CAPACITY_MB << 20
    try:
        megabytes = float(text)
    except ValueError:
        megabytes = math.nan
    if not math.isfinite(megabytes) or not 0 <= megabytes <= 1 << 40:
        raise OutputPoolSettingError(f"{ENV_CAPACITY} must be a number of MiB >= 0 (0 turns the output pool off), "
                                     f"got {text!r}")
    return int(megabytes * (1 << 20))


def _root(array: np.ndarray) -> object:
    """The object that owns ``array``'s memory: numpy collapses the base of every view to
    it, so it lives exactly as long as any array or tensor on that memory."""
    while isinstance(array, np.ndarray) and array.base is not None:
        array = array.base
    return array


def _aligned(block: np.ndarray, nbytes: int) -> np.ndarray:
    """The ``nbytes`` of ``block`` (``nbytes + ALIGNMENT`` long) from its first 64-byte boundary."""
    start = -block.ctypes.data % ALIGNMENT
    return block[start:start + nbytes]


class OutputPool:
    """Blocks of at least ``min_bytes`` kept after use, at most ``capacity`` bytes in all;
    arrays of at least ``align_bytes`` (at most ``min_bytes``) aligned to 64 bytes.

    ``capacity=None`` reads it from the environment on first use."""

    def __init__(self, min_bytes: int = MIN_BYTES, capacity: int | None = None, align_bytes: int = ALIGN_BYTES):
        self.min_bytes = min_bytes
        self.align_bytes = min(align_bytes, min_bytes)
        self._capacity = capacity
        self._free: dict[int, list[np.ndarray]] = {}
        self._held = 0
        # Re-entrant: a release runs from the garbage collector, which may fire inside empty().
        self._lock = threading.RLock()

    @property
    def capacity(self) -> int:
        if self._capacity is None:
            self._capacity = capacity_from_env()
        return self._capacity

    @property
    def held_bytes(self) -> int:
        """Bytes kept for reuse that no array uses now."""
        return self._held

    def empty_like(self, array: np.ndarray) -> np.ndarray:
        """:meth:`empty` for ``array``'s shape and dtype; small ones cost what ``np.empty_like``
        does (this sits on the path of 7x7 GRN calls that take ~15 us in all)."""
        if array.nbytes < self.align_bytes:
            return np.empty_like(array)
        return self.empty(array.shape, array.dtype)

    def empty(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        """An uninitialised C-contiguous array; from ``align_bytes`` on, 64-byte aligned
        (kernels then use aligned streaming stores), and from ``min_bytes`` on a reused
        block when one of its size is free."""
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes < self.align_bytes:
            return np.empty(shape, dtype)
        if self.capacity == 0 or nbytes < self.min_bytes:  # capacity first: a bad setting shows early
            return _aligned(np.empty(nbytes + ALIGNMENT, np.uint8), nbytes).view(dtype).reshape(shape)
        with self._lock:
            blocks = self._free.get(nbytes)
            block = blocks.pop() if blocks else None
            if block is not None:
                self._held -= nbytes
        if block is None:
            block = np.empty(nbytes + ALIGNMENT, np.uint8)
        array = np.frombuffer(memoryview(_aligned(block, nbytes)), dtype).reshape(shape)
        weakref.finalize(_root(array), self._give_back, block)
        return array

    def _give_back(self, block: np.ndarray) -> None:
        nbytes = block.nbytes - ALIGNMENT
        with self._lock:
            if self._held + nbytes <= self.capacity:
                # Counted before the append, which can run the garbage collector and so a
                # nested give-back (the lock is re-entrant): that one sees this block.
                self._held += nbytes
                self._free.setdefault(nbytes, []).append(block)

    @contextlib.contextmanager
    def bypassed(self):
        """Within the block every output is a fresh allocation (benchmarks measure both).
        For one thread: it changes the shared capacity, so other threads get fresh outputs
        meanwhile and blocks freed meanwhile are dropped."""
        saved, self._capacity = self._capacity, 0
        try:
            yield self
        finally:
            self._capacity = saved

    def release(self) -> None:
        """Free every block the pool keeps (arrays in use are not affected)."""
        with self._lock:
            self._free.clear()
            self._held = 0


OUTPUTS = OutputPool()


def release() -> None:
    """Free the memory the shared output pool keeps for reuse."""
    OUTPUTS.release()
