"""The output pool hands a block out again only once nothing can see it, keeps no more
than its capacity, and leaves small outputs to the allocator."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

from edgekit.errors import EdgekitError
from edgekit.kernels import output_pool
from edgekit.kernels.output_pool import OutputPool

KIB = 1 << 10


def address(a) -> int:
    return a.ctypes.data if isinstance(a, np.ndarray) else a.data_ptr()


def test_a_freed_block_is_handed_out_again():
    pool = OutputPool(min_bytes=64 * KIB, capacity=1 << 20)
    a = pool.empty((128, 256), np.float32)
    first = address(a)
    del a
    gc.collect()
    assert pool.held_bytes == 128 * KIB
    b = pool.empty((256, 128), np.float32)  # same size, other shape
    assert address(b) == first and b.shape == (256, 128) and b.flags.writeable and b.flags.c_contiguous
    assert pool.held_bytes == 0


@pytest.mark.parametrize("keeper", ["torch view", "numpy view", "torch tensor of a numpy view"])
def test_a_block_still_seen_by_a_view_is_not_handed_out(keeper):
    pool = OutputPool(min_bytes=64 * KIB, capacity=1 << 20)
    a = pool.empty((64, 512), np.float32)
    a[...] = np.random.default_rng().standard_normal(a.shape, dtype=np.float32)
    expected = a[5:9].copy()
    kept = {"torch view": lambda: torch.from_numpy(a)[5:9],
            "numpy view": lambda: a[5:9],
            "torch tensor of a numpy view": lambda: torch.from_numpy(a[5:9])}[keeper]()
    del a
    gc.collect()
    assert pool.held_bytes == 0
    b = pool.empty((64, 512), np.float32)
    b[...] = -1.0
    np.testing.assert_array_equal(np.asarray(kept), expected)
    del kept
    gc.collect()
    assert pool.held_bytes == 128 * KIB


def test_the_pool_keeps_no_more_than_its_capacity_and_release_frees_it():
    pool = OutputPool(min_bytes=64 * KIB, capacity=300 * KIB)
    arrays = [pool.empty((128 * KIB,), np.uint8) for _ in range(3)]
    del arrays
    gc.collect()
    assert pool.held_bytes == 256 * KIB  # two of the three fit
    pool.release()
    assert pool.held_bytes == 0


def test_small_outputs_are_plain_arrays_and_a_zero_capacity_keeps_nothing():
    small = OutputPool(min_bytes=1 << 20, capacity=1 << 30, align_bytes=1 << 20)
    template = np.zeros((100, 100))
    for a in (small.empty((100, 100), np.float64), small.empty_like(template)):
        assert a.base is None and a.shape == (100, 100) and a.dtype == np.float64  # plain numpy arrays
    off = OutputPool(min_bytes=0, capacity=0)
    a = off.empty_like(template)
    assert a.shape == (100, 100) and a.ctypes.data % output_pool.ALIGNMENT == 0
    del a
    gc.collect()
    assert small.held_bytes == off.held_bytes == 0


@pytest.mark.parametrize("nbytes", [64 * KIB, 200 * KIB + 8])
def test_large_arrays_start_on_a_cache_line_pooled_or_not(nbytes):
    pool = OutputPool(min_bytes=128 * KIB, capacity=1 << 20, align_bytes=32 * KIB)
    for _ in range(3):  # fresh, then (when pooled) reused blocks
        a = pool.empty((nbytes // 8,), np.float64)
        assert a.ctypes.data % output_pool.ALIGNMENT == 0 and a.nbytes == nbytes // 8 * 8
        a[:] = 1.0  # the whole array is writable memory of the block
        del a
        gc.collect()
    assert pool.held_bytes == (nbytes // 8 * 8 if nbytes >= 128 * KIB else 0)


def test_empty_like_pools_large_arrays():
    pool = OutputPool(min_bytes=64 * KIB, capacity=1 << 20)
    a = pool.empty_like(np.zeros((256, 64), np.float32))
    assert a.shape == (256, 64) and a.dtype == np.float32 and a.base is not None


@pytest.mark.parametrize("value,megabytes", [("", output_pool.DEFAULT_CAPACITY_MB), ("0", 0), ("2.5", 2.5)])
def test_capacity_from_the_environment(monkeypatch, value, megabytes):
    monkeypatch.setenv(output_pool.ENV_CAPACITY, value)
    assert output_pool.capacity_from_env() == int(megabytes * (1 << 20))


@pytest.mark.parametrize("value", ["-1", "lots", "nan", "inf", "1e308"])
def test_a_bad_capacity_is_a_one_line_error(monkeypatch, value):
    monkeypatch.setenv(output_pool.ENV_CAPACITY, value)
    with pytest.raises(ValueError, match=f"EDGEKIT_OUTPUT_POOL_MB must be .* got '{value}'") as info:
        OutputPool(min_bytes=0).empty((1 << 20,), np.float32)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, EdgekitError)  # the CLI prints it as one line and exits 2


def test_bypassed_allocates_fresh_outputs_and_then_pools_again():
    pool = OutputPool(min_bytes=64 * KIB, capacity=1 << 20)
    with pool.bypassed():
        a = pool.empty((64 * KIB,), np.uint8)
    del a
    gc.collect()
    assert pool.held_bytes == 0
    b = pool.empty((64 * KIB,), np.uint8)
    del b
    gc.collect()
    assert pool.capacity == 1 << 20 and pool.held_bytes == 64 * KIB
