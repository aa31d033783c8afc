"""Numba CPU kernels for GRN: a reduction pass and an apply pass, for both layouts.

GRN is memory-bound, so the kernels make the minimum number of passes over the tensor:
one that reduces per-(n, c) sums (``sum u*v``, optionally ``sum u``) and one that applies
a per-(n, c) affine map. The same two kernels serve the forward (``u = v = x``, then
``out = x*A + beta``) and the backward (``u = grad``, ``v = x``, then
``dx = grad*A + x*B``). Partial sums are accumulated in float64 per chunk of rows (the
float32 sum of squares over 128x128 pixels would lose digits) and combined in float64 by
the caller, so the result does not depend on the thread count.

``channels_last`` tensors are viewed as [N, HW, C] (rows of channels: the inner loop over
C is contiguous and vectorises); ``channels_first`` as [N, C, HW] (one contiguous row per
(n, c)). Work is split over batch x chunks of rows so that batch 1 still fills every core.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

_LANES = 8
_OPTS = dict(parallel=True, cache=True, fastmath=False, nogil=True)


@njit(**_OPTS)
def reduce_last(u, v, chunk_rows, want_sum):
    """u, v: [N, R, C] (R = H*W). Returns partial [N, S, 2, C] float64 over S row chunks:
    [:, :, 0] = sum u*v, [:, :, 1] = sum u (only when ``want_sum``)."""
    n_batch, rows, chans = u.shape
    splits = (rows + chunk_rows - 1) // chunk_rows
    part = np.zeros((n_batch, splits, 2, chans), dtype=np.float64)
    for task in prange(n_batch * splits):
        n = task // splits
        s = task - n * splits
        r0 = s * chunk_rows
        r1 = min(rows, r0 + chunk_rows)
        acc = part[n, s, 0]
        tot = part[n, s, 1]
        for r in range(r0, r1):
            ur = u[n, r]
            vr = v[n, r]
            for c in range(chans):
                acc[c] += np.float64(ur[c]) * np.float64(vr[c])
            if want_sum:
                for c in range(chans):
                    tot[c] += ur[c]
    return part


@njit(**_OPTS)
def reduce_first(u, v, want_sum):
    """u, v: [N, C, R]. Returns [N, 2, C] float64: sum u*v and (if ``want_sum``) sum u."""
    n_batch, chans, rows = u.shape
    out = np.zeros((n_batch, 2, chans), dtype=np.float64)
    for task in prange(n_batch * chans):
        n = task // chans
        c = task - n * chans
        ur = u[n, c]
        vr = v[n, c]
        # 8 independent accumulators: without fastmath a single scalar sum is one long
        # dependency chain that neither vectorises nor pipelines.
        acc = np.zeros(_LANES, dtype=np.float64)
        tot = np.zeros(_LANES, dtype=np.float64)
        full = rows - rows % _LANES
        for r0 in range(0, full, _LANES):
            for j in range(_LANES):
                acc[j] += np.float64(ur[r0 + j]) * np.float64(vr[r0 + j])
            if want_sum:
                for j in range(_LANES):
                    tot[j] += ur[r0 + j]
        for r in range(full, rows):
            acc[0] += np.float64(ur[r]) * np.float64(vr[r])
            tot[0] += ur[r]
        out[n, 0, c] = acc.sum()
        out[n, 1, c] = tot.sum() if want_sum else 0.0
    return out


@njit(**_OPTS)
def apply_last(u, a, v, b, beta, out, chunk_rows, use_v):
    """out[n, r, c] = u*a[n, c] + (v*b[n, c] if use_v) + beta[c]; u, v, out: [N, R, C]."""
    n_batch, rows, chans = u.shape
    splits = (rows + chunk_rows - 1) // chunk_rows
    for task in prange(n_batch * splits):
        n = task // splits
        s = task - n * splits
        r0 = s * chunk_rows
        r1 = min(rows, r0 + chunk_rows)
        an = a[n]
        bn = b[n]
        for r in range(r0, r1):
            ur = u[n, r]
            orow = out[n, r]
            if use_v:
                vr = v[n, r]
                for c in range(chans):
                    orow[c] = ur[c] * an[c] + vr[c] * bn[c] + beta[c]
            else:
                for c in range(chans):
                    orow[c] = ur[c] * an[c] + beta[c]


@njit(**_OPTS)
def apply_first(u, a, v, b, beta, out, use_v):
    """out[n, c, r] = u*a[n, c] + (v*b[n, c] if use_v) + beta[c]; u, v, out: [N, C, R]."""
    n_batch, chans, rows = u.shape
    for task in prange(n_batch * chans):
        n = task // chans
        c = task - n * chans
        ur = u[n, c]
        orow = out[n, c]
        ac = a[n, c]
        bc = b[n, c]
        be = beta[c]
        if use_v:
            vr = v[n, c]
            for r in range(rows):
                orow[r] = ur[r] * ac + vr[r] * bc + be
        else:
            for r in range(rows):
                orow[r] = ur[r] * ac + be
