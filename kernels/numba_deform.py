"""Numba CPU kernels for deformable convolution: deformable im2col and its two adjoints.

The convolution itself is a GEMM on the columns (done by the caller with torch.matmul,
which is far faster than anything hand-written here); these kernels do the irregular
part, torchvision's rule exactly: kernel point (i, j) of output pixel l = (ho, wo) of
offset group g samples the map at ``y = ho*sh - ph + i*dh + dy``,
``x = wo*sw - pw + j*dw + dx`` bilinearly, corners outside the map reading 0 (which
makes every sample with y <= -1, y >= H, x <= -1 or x >= W zero). Coordinates are
computed in float64 whatever the data type.

Work is cut into tiles of ``TILE`` output pixels of one (sample, offset group, kernel
point): the tile's sampling positions, corner indices and bilinear weights are computed
once into small thread-local arrays and reused for every channel of the offset group,
so the per-element inner loop is four gathers and four multiply-adds.

- :func:`im2col` (forward): ``cols[b, c*K + k, l]``; parallel over (b, g, k, tile).
- :func:`col2im` (grad input): scatters ``gcols`` back with the same weights. Tasks own
  whole channels (parallel over b x g x channel chunks), so no two threads ever write the
  same input pixel: no atomics, deterministic.
- :func:`col2coord` (grad offset and mask): per (b, g, k, tile), sums over the channels
  of the group; each task owns its outputs.

Kernels are compiled lazily per dtype (float32, float64) and cached on disk
(``cache=True``): the first call of each compiles for a few seconds.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

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


@njit(**_OPTS)
def im2col(x, offset, mask, use_mask, p, cols):
    """x: [B, C, H*W]; offset: [B, 2*og*K, L]; mask: [B, og*K, L] (ignored unless
    ``use_mask``); writes cols: [B, C*K, L]."""
    nb, chans, _ = x.shape
    kk = p[0] * p[1]
    og = offset.shape[1] // (2 * kk)
    cpg = chans // og
    length = cols.shape[2]
    ntiles = (length + TILE - 1) // TILE
    for task in prange(nb * og * kk * ntiles):
        t = task % ntiles
        rest = task // ntiles
        k = rest % kk
        rest //= kk
        g = rest % og
        b = rest // og
        l0 = t * TILE
        count = min(length, l0 + TILE) - l0
        idx = np.empty((4, TILE), dtype=np.int64)
        valid = np.empty((4, TILE), dtype=np.float64)
        ly = np.empty(TILE, dtype=np.float64)
        lx = np.empty(TILE, dtype=np.float64)
        mk = np.empty(TILE, dtype=np.float64)
        wts = np.empty((4, TILE), dtype=cols.dtype)
        _sample_tile(b, g, k, l0, count, offset, mask, use_mask, p, idx, ly, lx, valid, mk)
        _tile_weights(count, ly, lx, valid, mk, wts)
        for c in range(g * cpg, (g + 1) * cpg):
            plane = x[b, c]
            row = cols[b, c * kk + k]
            for q in range(count):
                row[l0 + q] = (wts[0, q] * plane[idx[0, q]] + wts[1, q] * plane[idx[1, q]]
                               + wts[2, q] * plane[idx[2, q]] + wts[3, q] * plane[idx[3, q]])


@njit(**_OPTS)
def col2im(gcols, offset, mask, use_mask, p, chunks, gx):
    """Adjoint of :func:`im2col` w.r.t. x: gx[B, C, H*W] += scatter of gcols[B, C*K, L].

    Parallel over (b, offset group, channel chunk); a task owns its channels' planes."""
    nb, chans, _ = gx.shape
    kk = p[0] * p[1]
    og = offset.shape[1] // (2 * kk)
    cpg = chans // og
    per_chunk = (cpg + chunks - 1) // chunks
    length = gcols.shape[2]
    ntiles = (length + TILE - 1) // TILE
    for task in prange(nb * og * chunks):
        ci = task % chunks
        rest = task // chunks
        g = rest % og
        b = rest // og
        c0 = g * cpg + ci * per_chunk
        c1 = min((g + 1) * cpg, c0 + per_chunk)
        if c0 >= c1:
            continue
        idx = np.empty((4, TILE), dtype=np.int64)
        valid = np.empty((4, TILE), dtype=np.float64)
        ly = np.empty(TILE, dtype=np.float64)
        lx = np.empty(TILE, dtype=np.float64)
        mk = np.empty(TILE, dtype=np.float64)
        wts = np.empty((4, TILE), dtype=gx.dtype)
        for k in range(kk):
            for t in range(ntiles):
                l0 = t * TILE
                count = min(length, l0 + TILE) - l0
                _sample_tile(b, g, k, l0, count, offset, mask, use_mask, p, idx, ly, lx, valid, mk)
                _tile_weights(count, ly, lx, valid, mk, wts)
                for c in range(c0, c1):
                    plane = gx[b, c]
                    row = gcols[b, c * kk + k]
                    for q in range(count):
                        v = row[l0 + q]
                        plane[idx[0, q]] += wts[0, q] * v
                        plane[idx[1, q]] += wts[1, q] * v
                        plane[idx[2, q]] += wts[2, q] * v
                        plane[idx[3, q]] += wts[3, q] * v


@njit(**_OPTS)
def col2coord(gcols, x, offset, mask, use_mask, p, goffset, gmask):
    """Gradients w.r.t. offset ([B, 2*og*K, L]) and mask ([B, og*K, L], written only when
    ``use_mask``), torchvision's ``deformable_col2im_coord``: the derivative of the
    bilinear sample w.r.t. y and x over the valid corners, times the mask."""
    nb, chans, _ = x.shape
    kk = p[0] * p[1]
    og = offset.shape[1] // (2 * kk)
    cpg = chans // og
    length = gcols.shape[2]
    ntiles = (length + TILE - 1) // TILE
    for task in prange(nb * og * kk * ntiles):
        t = task % ntiles
        rest = task // ntiles
        k = rest % kk
        rest //= kk
        g = rest % og
        b = rest // og
        l0 = t * TILE
        count = min(length, l0 + TILE) - l0
        idx = np.empty((4, TILE), dtype=np.int64)
        valid = np.empty((4, TILE), dtype=np.float64)
        ly = np.empty(TILE, dtype=np.float64)
        lx = np.empty(TILE, dtype=np.float64)
        mk = np.empty(TILE, dtype=np.float64)
        acc_y = np.zeros(TILE, dtype=np.float64)
        acc_x = np.zeros(TILE, dtype=np.float64)
        acc_m = np.zeros(TILE, dtype=np.float64)
        _sample_tile(b, g, k, l0, count, offset, mask, use_mask, p, idx, ly, lx, valid, mk)
        for c in range(g * cpg, (g + 1) * cpg):
            plane = x[b, c]
            row = gcols[b, c * kk + k]
            for q in range(count):
                v00 = plane[idx[0, q]] * valid[0, q]
                v01 = plane[idx[1, q]] * valid[1, q]
                v10 = plane[idx[2, q]] * valid[2, q]
                v11 = plane[idx[3, q]] * valid[3, q]
                gc = np.float64(row[l0 + q])
                fy = ly[q]
                fx = lx[q]
                acc_y[q] += gc * (fx * (v11 - v01) + (1.0 - fx) * (v10 - v00))
                acc_x[q] += gc * (fy * (v11 - v10) + (1.0 - fy) * (v01 - v00))
                acc_m[q] += gc * ((1.0 - fy) * ((1.0 - fx) * v00 + fx * v01) + fy * ((1.0 - fx) * v10 + fx * v11))
        ch = 2 * (g * kk + k)
        for q in range(count):
            goffset[b, ch, l0 + q] = acc_y[q] * mk[q]
            goffset[b, ch + 1, l0 + q] = acc_x[q] * mk[q]
            if use_mask:
                gmask[b, g * kk + k, l0 + q] = acc_m[q]
