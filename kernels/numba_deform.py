"""Numba CPU kernels for deformable convolution: deformable im2col and its adjoints.

The convolution itself is a GEMM on the columns (done by the caller with torch.matmul,
which is far faster than anything hand-written here); these kernels do the irregular
part, torchvision's rule exactly: kernel point (i, j) of output pixel l = (ho, wo) of
offset group g samples the map at ``y = ho*sh - ph + i*dh + dy``,
``x = wo*sw - pw + j*dw + dx`` bilinearly, corners outside the map reading 0 (which
makes every sample with y <= -1, y >= H, x <= -1 or x >= W zero). Coordinates are
computed in float64 whatever the data type.

Data are channels last: the input as [B, H*W, C] and the columns as [B, L, G*K*C/G]
(per output pixel: weight group, kernel point, channel), so every innermost loop runs
over a contiguous run of channels (four vector loads and four FMAs per SIMD width) and
each weight group's GEMM reads the columns in place. Work is cut into tiles of ``TILE``
output pixels of one (sample, kernel point): a tile's sampling positions, corner indices
and bilinear weights are computed once into small thread-local arrays and reused for
every channel of the offset group.

Columns may cover a range of output pixels only (``l_begin`` and the columns' length),
so that the caller can keep the buffer cache-sized.

- :func:`im2col` (forward): parallel over (b, k, tile).
- :func:`col2im_coord` (backward), parallel over (b, k, tile), samples a tile once for
  both adjoints: grad input scatters ``gcols`` back with the same weights, each thread
  into its own copy of the gradient (summed by the caller): no atomics, no races; grad
  offset and mask take four dot products over the group's channels per pixel, and each
  task owns those outputs.

Kernels are compiled lazily per dtype (float32, float64) and cached on disk
(``cache=True``): the first call of each compiles for a few seconds.
"""

from __future__ import annotations

import math

import numpy as np
from numba import get_thread_id, njit, prange

TILE = 128  # output pixels per task: small enough for L1, large enough to amortise set-up
_OPTS = dict(parallel=True, cache=True, fastmath=False, nogil=True)


def geometry_array(g) -> np.ndarray:
    """Pack a :class:`~edgekit.models.deform.DeformGeometry` into the int64 vector the
    kernels take (one argument instead of ten)."""
    return np.array([g.kernel_h, g.kernel_w, g.stride[0], g.stride[1], g.padding[0], g.padding[1],
                     g.dilation[0], g.dilation[1], g.out_h, g.out_w, g.height, g.width], dtype=np.int64)


@njit(cache=True, fastmath=False, nogil=True)
def _sample_tile(b, g, k, l0, count, offset, mask, use_mask, p, idx, ly, lx, valid, mk):
    """Fill the tile arrays for ``count`` output pixels from ``l0``: clamped corner indices
    ``idx[4]`` (00, 01, 10, 11 = (y0,x0), (y0,x1), (y1,x0), (y1,x1)), fractional parts
    ``ly``, ``lx``, corner validity ``valid[4]`` (1.0 or 0.0) and the mask ``mk``."""
    kw = p[1]
    i = k // kw
    j = k - i * kw
    wo_n = p[9]
    height = p[10]
    width = p[11]
    kk = p[0] * kw
    ch = 2 * (g * kk + k)
    base_y = i * p[6] - p[4]
    base_x = j * p[7] - p[5]
    for q in range(count):
        l = l0 + q
        ho = l // wo_n
        wo = l - ho * wo_n
        y = np.float64(ho * p[2] + base_y) + np.float64(offset[b, ch, l])
        x = np.float64(wo * p[3] + base_x) + np.float64(offset[b, ch + 1, l])
        mk[q] = np.float64(mask[b, g * kk + k, l]) if use_mask else 1.0
        # Outside [-1, H] x [-1, W] (or NaN) every corner is off the map: all zero.
        if not (y >= -1.0 and y <= height and x >= -1.0 and x <= width):
            for c in range(4):
                idx[c, q] = 0
                valid[c, q] = 0.0
            ly[q] = 0.0
            lx[q] = 0.0
            continue
        fy = math.floor(y)
        fx = math.floor(x)
        ly[q] = y - fy
        lx[q] = x - fx
        y0 = int(fy)
        x0 = int(fx)
        y1 = y0 + 1
        x1 = x0 + 1
        vy0 = 0 <= y0 < height
        vy1 = y1 < height
        vx0 = 0 <= x0 < width
        vx1 = x1 < width
        # y0 is in [-1, H] and y1 in [0, H + 1]: clamp both ends (invalid corners
        # keep a zero weight; the clamped index only keeps the read in bounds).
        cy0 = min(max(y0, 0), height - 1) * width
        cy1 = min(y1, height - 1) * width
        cx0 = min(max(x0, 0), width - 1)
        cx1 = min(x1, width - 1)
        idx[0, q] = cy0 + cx0
        idx[1, q] = cy0 + cx1
        idx[2, q] = cy1 + cx0
        idx[3, q] = cy1 + cx1
        valid[0, q] = 1.0 if (vy0 and vx0) else 0.0
        valid[1, q] = 1.0 if (vy0 and vx1) else 0.0
        valid[2, q] = 1.0 if (vy1 and vx0) else 0.0
        valid[3, q] = 1.0 if (vy1 and vx1) else 0.0


@njit(cache=True, fastmath=False, nogil=True)
def _tile_weights(count, ly, lx, valid, mk, wts):
    """Bilinear weights of the four corners times validity and mask, in ``wts.dtype``."""
    for q in range(count):
        hy = 1.0 - ly[q]
        hx = 1.0 - lx[q]
        m = mk[q]
        wts[0, q] = hy * hx * valid[0, q] * m
        wts[1, q] = hy * lx[q] * valid[1, q] * m
        wts[2, q] = ly[q] * hx * valid[2, q] * m
        wts[3, q] = ly[q] * lx[q] * valid[3, q] * m


@njit(cache=True, fastmath=False, nogil=True)
def _column_base(c0, cin_g, kk, k):
    """Offset of channel 0 of kernel point k in a column row laid out [G, K, C/G],
    such that the column of channel c (in the weight group of c0) is ``base + c``."""
    gi = c0 // cin_g
    return gi * kk * cin_g + k * cin_g - gi * cin_g


@njit(**_OPTS)
def im2col(x, offset, mask, use_mask, p, l_begin, segments, cin_g, cols):
    """x: [B, H*W, C] (channels last); offset: [B, 2*og*K, L]; mask: [B, og*K, L]
    (ignored unless ``use_mask``); segments: [S, 3] rows (offset group, c0, c1) of
    channel runs inside one offset group and one weight group; writes
    cols: [B, L, G*K*C/G] (per pixel: weight group, kernel point, channel)."""
    nb = x.shape[0]
    kk = p[0] * p[1]
    og = offset.shape[1] // (2 * kk)
    length = cols.shape[1]
    ntiles = (length + TILE - 1) // TILE
    nseg = segments.shape[0]
    for task in prange(nb * kk * ntiles):
        t = task % ntiles
        rest = task // ntiles
        k = rest % kk
        b = rest // kk
        l0 = t * TILE
        count = min(length, l0 + TILE) - l0
        idx = np.empty((4, TILE), dtype=np.int64)
        valid = np.empty((4, TILE), dtype=np.float64)
        ly = np.empty(TILE, dtype=np.float64)
        lx = np.empty(TILE, dtype=np.float64)
        mk = np.empty(TILE, dtype=np.float64)
        wts = np.empty((4, TILE), dtype=cols.dtype)
        for g in range(og):
            _sample_tile(b, g, k, l_begin + l0, count, offset, mask, use_mask, p, idx, ly, lx, valid, mk)
            _tile_weights(count, ly, lx, valid, mk, wts)
            for si in range(nseg):
                if segments[si, 0] != g:
                    continue
                c0 = segments[si, 1]
                c1 = segments[si, 2]
                base = _column_base(c0, cin_g, kk, k)
                n = c1 - c0
                # Slices indexed from 0: the loop index is then provably non-negative, so
                # Numba's negative-index wraparound does not block vectorisation.
                for q in range(count):
                    dst = cols[b, l0 + q, base + c0:base + c1]
                    x0 = x[b, idx[0, q], c0:c1]
                    x1 = x[b, idx[1, q], c0:c1]
                    x2 = x[b, idx[2, q], c0:c1]
                    x3 = x[b, idx[3, q], c0:c1]
                    w0 = wts[0, q]
                    w1 = wts[1, q]
                    w2 = wts[2, q]
                    w3 = wts[3, q]
                    for c in range(n):
                        dst[c] = w0 * x0[c] + w1 * x1[c] + w2 * x2[c] + w3 * x3[c]


@njit(cache=True, nogil=True, fastmath={"reassoc", "contract", "nsz"})
def _dot4(gr, x0, x1, x2, x3, n):
    """sum(gr*x0), sum(gr*x1), sum(gr*x2), sum(gr*x3) over n elements, in the data type.
    Reassociation lets LLVM keep each sum in SIMD lanes (eight float32 partial sums per
    register); the float32 error over a channel run of 64-512 terms stays ~1e-7 relative."""
    zero = gr.dtype.type(0)
    a = b = e = h = zero
    for c in range(n):
        g = gr[c]
        a += g * x0[c]
        b += g * x1[c]
        e += g * x2[c]
        h += g * x3[c]
    return a, b, e, h


@njit(**_OPTS)
def col2im_coord(gcols, x, offset, mask, use_mask, p, l_begin, segments, cin_g, want_x, gx, want_coord,
                 goffset, gmask):
    """The backward of :func:`im2col` from the columns' gradient gcols[B, L, G*K*C/G], in
    one pass that samples each tile once and reads each gcols row once:

    - ``want_x``: the adjoint w.r.t. x, gx[T, B, H*W, C] += scatter of gcols with the
      bilinear weights. Different pixels scatter into the same input pixel, so each thread
      adds into its own copy ``gx[numba.get_thread_id()]``; the caller sums the T copies.
    - ``want_coord``: the gradients w.r.t. offset ([B, 2*og*K, L]) and mask ([B, og*K, L],
      written only when ``use_mask``), torchvision's ``deformable_col2im_coord``: the
      derivative of the bilinear sample w.r.t. y and x over the valid corners, times the
      mask, from the four dot products D_corner = sum_c gcols[c] * x[corner, c]; each
      task owns these outputs.

    Parallel over (b, k, tile) like :func:`im2col`, so every scatter row covers a whole
    channel run (splitting channels between tasks instead made the per-row overhead
    dominate)."""
    nb = gcols.shape[0]
    kk = p[0] * p[1]
    og = offset.shape[1] // (2 * kk)
    length = gcols.shape[1]
    ntiles = (length + TILE - 1) // TILE
    nseg = segments.shape[0]
    for task in prange(nb * kk * ntiles):
        t = task % ntiles
        rest = task // ntiles
        k = rest % kk
        b = rest // kk
        l0 = t * TILE
        count = min(length, l0 + TILE) - l0
        mine = gx[get_thread_id(), b] if want_x else gx[0, 0]  # gx is a dummy without want_x
        idx = np.empty((4, TILE), dtype=np.int64)
        valid = np.empty((4, TILE), dtype=np.float64)
        ly = np.empty(TILE, dtype=np.float64)
        lx = np.empty(TILE, dtype=np.float64)
        mk = np.empty(TILE, dtype=np.float64)
        wts = np.empty((4, TILE), dtype=gcols.dtype)
        for g in range(og):
            _sample_tile(b, g, k, l_begin + l0, count, offset, mask, use_mask, p, idx, ly, lx, valid, mk)
            _tile_weights(count, ly, lx, valid, mk, wts)
            ch = 2 * (g * kk + k)
            for q in range(count):
                d00 = d01 = d10 = d11 = 0.0
                for si in range(nseg):
                    if segments[si, 0] != g:
                        continue
                    c0 = segments[si, 1]
                    c1 = segments[si, 2]
                    n = c1 - c0
                    base = _column_base(c0, cin_g, kk, k)
                    src = gcols[b, l0 + q, base + c0:base + c1]
                    if want_x:
                        for corner in range(4):
                            w = wts[corner, q]
                            if w == 0:
                                continue
                            dst = mine[idx[corner, q], c0:c1]
                            for c in range(n):
                                dst[c] += w * src[c]
                    if want_coord:
                        a, b_, e, h = _dot4(src, x[b, idx[0, q], c0:c1], x[b, idx[1, q], c0:c1],
                                            x[b, idx[2, q], c0:c1], x[b, idx[3, q], c0:c1], n)
                        d00 += a
                        d01 += b_
                        d10 += e
                        d11 += h
                if not want_coord:
                    continue
                d00 *= valid[0, q]
                d01 *= valid[1, q]
                d10 *= valid[2, q]
                d11 *= valid[3, q]
                fy = ly[q]
                fx = lx[q]
                hy = 1.0 - fy
                hx = 1.0 - fx
                ay = fx * (d11 - d01) + hx * (d10 - d00)
                ax = fy * (d11 - d10) + hy * (d01 - d00)
                am = hy * (hx * d00 + fx * d01) + fy * (hx * d10 + fx * d11)
                goffset[b, ch, l_begin + l0 + q] = ay * mk[q]
                goffset[b, ch + 1, l_begin + l0 + q] = ax * mk[q]
                if use_mask:
                    gmask[b, g * kk + k, l_begin + l0 + q] = am
