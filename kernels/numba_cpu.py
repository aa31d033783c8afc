"""The ``numba`` backend: GRN and deformable convolution on the CPU, forward and backward.

Both ops are ``torch.autograd.Function``s, so modules (``GRN``, ``DeformConv2d``) train
through them transparently; the kernels are in :mod:`edgekit.kernels.numba_grn` and
:mod:`edgekit.kernels.numba_deform` and run on numpy views of the (contiguous) tensors.

Data types: float32 and float64 run natively. Numba cannot compute in float16/bfloat16
on the CPU, so those inputs are converted to float32 at the boundary (one extra copy
each way) and the result is cast back to the input's dtype; this is also what the
reference does (it reduces GRN and samples DCN in float32).

Compilation: every kernel is compiled on first use for each dtype and cached on disk
next to the module (``cache=True``). On a 2-core machine the first GRN forward+backward
costs about 8 s of compile per layout, build (serial, parallel) and dtype (22 s for all
four float32 ones) and the first DCN forward+backward about 15-20 s per dtype; later
processes load the cache in well under a second.

Memory: GRN outputs (and input gradients) of 32 MiB or more are written into blocks
reused from :mod:`edgekit.kernels.output_pool` once their tensors are freed, which
spares the OS's zeroing of fresh pages (``EDGEKIT_OUTPUT_POOL_MB`` caps what it keeps);
from 1 MiB on they are 64-byte aligned, so that the GRN forward can stream its output
past the cache (``_STREAM_BYTES``).
"""

from __future__ import annotations

import math
import weakref

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from edgekit.kernels.output_pool import OUTPUTS
from edgekit.models.deform import deform_geometry
from edgekit.sysinfo import last_level_cache_bytes

DEVICES = frozenset({"cpu"})
SUPPORTS_BACKWARD = frozenset({"grn", "deform_conv2d"})
COLUMNS_BUDGET = 1 << 20  # elements of the im2col buffer per chunk (4 MiB in float32: see _chunks)


def unavailable_reason() -> str | None:
    """None when numba imports, else why not."""
    try:
        import numba  # noqa: F401
    except ImportError as exc:
        return f"numba cannot be imported ({exc}); pip install numba"
    return None


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------- GRN

_GRN_CHUNK_BYTES = 64 << 10  # bytes of one channels_last row chunk: a task's unit of work
_SERIAL_BYTES = 256 << 10  # GRN tensors below this run on one thread
_grn_kernels = None  # edgekit.kernels.numba_grn, imported on first use (it imports numba)


# Samples whose input and output, one per thread, fit in 3/4 of the last-level cache are
# reduced and applied one at a time, so the apply re-reads x from cache.
_FUSE_BYTES = (last_level_cache_bytes() or 8 << 20) * 3 // 4  # 8 MiB where sysfs has no answer
# A batch that does not split over the threads runs serially up to this size: the two-pass
# parallel split measured no faster than one thread on 0.25-5 MiB single samples on the
# 2-core machine (both bound by the L3), and every parallel launch can wait on a
# descheduled worker.
_SPLIT_BYTES = _FUSE_BYTES
# Forward outputs from half the last-level cache on are written with streaming stores
# (channels_last, C a multiple of 8, aligned: the output pool aligns outputs of 1 MiB or
# more). Measured interleaved on the 2-core EPYC (32 MiB L3), 8-sample forwards: 20 MiB
# 6-15% and 40 MiB 9-20% faster; 10 MiB no faster, 5-10 MiB kernels alone 30-40% slower.
_STREAM_BYTES = (last_level_cache_bytes() or 32 << 20) // 2


def grn(x, gamma, beta, eps=1e-6, data_format="channels_last"):
    """GRN with the reference's semantics (``edgekit.models.grn.grn_reference``)."""
    if data_format == "channels_last":
        channels_last = True
    elif data_format == "channels_first":
        channels_last = False
    else:
        raise ValueError(f"grn: data_format must be 'channels_last' or 'channels_first', got {data_format!r}")
    shape = x.shape
    if len(shape) != 4:
        raise ValueError(f"grn: expected a 4-D tensor, got shape {tuple(shape)}")
    channels = shape[3] if channels_last else shape[1]
    if gamma.numel() != channels or beta.numel() != channels:
        raise ValueError(f"grn: gamma and beta need {channels} elements ({data_format} input of shape "
                         f"{tuple(shape)}), got {gamma.numel()} and {beta.numel()}")
    if (x.requires_grad or gamma.requires_grad or beta.requires_grad) and torch.is_grad_enabled():
        return _GRNFunction.apply(x, gamma, beta, float(eps), channels_last)
    # No autograd node: on the 7x7 late-stage tensors the wrapper is most of the time.
    return _grn_forward(x, gamma, beta, float(eps), channels_last)[0]


def _kernels():
    global _grn_kernels
    if _grn_kernels is None:
        from edgekit.kernels import numba_grn
        _grn_kernels = numba_grn
    return _grn_kernels


def _array(t: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    """``t`` as a C-contiguous numpy array of ``dtype``: a view when it already is one
    (the common case costs two attribute checks and ``.numpy()``), else one copy."""
    if t.requires_grad:
        t = t.detach()
    if t.dtype is not dtype:
        t = t.to(dtype)
    if not t.is_contiguous():
        t = t.contiguous()
    return t.numpy()


class _VectorViews:
    """1-D numpy views of GRN's gamma and beta, kept between calls: turning a parameter into
    an array (detach, checks, ``.numpy()``, reshape) costs ~3 us each, a third of a whole
    1x7x7x320 forward. A view shares the parameter's memory, so in-place updates (an
    optimizer step) show through; an entry serves only the same live tensor with the same
    storage, and only views are kept (a converted copy would go stale)."""

    def __init__(self):
        self._views: dict = {}

    def __call__(self, t: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
        key = (id(t), dtype)
        hit = self._views.get(key)
        if hit is not None and hit[0]() is t and hit[1] == t.data_ptr():
            return hit[2]
        array = _array(t, dtype).reshape(-1)
        if t.dtype is dtype and t.is_contiguous():
            self._views[key] = (weakref.ref(t, lambda _, key=key: self._views.pop(key, None)), t.data_ptr(), array)
        return array


_vector = _VectorViews()


def _run(channels_last, u, v, gamma, beta, gx, eps, out, backward, apply):
    """One kernel call on numpy arrays: in parallel, one sample per task, when the batch
    splits evenly over the threads and a sample fits the cache; in two parallel passes over
    chunks for tensors of at least ``_SPLIT_BYTES``; else on one thread. Returns the
    kernel's result (gx forward, [dgamma, dbeta] backward)."""
    if u.size == 0:  # nothing to reduce or apply (the kernels' tiles assume C > 0)
        if backward:
            return np.zeros((2, gx.shape[1]))
        gx[...] = 0.0
        return gx
    k = _kernels()
    n = u.shape[0]
    nbytes = u.nbytes * (2 if backward else 1)
    threads = k.MAX_THREADS
    fused = (n >= threads and (n % threads == 0 or n >= 4 * threads)
             and 2 * threads * (nbytes // n) <= _FUSE_BYTES)
    if threads == 1 or nbytes < _SERIAL_BYTES or not (fused or nbytes >= _SPLIT_BYTES):
        kernel, fused = (k.grn_last_serial if channels_last else k.grn_first_serial), True
    else:
        kernel = k.grn_last if channels_last else k.grn_first
    return kernel(u, v, gamma, beta, gx, eps, out, backward, apply, _GRN_CHUNK_BYTES, fused, _STREAM_BYTES)


def _grn_forward(x, gamma, beta, eps, channels_last):
    """(out, G = ||x||_HW as [N, C] float64): one kernel call, writing into a fresh array
    that becomes the output tensor."""
    dtype = _compute_dtype(x.dtype)
    xn = _array(x, dtype)
    out = OUTPUTS.empty_like(xn)  # a reused block for outputs of >= 32 MiB: no page faults
    gx = np.empty((xn.shape[0], xn.shape[3] if channels_last else xn.shape[1]))
    _run(channels_last, xn, xn, _vector(gamma, dtype), _vector(beta, dtype), gx, eps, out, False, True)
    y = torch.from_numpy(out)
    return (y if x.dtype is dtype else y.to(x.dtype)), gx


class _GRNFunction(torch.autograd.Function):
    """out = x*(gamma*Nx + 1) + beta with Nx = G/(mean_C G + eps), G = ||x||_HW; the
    backward formulas are in :func:`edgekit.kernels.numba_grn._backward_stats`."""

    @staticmethod
    def forward(ctx, x, gamma, beta, eps, channels_last):
        out, gx = _grn_forward(x, gamma, beta, eps, channels_last)
        ctx.save_for_backward(x, gamma, beta)
        ctx.gx, ctx.eps, ctx.channels_last = gx, eps, channels_last
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, gamma, beta = ctx.saved_tensors
        need_dx, need_gamma, need_beta = ctx.needs_input_grad[:3]
        dtype = _compute_dtype(x.dtype)
        xn = _array(x, dtype)
        dx = OUTPUTS.empty_like(xn)  # also when unused: the kernel takes one signature
        zeros = np.zeros(ctx.gx.shape[1], dtype=xn.dtype)
        grads = _run(ctx.channels_last, _array(grad, dtype), xn, _vector(gamma, dtype), zeros, ctx.gx, ctx.eps,
                     dx, True, need_dx)
        grad_x = torch.from_numpy(dx).to(x.dtype) if need_dx else None
        grad_gamma = torch.from_numpy(grads[0]).to(gamma.dtype).view(gamma.shape) if need_gamma else None
        grad_beta = torch.from_numpy(grads[1]).to(beta.dtype).view(beta.shape) if need_beta else None
        return grad_x, grad_gamma, grad_beta, None, None


# --------------------------------------------------------------- deformable convolution


def deform_conv2d(input, offset, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), mask=None):
    """``torchvision.ops.deform_conv2d`` semantics; differentiable in every tensor argument."""
    g = deform_geometry(input, offset, weight, bias, stride, padding, dilation, mask)
    return _DeformFunction.apply(input, offset, weight, bias, mask, g)


def _chunks(g):
    """(b0, b1, l0, l1) blocks of samples and output pixels whose columns buffer stays
    within COLUMNS_BUDGET elements, so memory stays bounded and the GEMM reads columns
    the im2col has just written while they are still in cache. Measured on the 2-core
    EPYC (32 MiB L3), forward at the benchmark's eight DCN shapes, budgets of 2, 4, 8 and
    64 MiB: 4-8 MiB fastest, 1.4-1.7x faster than 64 MiB on maps or batches whose
    columns exceed the L3 (e.g. 128->128, 128x128, batch 4: ~300 ms vs ~480 ms), equal
    on the rest."""
    length = g.out_h * g.out_w
    row = g.in_channels * g.kernel_h * g.kernel_w
    if row * length <= COLUMNS_BUDGET:
        step = max(1, min(g.batch, COLUMNS_BUDGET // max(1, row * length)))
        for b0 in range(0, g.batch, step):
            yield b0, min(g.batch, b0 + step), 0, length
        return
    pixels = max(1, COLUMNS_BUDGET // row)
    for b0 in range(g.batch):
        for l0 in range(0, length, pixels):
            yield b0, b0 + 1, l0, min(length, l0 + pixels)


def _segments(g) -> np.ndarray:
    """Rows (offset group, c0, c1): the runs of channels inside one offset group and one
    weight group, over which the kernels' innermost loops run contiguously."""
    cpg, cin_g = g.in_channels // g.offset_groups, g.in_channels // g.groups
    bounds = sorted(set(range(0, g.in_channels + 1, cpg)) | set(range(0, g.in_channels + 1, cin_g)))
    return np.array([(c0 // cpg, c0, c1) for c0, c1 in zip(bounds, bounds[1:])], dtype=np.int64)


def _weight_t(w: torch.Tensor, g) -> torch.Tensor:
    """Weight as the GEMM's right operand: [G, K*C/G, Cout/G], rows in the columns' (k, c) order."""
    cin_g, cout_g, kk = g.in_channels // g.groups, g.out_channels // g.groups, g.kernel_h * g.kernel_w
    return w.reshape(g.groups, cout_g, cin_g, kk).permute(0, 3, 2, 1).reshape(g.groups, kk * cin_g, cout_g)


class _DeformFunction(torch.autograd.Function):
    """Channels-last deformable im2col (Numba) + one GEMM per chunk (torch).

    Columns are laid out [B, L, G, K, C/G] so that the innermost loops of every kernel
    run over contiguous channels of a channels-last copy of the input (four vector loads
    and four FMAs per 8 channels) and each weight group is a plain GEMM on them. The GEMM
    writes a channels-last result, out[L, Cout] = cols[L, K*C] @ W^T[K*C, Cout], which one
    copy turns into NCHW: MKL runs that orientation at 150-168 GFLOP/s on the 2-core EPYC
    against 116-143 for out[Cout, L] = W @ cols^T (the tall operand as the GEMM's M;
    measured side by side on 64- and 128-channel shapes). The columns are not kept for the backward
    (they are K times the input): the backward recomputes them chunk by chunk, which is
    cheaper than the GEMMs around them.
    """

    @staticmethod
    def forward(ctx, input, offset, weight, bias, mask, g):
        dtype = _compute_dtype(input.dtype)
        x = _channels_last(input.detach().to(dtype))  # [B, H, W, C]
        off = offset.detach().to(dtype).contiguous()
        w = weight.detach().to(dtype).contiguous()
        m = None if mask is None else mask.detach().to(dtype).contiguous()
        b = None if bias is None else bias.detach().to(dtype)
        out = torch.empty(g.batch, g.out_h * g.out_w, g.out_channels, dtype=dtype)  # channels last
        wt = _weight_t(w, g)
        segs = _segments(g)
        buffer = _columns_buffer(g, dtype)
        for b0, b1, l0, l1 in _chunks(g):
            cols = _columns(x[b0:b1], off[b0:b1], None if m is None else m[b0:b1], segs, g, l0, l1, buffer)
            _project(cols.view(-1, cols.shape[2]), wt, b, out[b0:b1, l0:l1].view(-1, g.out_channels))
        ctx.save_for_backward(x, off, w, m)
        ctx.geometry, ctx.has_bias, ctx.dtypes = g, bias is not None, (input.dtype, offset.dtype, weight.dtype)
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mask_dtype = None if mask is None else mask.dtype
        return _channels_first(out.view(g.batch, g.out_h, g.out_w, g.out_channels)).to(input.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        from edgekit.kernels import numba_deform as k
        x, off, w, m = ctx.saved_tensors
        g = ctx.geometry
        need_x, need_off, need_w, need_b, need_m = ctx.needs_input_grad[:5]
        need_coord = need_off or need_m
        dtype = x.dtype
        p = k.geometry_array(g)
        length, cout_g, cin_g = g.out_h * g.out_w, g.out_channels // g.groups, g.in_channels // g.groups
        gout = grad.to(dtype).contiguous().view(g.batch, g.groups, cout_g, length)
        wt = _weight_t(w, g)
        hw = g.height * g.width
        grad_x = torch.empty(g.batch, hw, g.in_channels, dtype=dtype) if need_x else None
        grad_off = torch.zeros(off.shape, dtype=dtype) if need_coord else None
        grad_m = torch.zeros(m.shape, dtype=dtype) if m is not None and need_coord else None
        grad_wt = torch.zeros_like(wt) if need_w else None
        segs = _segments(g)
        private = None
        buffer = _columns_buffer(g, dtype) if need_w else None
        for b0, b1, l0, l1 in _chunks(g):
            nb = b1 - b0
            go_t = gout[b0:b1, :, :, l0:l1].transpose(2, 3)  # [nb, G, Lc, Cout/G]
            m_chunk = None if m is None else m[b0:b1]
            if need_w:
                cols = _columns(x[b0:b1], off[b0:b1], m_chunk, segs, g, l0, l1, buffer)
                grad_wt += torch.matmul(cols.view(nb, l1 - l0, g.groups, -1).permute(0, 2, 3, 1), go_t).sum(dim=0)
                del cols
            if not (need_x or need_coord):
                continue
            gcols = torch.matmul(go_t, wt.transpose(1, 2)).transpose(1, 2).contiguous().view(nb, l1 - l0, -1)
            off_np = off[b0:b1].view(nb, off.shape[1], length).numpy()
            mk = _dummy_mask(dtype) if m is None else m_chunk.view(nb, m.shape[1], length).numpy()
            if need_x and l0 == 0:  # one per-thread buffer per block of samples, summed at its end
                private = torch.zeros(_threads(), nb, hw, g.in_channels, dtype=dtype)
            gm = (_dummy_mask(dtype) if grad_m is None else
                  grad_m[b0:b1].view(nb, m.shape[1], length).numpy())
            k.col2im_coord(gcols.numpy(), x[b0:b1].view(nb, hw, g.in_channels).numpy(), off_np, mk, m is not None,
                           p, l0, segs, cin_g, need_x, (private if need_x else _dummy_private(dtype)).numpy(),
                           need_coord, (grad_off[b0:b1].view(nb, off.shape[1], length) if need_coord else
                                        _dummy_offset_grad(dtype)).numpy(), gm)
            if need_x and l1 == length:
                torch.sum(private, dim=0, out=grad_x[b0:b1])
        in_dt, off_dt, w_dt = ctx.dtypes
        if need_w:
            kk = g.kernel_h * g.kernel_w
            grad_w = grad_wt.view(g.groups, kk, cin_g, cout_g).permute(0, 3, 2, 1).reshape(w.shape)
        return (
            None if grad_x is None else
            _channels_first(grad_x.view(g.batch, g.height, g.width, g.in_channels)).to(in_dt),
            grad_off.to(off_dt) if need_off else None,
            grad_w.to(w_dt) if need_w else None,
            grad.sum(dim=(0, 2, 3), dtype=torch.float64).to(ctx.bias_dtype) if need_b and ctx.has_bias else None,
            grad_m.to(ctx.mask_dtype) if need_m and grad_m is not None else None,
            None,
        )


def _threads() -> int:
    """Upper bound of ``numba.get_thread_id()``: the size of Numba's thread pool."""
    from numba import config
    return config.NUMBA_NUM_THREADS


def _dummy_mask(dtype) -> np.ndarray:
    """The kernels always take a mask array; without a mask, a 1-element dummy."""
    return np.ones((1, 1, 1), dtype=np.float64 if dtype == torch.float64 else np.float32)


def _dummy_private(dtype) -> torch.Tensor:
    """The input-gradient buffers [T, B, H*W, C] the backward kernel takes when no input
    gradient is wanted."""
    return torch.zeros(1, 1, 1, 1, dtype=dtype)


def _dummy_offset_grad(dtype) -> torch.Tensor:
    """The offset gradient [B, 2*og*K, L] the backward kernel takes when none is wanted."""
    return torch.zeros(1, 1, 1, dtype=dtype)


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """A contiguous [B, H, W, C] view or copy of an NCHW-shaped tensor."""
    if x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1)  # already laid out so: no copy
    from edgekit.kernels.numba_layout import to_channels_last
    return to_channels_last(x.contiguous())


def _channels_first(x: torch.Tensor) -> torch.Tensor:
    """A contiguous NCHW copy of a contiguous [B, H, W, C] tensor."""
    from edgekit.kernels.numba_layout import to_channels_first
    return to_channels_first(x)


def _columns_buffer(g, dtype) -> torch.Tensor:
    """One flat buffer for the columns of every chunk: a fresh multi-MiB tensor per chunk
    would come from mmap each time and pay a page fault per 4 KiB."""
    row = g.in_channels * g.kernel_h * g.kernel_w
    return torch.empty(max(((b1 - b0) * (l1 - l0) * row for b0, b1, l0, l1 in _chunks(g)), default=0), dtype=dtype)


def _project(cols: torch.Tensor, wt: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> None:
    """out[n, Cout] = cols[n, G*K*C/G] @ W per weight group (+ bias), written into ``out``."""
    groups, rows, cout_g = wt.shape
    if groups == 1:
        if bias is None:
            torch.mm(cols, wt[0], out=out)
        else:
            torch.addmm(bias, cols, wt[0], out=out)
        return
    per_group = torch.matmul(cols.view(-1, groups, rows).transpose(0, 1), wt)  # [G, n, Cout/G]
    out.view(-1, groups, cout_g).copy_(per_group.transpose(0, 1))
    if bias is not None:
        out += bias


def _columns(x, off, m, segs, g, l0: int, l1: int, buffer: torch.Tensor | None = None) -> torch.Tensor:
    """Deformable im2col of a block of channels-last samples, output pixels l0..l1:
    [nb, l1 - l0, G*K*C/G], in ``buffer`` (flat, large enough) when given."""
    from edgekit.kernels import numba_deform as k
    nb, length = x.shape[0], g.out_h * g.out_w
    kk = g.kernel_h * g.kernel_w
    shape = (nb, l1 - l0, g.in_channels * kk)
    cols = (torch.empty(shape, dtype=x.dtype) if buffer is None else
            buffer[:shape[0] * shape[1] * shape[2]].view(shape))
    mk = _dummy_mask(x.dtype) if m is None else m.reshape(nb, m.shape[1], length).numpy()
    k.im2col(x.reshape(nb, g.height * g.width, g.in_channels).numpy(), off.reshape(nb, off.shape[1], length).numpy(),
             mk, m is not None, k.geometry_array(g), l0, segs, g.in_channels // g.groups, cols.numpy())
    return cols
