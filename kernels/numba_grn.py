"""Numba CPU kernels for GRN: one compiled call per forward and one per backward.

GRN is memory-bound and, on the late ConvNeXt stages (7x7 to 16x16), overhead-bound, so:

- **One dispatch per call.** ``grn_last`` (NHWC) and ``grn_first`` (NCHW) do the
  reduction, the per-(n, c) statistics (norm, mean over channels, ``scale = 1 + gamma*Nx``)
  and the apply (``out = x*scale + beta``) in one ``njit`` call, writing into an output the
  caller allocated; the backward is the same kernel with ``backward=True`` (``dx =
  grad*scale + x*coef``, ``dgamma``, ``dbeta``). The previous version (two kernels and a
  dozen numpy ops on [N, C] statistics) spent 0.1-0.2 ms per call outside its kernels;
  a 1x7x7x320 forward is now ~16 us, of which the Numba dispatch is ~3 us, the work ~3 us
  and the wrapper's tensor-to-array conversions most of the rest.
- **The forward's sum of squares in the input precision, in short blocks.** A float32
  tensor is summed in float32 (8 AVX2 lanes, where float64 gets 4 plus conversions) over
  blocks of ``_BLOCK_ROWS`` rows (channels_last, four rows per accumulator update) or
  ``_ROW_BLOCK`` elements (channels_first, reassociated by LLVM into 2x8 lanes); each
  block's sum is added to a float64 total. Squares do not cancel, so the error is that of
  a 64- or 1024-term float32 sum: ~1e-8 on the norms at 128x128 pixels, where one float32
  sum over all pixels is ~1e-6 off. The backward's sums (grad*x, grad) do cancel and are
  summed in float64, as before.
- **Loops that vectorise.** Rows are indexed, never sliced (a view per 40-channel row
  costs more than the row), flags are tested outside loops, and the apply walks flat
  groups of rows whose length is a multiple of 32 elements against tiled coefficients,
  with unsigned indices (Numba's negative-index wraparound would turn loads into gathers).
- **Fixed work split, three ways to run it.** channels_last samples are cut into chunks of
  ``chunk_bytes`` of rows, channels_first into (n, c) planes; chunk totals are combined in
  order, so results are bit-identical whichever way runs and on any number of threads:
  the serial build (``*_serial``, for small tensors); the parallel build with one sample
  per task (``fused``: reduce, stats and apply of a sample back to back, so the apply
  re-reads the sample from cache and a tensor larger than the cache crosses the memory
  bus once each way instead of twice in and once out); or two parallel passes over chunks.
  The caller (:mod:`edgekit.kernels.numba_cpu`) picks by size.
- **Streaming stores for outputs larger than the cache.** An ordinary store first reads
  the line it overwrites; a forward output of at least ``stream_bytes`` (channels_last,
  C a multiple of 8, 32-byte aligned) is written with non-temporal stores instead
  (:mod:`edgekit.kernels.numba_stream`), which spares that read: bit-identical results,
  6-20% off the 20-40 MiB forwards. channels_first and the backward use ordinary stores.

Parallel runs use Numba's OpenMP pool, torch uses its own (a second libgomp): on a
machine with as many threads as cores, a parallel GRN right after a parallel torch op can
wait milliseconds while torch's workers spin, and the other way round. Set
``OMP_WAIT_POLICY=PASSIVE`` (or ``NUMBA_NUM_THREADS=1``) when GRN runs inside a model there.
"""

from __future__ import annotations

import types

import numpy as np
from numba import config, njit, prange

from edgekit.kernels.numba_stream import ALIGN_BYTES, LANES as STREAM_LANES, store_fence, stream_affine8

MAX_THREADS = config.NUMBA_NUM_THREADS  # what the caller plans with (a plan never changes results)
_LANES = 32  # elements per iteration of a vectorised loop (8 AVX2 lanes x 4 interleaved)
_BLOCK_ROWS = 64  # channels_last rows summed in the input precision per float64 add
_ROW_BLOCK = 1024  # channels_first elements likewise
_KERNEL = dict(parallel=True, cache=True, nogil=True, error_model="numpy")
_SERIAL = dict(_KERNEL, parallel=False)
_PLAIN = dict(nogil=True, error_model="numpy")
# Only the innermost loops: reassociation lets LLVM vectorise the block sums; no nnan/ninf,
# so infinities and NaNs propagate as in the reference.
_VECTOR = dict(nogil=True, error_model="numpy", fastmath={"reassoc", "contract", "nsz"})


# ------------------------------------------------------------------ inner loops


@njit(**_VECTOR)
def _dot64(u, v):
    """sum(u*v) of a 1-D block in float64."""
    s = 0.0
    for i in range(u.shape[0]):
        s += np.float64(u[i]) * np.float64(v[i])
    return s


@njit(**_VECTOR)
def _sumsq(u):
    """sum(u*u) of a non-empty 1-D block, in its own precision."""
    s = u[0] * u[0]
    for i in range(1, u.shape[0]):
        s += u[i] * u[i]
    return s


@njit(**_VECTOR)
def _total64(u):
    s = 0.0
    for i in range(u.shape[0]):
        s += u[i]
    return s


@njit(**_VECTOR)
def _sumsq_rows(u, r0, r1, acc):
    """acc += sum over rows r0:r1 of u*u (u: [rows, C]; the loop over C vectorises).
    Rows are indexed, not sliced (a view per row costs more than a 40-channel row), and
    taken four at a time so that acc is loaded and stored once per four rows."""
    r = r0
    while r + 4 <= r1:
        for k in range(acc.shape[0]):
            a, b, c, d = u[r, k], u[r + 1, k], u[r + 2, k], u[r + 3, k]
            acc[k] += (a * a + b * b) + (c * c + d * d)
        r += 4
    for q in range(r, r1):
        for k in range(acc.shape[0]):
            acc[k] += u[q, k] * u[q, k]


@njit(**_VECTOR)
def _dot_rows64(u, v, r0, r1, acc):
    """acc += sum over rows r0:r1 of u*v, in float64 (acc is float64)."""
    for r in range(r0, r1):
        for k in range(acc.shape[0]):
            acc[k] += np.float64(u[r, k]) * np.float64(v[r, k])


@njit(**_VECTOR)
def _sum_rows1(u, r0, r1, acc):
    for r in range(r0, r1):
        for k in range(acc.shape[0]):
            acc[k] += u[r, k]


@njit(**_VECTOR)
def _affine(out, u, a, v, b, beta, use_v):
    """out = u*a + (v*b if ``use_v``) + beta elementwise over 1-D blocks. The flag is
    tested once, outside the loops, or neither loop vectorises."""
    if use_v:
        for i in range(out.shape[0]):
            out[i] = u[i] * a[i] + v[i] * b[i] + beta[i]
    else:
        for i in range(out.shape[0]):
            out[i] = u[i] * a[i] + beta[i]


@njit(**_VECTOR)
def _plane_affine(out, u, a, v, b, beta, use_v):
    """out = u*a + (v*b if ``use_v``) + beta, with scalar a, b, beta (a channels_first
    plane)."""
    if use_v:
        for i in range(out.shape[0]):
            out[i] = u[i] * a + v[i] * b + beta
    else:
        for i in range(out.shape[0]):
            out[i] = u[i] * a + beta


# ------------------------------------------------------------- per-task pieces


@njit(**_PLAIN)
def _reduce_rows(u, v, r0, r1, want_sum, dst):
    """dst[0] = sum of u*v over rows r0:r1, dst[1] = sum of u (if ``want_sum``), float64,
    for u, v: [rows, C] (one channels_last sample). Without ``want_sum`` (the forward) v is
    u: a sum of squares, summed in the input precision over blocks of ``_BLOCK_ROWS`` rows.
    The backward's sums (grad*x, grad) cancel, so they are summed in float64 throughout."""
    dst[:] = 0.0
    if want_sum:
        _dot_rows64(u, v, r0, r1, dst[0])
        _sum_rows1(u, r0, r1, dst[1])
        return
    acc = np.empty(u.shape[1], u.dtype)
    for b0 in range(r0, r1, _BLOCK_ROWS):
        acc[:] = 0
        _sumsq_rows(u, b0, min(r1, b0 + _BLOCK_ROWS), acc)
        for k in range(acc.shape[0]):
            dst[0, k] += acc[k]


@njit(**_PLAIN)
def _affine_rows(out, u, at, v, bt, betat, r0, r1, use_v, stream):
    """out = u*a + (v*b if ``use_v``) + beta over rows r0:r1 of [rows, C] arrays, with a,
    b, beta per channel given as m-fold tiles (``_tile``). A loop over one row of C = 40
    channels vectorises 32 and leaves 8 to scalar code; so rows are taken in groups of m
    whose C*m elements are a multiple of ``_LANES`` (C = 40: m = 4, 5 full iterations).
    ``stream`` (forward only): streaming stores where the rows are aligned for them."""
    c = out.shape[1]
    m = at.shape[0] // c
    of, uf, vf = out.reshape(-1), u.reshape(-1), v.reshape(-1)
    groups = (r1 - r0) // m
    if use_v:
        _tiles2(of, uf, at, vf, bt, r0 * c, (r0 + groups * m) * c)
    elif stream:
        _tiles1_stream(of, uf, at, betat, r0 * c, (r0 + groups * m) * c)
    else:
        _tiles1(of, uf, at, betat, r0 * c, (r0 + groups * m) * c)
    for r in range(r0 + groups * m, r1):
        _affine(out[r], u[r], at[:c], v[r], bt[:c], betat[:c], use_v)


@njit(**_PLAIN)
def _tile_length(c):
    """C*m, the shortest multiple of C that is a multiple of ``_LANES``."""
    p, q = c, _LANES
    while q:
        p, q = q, p % q
    return c * (_LANES // p)


@njit(**_PLAIN)
def _tile(t, c):
    """Repeat t[:c] over the rest of t (whose length is a multiple of c)."""
    for j in range(c, t.shape[0]):
        t[j] = t[j - c]


@njit(**_VECTOR)
def _tiles1(of, uf, at, betat, e0, e1):
    """of = uf*at + betat over flat elements e0:e1, in groups of len(at) elements (tiles of
    the per-channel coefficients). Unsigned indices: Numba then emits no negative-index
    wraparound, which would turn the loads into gathers."""
    length = at.shape[0]
    for g0 in range(e0, e1, length):
        for j in range(length):
            i = np.uintp(g0 + j)
            of[i] = uf[i] * at[j] + betat[j]


@njit(**_PLAIN)
def _tiles1_stream(of, uf, at, betat, e0, e1):
    """``_tiles1`` with streaming stores, for an output larger than the cache, which would
    otherwise be read in before it is overwritten; ordinary stores unless ``of[e0]`` is
    32-byte aligned and len(at) a multiple of 8."""
    length = at.shape[0]
    if length % STREAM_LANES or (of.ctypes.data + e0 * of.itemsize) % ALIGN_BYTES:
        _tiles1(of, uf, at, betat, e0, e1)  # a misaligned streaming store would fault
        return
    for g0 in range(e0, e1, length):
        for j in range(0, length, STREAM_LANES):
            stream_affine8(of, uf, at, betat, np.uintp(g0 + j), np.uintp(j))
    store_fence()


@njit(**_VECTOR)
def _tiles2(of, uf, at, vf, bt, e0, e1):
    """of = uf*at + vf*bt, as ``_tiles1`` (the backward: beta is 0)."""
    length = at.shape[0]
    for g0 in range(e0, e1, length):
        for j in range(length):
            i = np.uintp(g0 + j)
            of[i] = uf[i] * at[j] + vf[i] * bt[j]


@njit(**_PLAIN)
def _reduce_plane(u, v, want_sum, dst):
    """dst[0] = sum(u*v), dst[1] = sum(u) (if ``want_sum``) of one channels_first plane, as
    ``_reduce_rows``: the forward's sum of squares in blocks of ``_ROW_BLOCK`` elements in
    the input precision, the backward's cancelling sums in float64."""
    n = u.shape[0]
    s = 0.0
    t = 0.0
    for i0 in range(0, n, _ROW_BLOCK):
        i1 = min(n, i0 + _ROW_BLOCK)
        if want_sum:
            s += _dot64(u[i0:i1], v[i0:i1])
            t += _total64(u[i0:i1])
        else:
            s += _sumsq(u[i0:i1])
    dst[0] = s
    dst[1] = t


@njit(**_PLAIN)
def _combine(part, sums):
    """sums[j, k] = sum over chunks s (in order) of part[s, j, k]."""
    sums[:] = 0.0
    for s in range(part.shape[0]):
        for j in range(part.shape[1]):
            for k in range(part.shape[2]):
                sums[j, k] += part[s, j, k]


@njit(**_PLAIN)
def _forward_stats(sumsq, gamma, eps, gx, scale):
    """One sample: gx = sqrt(sum x^2); scale = 1 + gamma * gx / (mean_C gx + eps)."""
    c = sumsq.shape[0]
    mean = 0.0
    for k in range(c):
        gx[k] = np.sqrt(sumsq[k])
        mean += gx[k]
    denom = mean / c + eps
    for k in range(c):
        scale[k] = 1.0 + gamma[k] * (gx[k] / denom)


@njit(**_PLAIN)
def _backward_stats(s, gx, gamma, eps, scale, coef):
    """One sample, with s = sum_HW grad*x: scale = 1 + gamma*Nx and coef = dL/dG / G
    (0 where G = 0, as torch.norm's gradient), where dL/dNx = gamma*s =: a and
    dL/dG_c = a_c/(M+eps) - sum_k a_k G_k / (C (M+eps)^2), M = mean_C G."""
    c = gx.shape[0]
    mean = 0.0
    for k in range(c):
        mean += gx[k]
    denom = mean / c + eps
    t = 0.0
    for k in range(c):
        t += gamma[k] * s[k] * gx[k]
    t /= c * denom * denom
    for k in range(c):
        d_g = gamma[k] * s[k] / denom - t
        coef[k] = d_g / gx[k] if gx[k] > 0 else 0.0
        scale[k] = 1.0 + gamma[k] * (gx[k] / denom)


@njit(**_PLAIN)
def _stats(sums, gamma, eps, gx, a, b, backward):
    """One sample's per-channel coefficients of the apply: forward a = scale (and gx is
    written); backward a = scale, b = coef (gx is read)."""
    if backward:
        _backward_stats(sums[0], gx, gamma, eps, a, b)
    else:
        _forward_stats(sums[0], gamma, eps, gx, a)


@njit(**_PLAIN)
def _result(sums, gx, eps, backward):
    """forward: gx [N, C]; backward: [2, C] (dgamma = sum_n Nx*s, dbeta = sum_n sum_HW grad,
    in order of n), from sums [N, 2, C] of grad*x and grad."""
    if not backward:
        return gx
    n, c = gx.shape
    grads = np.zeros((2, c))
    for i in range(n):
        mean = 0.0
        for k in range(c):
            mean += gx[i, k]
        denom = mean / c + eps
        for k in range(c):
            grads[0, k] += gx[i, k] / denom * sums[i, 0, k]
            grads[1, k] += sums[i, 1, k]
    return grads


@njit(**_PLAIN)
def _streams(out, c, backward, stream_bytes):
    """Whether the apply writes ``out`` [N, H, W, C] with streaming stores: a forward
    output of at least ``stream_bytes``, 32-byte aligned, C a multiple of 8 (so
    every row and tile starts aligned)."""
    return (not backward and out.size * out.itemsize >= stream_bytes
            and c % STREAM_LANES == 0 and out.ctypes.data % ALIGN_BYTES == 0)


# -------------------------------------------------------------------- kernels
#
# One kernel per layout serves the forward (u = v = x, out = x*scale + beta; fills gx and
# returns it) and the backward (u = grad, v = x, beta = 0, out = dx = grad*scale + x*coef,
# skipped unless ``apply``; reads gx, returns [dgamma, dbeta]). ``fused``: one sample per
# task (reduce, stats, apply); else a parallel reduction over chunks, the statistics, and a
# parallel apply. Both give bit-identical results.


def grn_last(u4, v4, gamma, beta, gx, eps, out4, backward, apply, chunk_bytes, fused, stream_bytes):
    """NHWC; a task reduces or applies ``chunk_bytes`` of rows of one sample. A forward
    output of at least ``stream_bytes`` is written with streaming stores when
    they apply (32-byte aligned rows of a multiple of 8 channels)."""
    n, h, w, c = u4.shape
    stream = _streams(out4, c, backward, stream_bytes)
    rows = h * w
    u = u4.reshape((n, rows, c))
    v = v4.reshape((n, rows, c))
    out = out4.reshape((n, rows, c))
    step = max(1, chunk_bytes // max(1, c * u.itemsize))
    splits = (rows + step - 1) // step
    part = np.empty((n, splits, 2, c))
    sums = np.empty((n, 2, c))
    length = _tile_length(c)  # the apply's coefficients, tiled once per sample
    a = np.empty((n, length), u.dtype)
    b = np.zeros((n, length), u.dtype)
    betat = np.empty(length, u.dtype)
    betat[:c] = beta
    _tile(betat, c)
    if fused:
        for i in prange(n):
            for s in range(splits):
                _reduce_rows(u[i], v[i], s * step, min(rows, s * step + step), backward, part[i, s])
            _combine(part[i], sums[i])
            _stats(sums[i], gamma, eps, gx[i], a[i, :c], b[i, :c], backward)
            _tile(a[i], c)
            _tile(b[i], c)
            if apply:
                _affine_rows(out[i], u[i], a[i], v[i], b[i], betat, 0, rows, backward, stream)
    else:
        for t in prange(n * splits):
            i, s = t // splits, t % splits
            _reduce_rows(u[i], v[i], s * step, min(rows, s * step + step), backward, part[i, s])
        for i in range(n):
            _combine(part[i], sums[i])
            _stats(sums[i], gamma, eps, gx[i], a[i, :c], b[i, :c], backward)
            _tile(a[i], c)
            _tile(b[i], c)
        for t in prange(n * splits if apply else 0):
            i, s = t // splits, t % splits
            _affine_rows(out[i], u[i], a[i], v[i], b[i], betat, s * step, min(rows, s * step + step), backward,
                         stream)
    return _result(sums, gx, eps, backward)


def grn_first(u4, v4, gamma, beta, gx, eps, out4, backward, apply, chunk_bytes, fused, stream_bytes):
    """NCHW; a task is one (n, c) plane (``chunk_bytes`` and ``stream_bytes`` are unused:
    no streaming stores for this layout yet)."""
    n, c, h, w = u4.shape
    u = u4.reshape((n, c, h * w))
    v = v4.reshape((n, c, h * w))
    out = out4.reshape((n, c, h * w))
    sums = np.empty((n, 2, c))
    a = np.empty((n, c), u.dtype)
    b = np.zeros((n, c), u.dtype)
    if fused:
        for i in prange(n):
            for k in range(c):
                _reduce_plane(u[i, k], v[i, k], backward, sums[i, :, k])
            _stats(sums[i], gamma, eps, gx[i], a[i], b[i], backward)
            for k in range(c if apply else 0):
                _plane_affine(out[i, k], u[i, k], a[i, k], v[i, k], b[i, k], beta[k], backward)
    else:
        for t in prange(n * c):
            i, k = t // c, t % c
            _reduce_plane(u[i, k], v[i, k], backward, sums[i, :, k])
        for i in range(n):
            _stats(sums[i], gamma, eps, gx[i], a[i], b[i], backward)
        for t in prange(n * c if apply else 0):
            i, k = t // c, t % c
            _plane_affine(out[i, k], u[i, k], a[i, k], v[i, k], b[i, k], beta[k], backward)
    return _result(sums, gx, eps, backward)


def _dispatcher(fn, suffix, **opts):
    """``njit(**opts)`` of a renamed copy of ``fn``: the parallel and the serial build of one
    kernel need their own on-disk cache entries, which Numba names after the function."""
    clone = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + suffix, fn.__defaults__, fn.__closure__)
    clone.__qualname__ = fn.__qualname__ + suffix
    clone.__doc__ = fn.__doc__
    return njit(**opts)(clone)


# The serial builds run small tensors: a parallel launch costs more than their work, and on
# a shared machine its barrier can wait a whole scheduler slice for a descheduled worker.
grn_last_serial = _dispatcher(grn_last, "_serial", **_SERIAL)
grn_first_serial = _dispatcher(grn_first, "_serial", **_SERIAL)
grn_last = njit(**_KERNEL)(grn_last)
grn_first = njit(**_KERNEL)(grn_first)
