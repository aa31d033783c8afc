"""Numba CUDA kernels for GRN and the deformable-convolution im2col.

Kept apart from the launch code (:mod:`edgekit.kernels.numba_cuda`) so that the same
kernels run on a GPU and under the CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``), which
has to be switched on before this module is imported. They mirror the CUDA C++ kernels
in ``kernels/cuda/``; all accumulation is float32 whatever the storage dtype.

NOT YET RUN ON A REAL GPU: tested only under the CUDA simulator.
"""

from __future__ import annotations

import math

from numba import cuda, float32
from numba.extending import register_jitable

# Block shapes are compile-time constants because shared arrays need static sizes.
RED_CL_X = 32  # channels per block, channels_last reduction (one lane per channel)
RED_CL_Y = 8  # rows of H*W walked in parallel per block
RED_CF = 128  # threads per (n, c) plane, channels_first reduction
NORM_THREADS = 128  # threads per sample for the mean over channels
ELEMWISE_THREADS = 256


@cuda.jit
def grn_reduce_cl(x, partial, rows_per_split):
    """partial[s, n, c] = sum of x[n, hw, c]**2 over split s of the H*W rows (NHWC)."""
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    c = cuda.blockIdx.x * RED_CL_X + tx
    n = cuda.blockIdx.y
    s = cuda.blockIdx.z
    hw_count = x.shape[1]
    channels = x.shape[2]
    start = s * rows_per_split
    stop = min(start + rows_per_split, hw_count)
    acc = float32(0.0)
    if c < channels:
        for hw in range(start + ty, stop, RED_CL_Y):
            v = float32(x[n, hw, c])
            acc += v * v
    tile = cuda.shared.array((RED_CL_Y, RED_CL_X), float32)
    tile[ty, tx] = acc
    cuda.syncthreads()
    if ty == 0 and c < channels:
        total = float32(0.0)
        for r in range(RED_CL_Y):
            total += tile[r, tx]
        partial[s, n, c] = total


@cuda.jit
def grn_reduce_cf(x, partial, rows_per_split):
    """partial[s, n, c] = sum of x[n, c, hw]**2 over split s of H*W (NCHW)."""
    t = cuda.threadIdx.x
    c = cuda.blockIdx.x
    n = cuda.blockIdx.y
    s = cuda.blockIdx.z
    hw_count = x.shape[2]
    start = s * rows_per_split
    stop = min(start + rows_per_split, hw_count)
    acc = float32(0.0)
    for hw in range(start + t, stop, RED_CF):
        v = float32(x[n, c, hw])
        acc += v * v
    buf = cuda.shared.array(RED_CF, float32)
    buf[t] = acc
    cuda.syncthreads()
    width = RED_CF // 2
    while width > 0:
        if t < width:
            buf[t] += buf[t + width]
        cuda.syncthreads()
        width //= 2
    if t == 0:
        partial[s, n, c] = buf[0]


@cuda.jit
def grn_norm(partial, nx, eps):
    """nx[n, c] = Gx / (mean_c Gx + eps) with Gx = sqrt(sum of the split partials)."""
    t = cuda.threadIdx.x
    n = cuda.blockIdx.x
    splits = partial.shape[0]
    channels = partial.shape[2]
    acc = float32(0.0)
    for c in range(t, channels, NORM_THREADS):
        sq = float32(0.0)
        for s in range(splits):
            sq += partial[s, n, c]
        g = math.sqrt(sq)
        nx[n, c] = g
        acc += g
    buf = cuda.shared.array(NORM_THREADS, float32)
    buf[t] = acc
    cuda.syncthreads()
    width = NORM_THREADS // 2
    while width > 0:
        if t < width:
            buf[t] += buf[t + width]
        cuda.syncthreads()
        width //= 2
    denom = buf[0] / float32(channels) + float32(eps)
    for c in range(t, channels, NORM_THREADS):
        nx[n, c] = nx[n, c] / denom


@cuda.jit
def grn_apply_cl(x, nx, gamma, beta, out):
    """out = gamma * (x * nx) + beta + x on a flat NHWC view (x is [N, H*W*C])."""
    i = cuda.grid(1)
    per_sample = x.shape[1]
    channels = gamma.shape[0]
    if i < x.shape[0] * per_sample:
        n = i // per_sample
        j = i - n * per_sample
        c = j % channels
        v = float32(x[n, j])
        out[n, j] = float32(gamma[c]) * (v * nx[n, c]) + float32(beta[c]) + v


@cuda.jit
def grn_apply_cf(x, nx, gamma, beta, out):
    """The NCHW twin of :func:`grn_apply_cl` (x is [N, C*H*W])."""
    i = cuda.grid(1)
    per_sample = x.shape[1]
    channels = gamma.shape[0]
    hw_count = per_sample // channels
    if i < x.shape[0] * per_sample:
        n = i // per_sample
        j = i - n * per_sample
        c = j // hw_count
        v = float32(x[n, j])
        out[n, j] = float32(gamma[c]) * (v * nx[n, c]) + float32(beta[c]) + v


@register_jitable  # inlined into the caller: no device needed to compile for a given cc
def _pixel(img, b, c, y, x, height, width):
    if 0 <= y < height and 0 <= x < width:
        return float32(img[b, c, y, x])
    return float32(0.0)


@register_jitable
def bilinear(img, b, c, y, x):
    """torchvision's bilinear sample: zero outside (-1, H) x (-1, W), zero corners outside."""
    height = img.shape[2]
    width = img.shape[3]
    if y <= -1.0 or y >= height or x <= -1.0 or x >= width:
        return float32(0.0)
    y0 = int(math.floor(y))
    x0 = int(math.floor(x))
    ly = y - y0
    lx = x - x0
    hy = float32(1.0) - ly
    hx = float32(1.0) - lx
    return (hy * hx * _pixel(img, b, c, y0, x0, height, width)
            + hy * lx * _pixel(img, b, c, y0, x0 + 1, height, width)
            + ly * hx * _pixel(img, b, c, y0 + 1, x0, height, width)
            + ly * lx * _pixel(img, b, c, y0 + 1, x0 + 1, height, width))


@cuda.jit
def deform_im2col(img, offset, mask, use_mask, kh, kw, sh, sw, ph, pw, dh, dw,
                  offset_groups, columns):
    """One thread per column element: columns[b, (c*kh + i)*kw + j, ho*Wo + wo].

    img [B, C, H, W]; offset [B, 2*og*kh*kw, Ho, Wo] as (dy, dx) per kernel point;
    mask [B, og*kh*kw, Ho, Wo] (ignored unless use_mask).
    """
    idx = cuda.grid(1)
    batch = columns.shape[0]
    channels = img.shape[1]
    out_w = offset.shape[3]
    out_h = offset.shape[2]
    if idx >= batch * channels * kh * kw * out_h * out_w:
        return
    wo = idx % out_w
    rest = idx // out_w
    ho = rest % out_h
    rest //= out_h
    j = rest % kw
    rest //= kw
    i = rest % kh
    rest //= kh
    c = rest % channels
    b = rest // channels
    g = c // (channels // offset_groups)
    point = (g * kh + i) * kw + j
    dy = float32(offset[b, 2 * point, ho, wo])
    dx = float32(offset[b, 2 * point + 1, ho, wo])
    y = float32(ho * sh - ph + i * dh) + dy
    x = float32(wo * sw - pw + j * dw) + dx
    val = bilinear(img, b, c, y, x)
    if use_mask:
        val *= float32(mask[b, point, ho, wo])
    columns[b, (c * kh + i) * kw + j, ho * out_w + wo] = val
