"""Numba CPU layout changes: NCHW <-> NHWC copies for the deformable convolution.

``x.permute(0, 2, 3, 1).contiguous()`` runs at 2-4 GB/s in torch 2.13 on the 2-core EPYC
(a 1 MiB NCHW map takes ~0.5 ms, ten times a plain copy); a tiled transpose whose inner
loop walks pixels (contiguous on the NCHW side, a stride of C on the other) takes 2-3x
less.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

_CHANNELS, _PIXELS = 16, 64  # a tile (L1-sized)


@njit(parallel=True, cache=True, nogil=True)
def _transpose(src, dst, to_last):
    """NCHW -> NHWC (``to_last``: src [B, C, P], dst [B, P, C]) or back (src [B, P, C],
    dst [B, C, P]), in tiles of channels x pixels; tasks are (b, channel tile, pixel tile).
    The inner loop runs over pixels both ways: the NCHW side is then read or written
    contiguously and the NHWC side with a stride of C elements. (A stride of P on the NCHW
    side instead maps a tile's rows to a few cache sets when P*4 is a multiple of 4 KiB.)"""
    nb = src.shape[0]
    channels = src.shape[1] if to_last else src.shape[2]
    pixels = src.shape[2] if to_last else src.shape[1]
    tc = (channels + _CHANNELS - 1) // _CHANNELS
    tp = (pixels + _PIXELS - 1) // _PIXELS
    for task in prange(nb * tc * tp):
        b = task // (tc * tp)
        c0 = (task // tp) % tc * _CHANNELS
        p0 = task % tp * _PIXELS
        p1 = min(pixels, p0 + _PIXELS)
        for c in range(c0, min(channels, c0 + _CHANNELS)):
            if to_last:
                line = src[b, c, p0:p1]
                for q in range(p1 - p0):
                    dst[b, p0 + q, c] = line[q]
            else:
                line = dst[b, c, p0:p1]
                for q in range(p1 - p0):
                    line[q] = src[b, p0 + q, c]


_SMALL = 1 << 15  # elements below which torch's permute wins (a Numba call costs ~10 us)


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """A contiguous [B, H, W, C] copy of a contiguous NCHW tensor (float32/float64)."""
    if x.numel() < _SMALL:
        return x.permute(0, 2, 3, 1).contiguous()
    b, c, h, w = x.shape
    out = torch.empty(b, h, w, c, dtype=x.dtype)
    _transpose(x.reshape(b, c, h * w).numpy(), out.view(b, h * w, c).numpy(), True)
    return out


def to_channels_first(x: torch.Tensor) -> torch.Tensor:
    """A contiguous NCHW copy of a contiguous [B, H, W, C] tensor (float32/float64)."""
    if x.numel() < _SMALL:
        return x.permute(0, 3, 1, 2).contiguous()
    b, h, w, c = x.shape
    out = torch.empty(b, c, h, w, dtype=x.dtype)
    _transpose(x.reshape(b, h * w, c).numpy(), out.view(b, c, h * w).numpy(), False)
    return out
