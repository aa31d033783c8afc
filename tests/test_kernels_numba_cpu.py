"""The Numba CPU backend against the float64 PyTorch references, forward and every gradient.

Float32 results are compared with the float64 reference run on the same (float32-rounded)
inputs; the error is measured relative to the reference's norm. Cases are fresh each run
(hypothesis draws the seeds); a failure prints the seed (``EDGEKIT_TEST_SEED`` replays a
deform case).
"""

from __future__ import annotations

import gc
import platform

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deform_cases import describe, fresh_seed, random_deform_case, tensor_args
from edgekit import ops
from edgekit.kernels import dispatch, numba_cpu, output_pool
from edgekit.kernels.numba_grn import _streams
from edgekit.models.deform import DeformConv2d, deform_conv2d_reference
from edgekit.models.grn import GRN, grn_reference

TOL32 = 1e-5
SETTINGS = settings(max_examples=25, deadline=None, print_blob=True)


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.detach().double(), ref.detach().double()
    return float((got - ref).norm() / ref.norm().clamp_min(1e-30))


def grads(fn, inputs, grad_out_seed, grad_dtype=None):
    """Output and gradients of ``fn(*inputs)`` w.r.t. every input that requires grad, for
    a fixed random output gradient (rounded to ``grad_dtype`` first, when given)."""
    out = fn(*inputs)
    gen = torch.Generator().manual_seed(grad_out_seed)
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(grad_dtype or out.dtype).to(out.dtype)
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    return out, torch.autograd.grad(out, leaves, g)


def detached(ts, dtype):
    return [t if not isinstance(t, torch.Tensor) else t.detach().to(dtype).requires_grad_() for t in ts]


# ----------------------------------------------------------------------------- GRN


def grn_inputs(seed, n, h, w, c, data_format, dtype=torch.float32, zero_channel=False):
    gen = torch.Generator().manual_seed(seed)
    shape = (n, h, w, c) if data_format == "channels_last" else (n, c, h, w)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 3
    if zero_channel:  # a channel whose norm is 0: the gradient must stay finite there
        (x[..., 0] if data_format == "channels_last" else x[:, 0]).zero_()
    gamma = torch.randn(1, 1, 1, c, generator=gen, dtype=torch.float64)
    beta = torch.randn(1, 1, 1, c, generator=gen, dtype=torch.float64)
    return [t.to(dtype) for t in (x, gamma, beta)]


def grn_run(impl, inputs, seed, data_format, dtype=torch.float32):
    """(output, gradients) of GRN ``impl`` run in ``dtype``, for one random output gradient
    rounded to float32 in every run: dbeta is a sum of it that can cancel, and a float64
    reference given the unrounded gradient would differ by that rounding, not by the kernel."""
    return grads(lambda x, g, b: impl(x, g, b, 1e-6, data_format), detached(inputs, dtype), seed, torch.float32)


def assert_grn_close(run, ref, context):
    """Output and gradients (``grn_run`` results) within TOL32 of the float64 reference."""
    for name, a, b in zip(("out", "x", "gamma", "beta"), (run[0], *run[1]), (ref[0], *ref[1])):
        assert torch.isfinite(a).all(), f"{name}: non-finite ({context})"
        assert rel_err(a, b) <= TOL32, f"{name}: rel err {rel_err(a, b):.2e} ({context})"


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 3), h=st.integers(1, 11), w=st.integers(1, 11),
       c=st.integers(1, 40), data_format=st.sampled_from(["channels_last", "channels_first"]),
       zero_channel=st.booleans())
def test_grn_float32_forward_and_grads_match_float64_reference(seed, n, h, w, c, data_format, zero_channel):
    inputs = grn_inputs(seed, n, h, w, c, data_format, zero_channel=zero_channel)
    run = grn_run(numba_cpu.grn, inputs, seed, data_format)
    assert run[0].dtype == torch.float32
    assert_grn_close(run, grn_run(grn_reference, inputs, seed, data_format, torch.float64), f"seed {seed}")


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_grn_parallel_chunks_match_reference(monkeypatch, data_format):
    """The multi-threaded, multi-chunk path (small tensors run on one thread, in one chunk)."""
    seed = fresh_seed()
    monkeypatch.setattr(numba_cpu, "_SERIAL_BYTES", 0)
    monkeypatch.setattr(numba_cpu, "_SPLIT_BYTES", 0)
    monkeypatch.setattr(numba_cpu, "_GRN_CHUNK_BYTES", 256)
    x, gamma, beta = inputs = grn_inputs(seed, 3, 23, 17, 24, data_format)
    ref = grn_run(grn_reference, inputs, seed, data_format, torch.float64)
    assert_grn_close(grn_run(numba_cpu.grn, inputs, seed, data_format), ref, f"seed {seed}")
    with torch.no_grad():
        assert rel_err(numba_cpu.grn(x, gamma, beta, 1e-6, data_format), ref[0]) <= TOL32, seed


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_grn_gradcheck_float64(data_format):
    seed = fresh_seed()
    x, gamma, beta = detached(grn_inputs(seed, 2, 3, 5, 4, data_format, torch.float64), torch.float64)
    assert torch.autograd.gradcheck(lambda *a: numba_cpu.grn(*a, 1e-6, data_format), (x, gamma, beta)), seed
    out = numba_cpu.grn(x, gamma, beta, 1e-6, data_format)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, grn_reference(x, gamma, beta, 1e-6, data_format), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_grn_half_input_is_reduced_in_float32(dtype, data_format):
    seed = fresh_seed()
    # Values whose float16 sum of squares over 32x32 pixels would overflow (> 65504).
    x, gamma, beta = grn_inputs(seed, 2, 32, 32, 8, data_format, dtype)
    x = (x.float() * 30).to(dtype)
    out = numba_cpu.grn(x, gamma, beta, 1e-6, data_format)
    ref = grn_reference(x, gamma, beta, 1e-6, data_format)
    assert out.dtype == dtype and torch.isfinite(out.float()).all()
    assert rel_err(out, ref) <= (2e-3 if dtype == torch.float16 else 1e-2), seed


def test_grn_non_contiguous_input():
    seed = fresh_seed()
    x, gamma, beta = grn_inputs(seed, 2, 6, 5, 7, "channels_first")
    nhwc = x.permute(0, 2, 3, 1)  # a channels_last view of NCHW memory
    torch.testing.assert_close(numba_cpu.grn(nhwc, gamma, beta, 1e-6, "channels_last"),
                               grn_reference(nhwc, gamma, beta), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_grn_outputs_on_reused_blocks_are_right_and_kept_ones_are_untouched(monkeypatch, data_format):
    """With every output pooled, a second forward and backward on a freed block (dirty
    with the first call's values) match the reference, and an output still held is not
    overwritten by a later call."""
    pool = output_pool.OutputPool(min_bytes=0, capacity=1 << 30)
    monkeypatch.setattr(numba_cpu, "OUTPUTS", pool)
    seed = fresh_seed()
    shape = (2, 9, 7, 12)
    held = numba_cpu.grn(*grn_inputs(seed, *shape, data_format), 1e-6, data_format)
    held_copy = held.clone()
    grn_run(numba_cpu.grn, grn_inputs(seed + 1, *shape, data_format), seed, data_format)  # then freed
    gc.collect()
    assert pool.held_bytes == 2 * held.numel() * 4  # its output and input gradient, dirty
    inputs = grn_inputs(seed + 2, *shape, data_format)
    run = grn_run(numba_cpu.grn, inputs, seed, data_format)
    assert pool.held_bytes == 0  # both blocks reused
    assert_grn_close(run, grn_run(grn_reference, inputs, seed, data_format, torch.float64), f"seed {seed}")
    assert torch.equal(held, held_copy)


GRN_MODES = {  # (serial, fuse, split thresholds): which kernel build and work split runs
    "serial": (1 << 62, 0, 1 << 62),
    "fused": (0, 1 << 62, 1 << 62),
    "split": (0, 0, 0),
}


def run_mode(monkeypatch, mode, fn):
    for name, value in zip(("_SERIAL_BYTES", "_FUSE_BYTES", "_SPLIT_BYTES"), GRN_MODES[mode]):
        monkeypatch.setattr(numba_cpu, name, value)
    return fn()


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_grn_modes_and_thread_counts_are_bit_identical(monkeypatch, data_format):
    """Serial, one-sample-per-task and two-pass chunked runs, on 1 or all threads, combine
    the same partial sums in the same order: forward and gradients are bit-identical, and
    match the float64 reference. 13 channels: the apply's tiles (13*32 elements) and
    remainder rows both run."""
    import numba
    seed = fresh_seed()
    monkeypatch.setattr(numba_cpu, "_GRN_CHUNK_BYTES", 13 * 4 * 37)  # 37-row chunks: several per sample
    threads = numba.get_num_threads()
    # The one-sample-per-task build needs at least as many samples as threads.
    inputs = grn_inputs(seed, max(4, threads), 29, 31, 13, data_format)
    runs = {}
    try:
        for mode in GRN_MODES:
            for t in sorted({1, threads}):
                numba.set_num_threads(t)
                runs[mode, t] = run_mode(monkeypatch, mode, lambda: grn_run(numba_cpu.grn, inputs, seed, data_format))
    finally:
        numba.set_num_threads(threads)
    (out0, grads0), *rest = runs.values()
    for key, (out, got) in runs.items():
        assert torch.equal(out, out0), (key, seed)
        assert all(torch.equal(a, b) for a, b in zip(got, grads0)), (key, seed)
    assert_grn_close((out0, grads0), grn_run(grn_reference, inputs, seed, data_format, torch.float64),
                     f"seed {seed}")


@pytest.mark.parametrize("mode", list(GRN_MODES))
@pytest.mark.parametrize("channels", [24, 13])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grn_streaming_stores_give_the_same_bits(monkeypatch, mode, channels, dtype):
    """The forward with streaming stores (every output aligned and streamed where C is a
    multiple of 8) is bit-identical to the ordinary stores, in every work split, and
    matches the float64 reference; the backward is unaffected."""
    seed = fresh_seed()
    monkeypatch.setattr(numba_cpu, "OUTPUTS", output_pool.OutputPool(align_bytes=0))
    monkeypatch.setattr(numba_cpu, "_GRN_CHUNK_BYTES", channels * 4 * 37)
    inputs = grn_inputs(seed, 4, 29, 31, channels, "channels_last", dtype)
    runs = []
    for stream_bytes in (0, 1 << 62):
        monkeypatch.setattr(numba_cpu, "_STREAM_BYTES", stream_bytes)
        runs.append(run_mode(monkeypatch, mode, lambda: grn_run(numba_cpu.grn, inputs, seed, "channels_last", dtype)))
    (out, grads), (plain_out, plain_grads) = runs
    assert _streams(out.detach().numpy(), channels, False, 0) == (channels % 8 == 0)  # the streamed run streamed
    assert torch.equal(out, plain_out) and all(torch.equal(a, b) for a, b in zip(grads, plain_grads)), seed
    ref = grn_run(grn_reference, inputs, seed, "channels_last", torch.float64)
    assert rel_err(out, ref[0]) <= TOL32, seed


def test_streaming_tiles_fall_back_to_ordinary_stores_off_alignment():
    """A misaligned streaming store would fault and end the process: off a 32-byte
    boundary the streaming apply uses ordinary stores, with the same results."""
    from edgekit.kernels.numba_grn import _tiles1, _tiles1_stream
    rng = np.random.default_rng()
    u = rng.standard_normal(8 * 64 + 1).astype(np.float32)
    at, betat = (rng.standard_normal(64).astype(np.float32) for _ in range(2))
    block = np.zeros(8 * 64 * 4 + 64 + 4, np.uint8)
    start = -block.ctypes.data % 64 + 4  # 4 bytes past a cache line
    got = block[start:start + 8 * 64 * 4].view(np.float32)
    want = np.zeros_like(got)
    _tiles1_stream(got, u[1:], at, betat, 0, got.shape[0])
    _tiles1(want, u[1:], at, betat, 0, want.shape[0])
    np.testing.assert_array_equal(got, want)


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86 assembly")
def test_streaming_apply_emits_non_temporal_stores_and_an_sfence():
    from edgekit.kernels.numba_grn import _tiles1_stream  # not disk-cached: its assembly can be read
    a = np.zeros(64, np.float32)
    _tiles1_stream(a, a, a[:32], a[:32], 0, 64)
    asm = "\n".join(_tiles1_stream.inspect_asm().values()).lower()
    assert "vmovntps" in asm or "movntps" in asm
    assert "sfence" in asm


def test_grn_streams_only_large_aligned_forward_outputs_of_whole_lanes():
    block = np.empty(64 * 24 * 4 + 64, np.uint8)
    start = -block.ctypes.data % 64
    out = block[start:start + 64 * 24 * 4].view(np.float32).reshape(1, 8, 8, 24)
    assert _streams(out, 24, False, 0) and _streams(out, 24, False, out.nbytes)
    assert not _streams(out, 24, False, out.nbytes + 1)  # below the threshold
    assert not _streams(out, 24, True, 0)  # the backward
    misaligned = block[start + 4:start + 4 + 64 * 12 * 4].view(np.float32).reshape(1, 8, 8, 12)
    assert not _streams(misaligned, 12, False, 0)
    odd = block[start:start + 64 * 12 * 4].view(np.float32).reshape(1, 8, 8, 12)
    assert not _streams(odd, 12, False, 0)  # 12 channels: rows do not start aligned


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("offset", [0.0, 1e3])
def test_grn_float32_accumulation_over_128x128_pixels(monkeypatch, data_format, offset):
    """The float32 block sums stay within 1e-5 of float64 over 16384 pixels in one chunk,
    also for large magnitudes; the norms within 2e-7 (one float32 sum over all 16384
    pixels is ~1e-6 off)."""
    seed = fresh_seed()
    monkeypatch.setattr(numba_cpu, "_GRN_CHUNK_BYTES", 1 << 30)  # one chunk per sample
    x, gamma, beta = grn_inputs(seed, 2, 128, 128, 16, data_format)
    x = x * 100 + offset
    inputs = (x, gamma, beta)
    assert_grn_close(grn_run(numba_cpu.grn, inputs, seed, data_format),
                     grn_run(grn_reference, inputs, seed, data_format, torch.float64), f"seed {seed}, {data_format}")
    gx = x.double().norm(dim=(1, 2) if data_format == "channels_last" else (2, 3))
    _, gx_numba = numba_cpu._grn_forward(x, gamma, beta, 1e-6, data_format == "channels_last")
    np.testing.assert_allclose(gx_numba, gx.numpy(), rtol=2e-7, err_msg=f"seed {seed}")


@pytest.mark.parametrize("shape", [(0, 4, 4, 8), (2, 0, 5, 8), (2, 3, 3, 0)])
def test_grn_empty_tensors_give_empty_outputs_and_zero_gradients(shape):
    x, gamma, beta = (torch.randn(shape, requires_grad=True), torch.randn(shape[-1], requires_grad=True),
                      torch.randn(shape[-1], requires_grad=True))
    out = numba_cpu.grn(x, gamma, beta)
    assert out.shape == shape
    out.sum().backward()
    assert x.grad.shape == shape and not gamma.grad.any() and not beta.grad.any()


def test_grn_kernels_load_from_the_disk_cache():
    """A second process loads every GRN kernel it uses from Numba's on-disk cache (one
    float32 signature per kernel) instead of compiling it again."""
    import subprocess
    import sys
    script = """
import torch
from edgekit.kernels import numba_cpu, numba_grn as k
numba_cpu._SERIAL_BYTES = 1 << 16
for fmt, shape in (("channels_last", (2, 96, 96, 8)), ("channels_first", (2, 8, 96, 96)),
                   ("channels_last", (1, 4, 4, 8)), ("channels_first", (1, 8, 4, 4))):
    x = torch.randn(shape, requires_grad=True)
    numba_cpu.grn(x, torch.ones(8), torch.zeros(8), 1e-6, fmt).sum().backward()
for d in (k.grn_last, k.grn_first, k.grn_last_serial, k.grn_first_serial):
    print(d.__name__, len(d.signatures), sum(d.stats.cache_hits.values()), sum(d.stats.cache_misses.values()))
"""
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)  # fills the cache if cold
    lines = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True,
                           text=True).stdout.split("\n")
    stats = {name: (int(sigs), int(hits), int(misses)) for name, sigs, hits, misses
             in (line.split() for line in lines if line)}
    assert len(stats) == 4
    for name, (sigs, hits, misses) in stats.items():
        assert (sigs, misses) == (1, 0) and hits >= 1, (name, sigs, hits, misses)


def test_grn_parameter_views_follow_updates_and_replacements():
    """The cached gamma/beta views see in-place updates, drop replaced storage and dead
    tensors, and never cache a converted copy."""
    import gc
    x = torch.randn(2, 3, 3, 4)
    gamma, beta = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(4))
    with torch.no_grad():
        def check():
            torch.testing.assert_close(numba_cpu.grn(x, gamma, beta), grn_reference(x, gamma, beta),
                                       rtol=1e-5, atol=1e-6)
        check()
        gamma.mul_(-3.0)  # an optimizer step: in place
        check()
        gamma.data.add_(0.5)  # through .data: no version bump, same memory
        check()
        beta.data = torch.randn(4)  # new storage
        check()
        gamma64 = gamma.detach().double()  # converted on every call, never cached
        torch.testing.assert_close(numba_cpu.grn(x, gamma64, beta), grn_reference(x, gamma, beta),
                                   rtol=1e-5, atol=1e-6)
        gamma64.mul_(2.0)
        torch.testing.assert_close(numba_cpu.grn(x, gamma64, beta), grn_reference(x, 2 * gamma, beta),
                                   rtol=1e-5, atol=1e-6)
    cached = len(numba_cpu._vector._views)
    del gamma, beta
    gc.collect()
    assert len(numba_cpu._vector._views) <= cached - 2


def test_grn_rejects_bad_parameters():
    x = torch.randn(1, 2, 2, 3)
    with pytest.raises(ValueError, match="gamma and beta need 3"):
        numba_cpu.grn(x, torch.ones(4), torch.ones(3))
    with pytest.raises(ValueError, match="data_format"):
        numba_cpu.grn(x, torch.ones(3), torch.ones(3), 1e-6, "nhwc")


# ------------------------------------------------------------ deformable convolution


FLOAT32_REFERENCE_FACTOR = 8


def check_deform_case(case, seed):
    """Forward and every gradient of the float32 kernel vs the float64 reference: within
    TOL32, or, where the float32 problem itself is ill-conditioned, within
    ``FLOAT32_REFERENCE_FACTOR`` times the error of the reference evaluated in float32.
    (A one-pixel map with a 4-channel offset group gave an offset gradient that is a sum
    of 8 terms cancelling 750-fold: the float32 reference was 2.7e-6 off, the kernel
    1.1e-5. Where the reference in float32 is within TOL32 / 8, the bound stays TOL32.)"""
    args = tensor_args(case)
    f32 = detached(args, torch.float32)
    f64 = detached(f32, torch.float64)  # the same float32-rounded values
    out, got = grads(numba_cpu.deform_conv2d, f32, seed)
    # The reference gets the same float32-rounded output gradient the kernel gets.
    ref_out, ref = grads(deform_conv2d_reference, f64, seed, torch.float32)
    assert out.dtype == torch.float32 and out.shape == ref_out.shape
    names = [n for n, t in zip(("out", "input", "offset", "weight", "bias", "mask"),
                               (out, *args[:4], args[7])) if n == "out" or t is not None]
    ref32 = None
    for i, (name, a, b) in enumerate(zip(names, (out, *got), (ref_out, *ref))):
        if b.norm() == 0:  # e.g. the offset gradient when every sample is off the map
            assert a.abs().max() <= 1e-6, f"{name}: expected zeros (seed {seed}; {describe(case)})"
            continue
        err = rel_err(a, b)
        if err <= TOL32:
            continue
        if ref32 is None:  # only computed where needed: it costs a reference run
            out32, grads32 = grads(deform_conv2d_reference, detached(f32, torch.float32), seed, torch.float32)
            ref32 = (out32, *grads32)
        bound = FLOAT32_REFERENCE_FACTOR * rel_err(ref32[i], b)
        assert err <= bound, (f"{name}: rel err {err:.2e}, float32 reference {bound / FLOAT32_REFERENCE_FACTOR:.2e} "
                              f"(seed {seed}; {describe(case)})")


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1))
def test_deform_random_cases_match_float64_reference(seed):
    """Random shapes and options (groups, offset groups, mask, bias, stride, padding,
    dilation, even kernels, batch 1/2, offsets on and off the borders)."""
    case = random_deform_case(np.random.default_rng(seed), requires_grad=True)
    check_deform_case(case, seed % 2**31)


@pytest.mark.parametrize("options", [
    dict(kernel=(2, 4), stride=(1, 2), padding=(1, 0), dilation=(2, 1)),
    dict(groups=2, offset_groups=3, kernel=3, use_mask=True, use_bias=True, batch=3),
    dict(groups=1, offset_groups=1, kernel=3, stride=2, padding=1, offset_scale=40.0, batch=1),
    dict(kernel=1, use_mask=False, use_bias=False, size=(1, 1), padding=0, stride=1, dilation=1),
    dict(kernel=3, size=(37, 19), in_channels=8, out_channels=6, groups=2, offset_groups=2, batch=2),
], ids=["even-kernel", "groups-offset-groups", "far-offsets", "one-pixel", "larger-map"])
def test_deform_pinned_options(options):
    seed = fresh_seed()
    check_deform_case(random_deform_case(np.random.default_rng(seed), requires_grad=True, **options), seed % 2**31)


@pytest.mark.parametrize("block", ["sample", "pixels"])
def test_deform_chunked_columns_equal_one_chunk(monkeypatch, block):
    """A columns budget of one sample splits the batch; a smaller one splits the output
    pixels too (the kernels then work on a range of pixels)."""
    seed = fresh_seed()
    case = random_deform_case(np.random.default_rng(seed), batch=3, use_mask=True, min_size=4,
                              requires_grad=True)
    args = detached(tensor_args(case), torch.float64)
    whole, whole_g = grads(numba_cpu.deform_conv2d, args, 0)
    out_pixels = whole.shape[2] * whole.shape[3]
    row = case["input"].shape[1] * case["kernel"][0] * case["kernel"][1]
    monkeypatch.setattr(numba_cpu, "COLUMNS_BUDGET", row * (out_pixels if block == "sample" else 2))
    split, split_g = grads(numba_cpu.deform_conv2d, args, 0)
    for a, b in zip((whole, *whole_g), (split, *split_g)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=f"seed {seed}")


def test_deform_gradcheck_float64():
    seed = fresh_seed()
    case = random_deform_case(np.random.default_rng(seed), offset_kinds=("smooth",), use_mask=True,
                              use_bias=True, max_size=5, requires_grad=True)
    args = tensor_args(case)
    assert torch.autograd.gradcheck(numba_cpu.deform_conv2d, args, nondet_tol=1e-12), f"seed {seed}"


def test_deform_half_input_computes_in_float32():
    seed = fresh_seed()
    case = random_deform_case(np.random.default_rng(seed), dtype=torch.float16)
    out = numba_cpu.deform_conv2d(*tensor_args(case))
    ref = deform_conv2d_reference(*tensor_args(case))
    assert out.dtype == torch.float16
    assert rel_err(out, ref) <= 2e-3, f"seed {seed}"


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 5, 7), (1, 17, 9, 130), (3, 64, 8, 8), (1, 40, 64, 64),
                                   (2, 33, 31, 17)])
def test_layout_transposes_equal_torch_permute(shape):
    """The tiled NCHW <-> NHWC copies (odd sizes, partial tiles, P*4 a multiple of 4 KiB)."""
    from edgekit.kernels.numba_layout import to_channels_first, to_channels_last
    x = torch.randn(shape, dtype=torch.float64 if shape[0] == 3 else torch.float32)
    last = to_channels_last(x)
    assert last.is_contiguous() and torch.equal(last, x.permute(0, 2, 3, 1))
    assert torch.equal(to_channels_first(last), x)


def test_deform_weight_updates_between_calls_show():
    """Updates of the weight between calls, in place (an optimizer step), through ``.data``
    (which bumps no version counter: a cache keyed on it would go stale) and by
    replacement, all show in the next call."""
    seed = fresh_seed()
    case = random_deform_case(np.random.default_rng(seed), dtype=torch.float32, min_size=3)
    args = list(tensor_args(case))
    weight = torch.nn.Parameter(args[2].clone())
    args[2] = weight

    def check(msg):
        with torch.no_grad():
            got = numba_cpu.deform_conv2d(*args)
        ref = deform_conv2d_reference(*[t.double() if isinstance(t, torch.Tensor) else t for t in args])
        assert rel_err(got, ref) <= TOL32, f"{msg} (seed {seed})"

    check("first call")
    with torch.no_grad():
        weight.mul_(-2.0)  # an optimizer step: in place, same storage
    check("after an in-place update")
    weight.data.add_(1.0)  # old-style update: same storage, no version bump
    check("after an update through .data")
    weight.data = torch.randn_like(weight)  # new storage
    check("after a replacement")


def test_deform_empty_batch_gives_empty_output_and_gradients():
    x = torch.randn(0, 4, 5, 5, requires_grad=True)
    offset = torch.randn(0, 18, 5, 5, requires_grad=True)
    weight = torch.randn(6, 4, 3, 3, requires_grad=True)
    mask = torch.rand(0, 9, 5, 5, requires_grad=True)
    out = numba_cpu.deform_conv2d(x, offset, weight, None, (1, 1), (1, 1), (1, 1), mask)
    assert out.shape == (0, 6, 5, 5)
    out.sum().backward()
    assert x.grad.shape == x.shape and offset.grad.shape == offset.shape and mask.grad.shape == mask.shape
    assert torch.equal(weight.grad, torch.zeros_like(weight))


def test_deform_channels_last_input_matches_nchw_input():
    """A channels_last input is used in place (no copy); the results are the same: the output
    bit for bit, the gradients to float32 rounding (the backward sums per-thread input-gradient
    buffers, and which thread takes which chunk varies from run to run under load)."""
    seed = fresh_seed()
    case = random_deform_case(np.random.default_rng(seed), dtype=torch.float32, requires_grad=True, min_size=3)
    args = tensor_args(case)
    cl = [args[0].detach().contiguous(memory_format=torch.channels_last).requires_grad_()] + \
        [t.detach().requires_grad_() if isinstance(t, torch.Tensor) else t for t in args[1:]]
    nchw = [t.detach().requires_grad_() if isinstance(t, torch.Tensor) else t for t in args]
    out_cl, grads_cl = grads(numba_cpu.deform_conv2d, cl, seed % 2**31)
    out, grads_nchw = grads(numba_cpu.deform_conv2d, nchw, seed % 2**31)
    assert torch.equal(out_cl, out), f"seed {seed}"
    for a, b in zip(grads_cl, grads_nchw):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"seed {seed}: {m}")


# ----------------------------------------------------------------- routing and modules


def test_available_and_auto_picks_numba_on_cpu(monkeypatch):
    monkeypatch.delenv("EDGEKIT_BACKEND", raising=False)
    assert numba_cpu.unavailable_reason() is None
    assert "numba" in dispatch.available_backends()
    x = torch.randn(1, 2, 2, 3, requires_grad=True)
    assert dispatch.resolve("grn", "auto", x) is numba_cpu.grn
    assert dispatch.resolve("deform_conv2d", "auto", x) is numba_cpu.deform_conv2d


def test_ops_route_to_numba():
    x, gamma, beta = detached(grn_inputs(fresh_seed(), 1, 4, 4, 5, "channels_last"), torch.float32)
    out = ops.grn(x, gamma, beta, backend="numba")
    assert type(out.grad_fn).__name__.startswith("_GRNFunction")
    case = random_deform_case(np.random.default_rng(fresh_seed()), dtype=torch.float32, requires_grad=True)
    c = case
    out = ops.deform_conv2d(c["input"], c["offset"], c["weight"], c["bias"], c["stride"], c["padding"],
                            c["dilation"], c["mask"], backend="numba")
    assert type(out.grad_fn).__name__.startswith("_DeformFunction")


def test_modules_train_through_numba_like_torch():
    """The same module on both backends gives the same parameter gradients."""
    seed = fresh_seed()
    torch.manual_seed(seed % 2**31)
    layers = {b: (DeformConv2d(4, 6, 3, padding=1, offset_groups=2, backend=b), GRN(6, backend=b))
              for b in ("numba", "torch")}
    layers["torch"][0].load_state_dict(layers["numba"][0].state_dict())
    for _, grn in layers.values():
        with torch.no_grad():
            grn.gamma.fill_(0.5)
            grn.beta.fill_(-0.25)
    x = torch.randn(2, 4, 9, 7)
    offset = torch.randn(2, 36, 9, 7) * 2
    mask = torch.rand(2, 18, 9, 7)
    g = {}
    for b, (dcn, grn) in layers.items():
        y = grn(dcn(x, offset, mask).permute(0, 2, 3, 1))
        y.square().mean().backward()
        g[b] = [p.grad for p in (*dcn.parameters(), *grn.parameters())]
    for a, b in zip(g["numba"], g["torch"]):
        assert rel_err(a, b) <= 1e-4, f"seed {seed}"
