"""Export-side implementations of the two custom layers (deformable convolution, GRN).

The kernel backends behind :mod:`edgekit.ops` (Numba, CUDA) cannot be traced, and the
reference's memory-lean gather writes into ``out=`` buffers that ``torch.export``
rejects. While a model is exported, :func:`export_backends` routes the ops to:

- ``deform="native"``: the custom op ``edgekit::deform_conv2d`` (eager: the reference),
  which the dynamo exporter translates to one ONNX ``DeformConv`` (opset 19) through
  :func:`onnx_translations`;
- ``deform="decompose"``: :func:`deform_conv2d_decomposed`, standard ops only
  (``GridSample`` + ``Conv``) for runtimes without DeformConv (TensorRT < 10, older ORT);
- GRN: the pure-PyTorch reference, whose L2 reduction stays float32 in a half model.

Both deform paths compute in float32 for half inputs, as the reference does (float16
sampling coordinates are coarse on large maps), and keep the batch axis symbolic.
"""

from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn.functional as F

from edgekit.models.deform import deform_conv2d_reference, deform_geometry
from edgekit.models.grn import grn_reference

DEFORM_MODES = ("native", "decompose")
_LOCK = threading.RLock()  # re-entrant: an export may run inside a caller's routing


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------- native


@torch.library.custom_op("edgekit::deform_conv2d", mutates_args=())
def _deform_conv2d_op(input: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor,
                      bias: torch.Tensor | None, mask: torch.Tensor | None, stride: list[int],
                      padding: list[int], dilation: list[int], groups: int,
                      offset_groups: int) -> torch.Tensor:
    # groups/offset_groups are implied by the shapes; they are arguments so that the ONNX
    # translation (which only sees this op's arguments) can write them as attributes.
    return deform_conv2d_reference(input, offset, weight, bias, tuple(stride), tuple(padding), tuple(dilation),
                                   mask)


@_deform_conv2d_op.register_fake
def _(input, offset, weight, bias, mask, stride, padding, dilation, groups, offset_groups):
    kh, kw = weight.shape[-2:]
    ho = (input.shape[2] + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (input.shape[3] + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return input.new_empty((input.shape[0], weight.shape[0], ho, wo))


def deform_conv2d_native(input, offset, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                         mask=None) -> torch.Tensor:
    """``edgekit.ops.deform_conv2d`` as one custom op that exports to ONNX ``DeformConv``."""
    g = deform_geometry(input, offset, weight, bias, stride, padding, dilation, mask)
    dtype = input.dtype
    compute = _compute_dtype(dtype)
    cast = (lambda t: None if t is None else t.to(compute))
    out = _deform_conv2d_op(cast(input), cast(offset), cast(weight), cast(bias), cast(mask), list(g.stride),
                            list(g.padding), list(g.dilation), g.groups, g.offset_groups)
    return out.to(dtype)


def _deform_conv_onnx(input, offset, weight, bias, mask, stride, padding, dilation, groups, offset_groups):
    """Translation of ``edgekit::deform_conv2d`` to ONNX ``DeformConv`` (inputs X, W, offset, B, mask)."""
    from onnxscript import opset19 as op

    return op.DeformConv(input, weight, offset, bias, mask, strides=list(stride),
                         pads=[padding[0], padding[1], padding[0], padding[1]], dilations=list(dilation),
                         group=groups, offset_group=offset_groups)


def onnx_translations() -> dict:
    """``custom_translation_table`` for ``torch.onnx.export(dynamo=True)``."""
    return {torch.ops.edgekit.deform_conv2d.default: _deform_conv_onnx}


# ------------------------------------------------------------------------- decompose


def deform_conv2d_decomposed(input, offset, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                             mask=None) -> torch.Tensor:
    """Deformable convolution from ``grid_sample`` and ``conv2d`` (torchvision's semantics).

    Kernel point (i, j) of output pixel (ho, wo) is sampled into pixel
    (ho*kh + i, wo*kw + j) of a [B, C, Ho*kh, Wo*kw] map; a ``conv2d`` with the layer's
    own weight, stride (kh, kw) and groups then does the weighted sum. GridSample's
    bilinear rule with zero padding and ``align_corners=False`` reads 0 for every corner
    outside the map, which is exactly torchvision's rule (a sample at y <= -1 or y >= H
    has no in-map corner with non-zero weight). The weight enters the Conv unchanged,
    so a QDQ writer finds it under its own name like any Conv weight.
    """
    g = deform_geometry(input, offset, weight, bias, stride, padding, dilation, mask)
    dtype = input.dtype
    compute = _compute_dtype(dtype)
    og, kh, kw, ho, wo = g.offset_groups, g.kernel_h, g.kernel_w, g.out_h, g.out_w
    h, w, cin = g.height, g.width, g.in_channels
    x = input.to(compute)
    # Offsets [B, og*kh*kw*2, Ho, Wo] -> (dy, dx) [B, og, kh, kw, 2, Ho, Wo] -> (dx, dy) [B, og, Ho, kh, Wo, kw, 2].
    off = offset.to(compute).reshape(-1, og, kh, kw, 2, ho, wo).permute(0, 1, 5, 2, 6, 3, 4).flip(-1)
    # GridSample's normalised coordinate (align_corners=False) of pixel p is (2p + 1) / size - 1; with
    # p = base + offset that is offset * 2/size + a constant, computed here once, not in the graph.
    scale = torch.tensor([2.0 / w, 2.0 / h], dtype=compute, device=x.device)
    grid = off * scale + _base_grid(g, compute, x.device)
    grid = grid.reshape(-1, ho * kh, wo * kw, 2)
    samples = F.grid_sample(x.reshape(-1, cin // og, h, w), grid, mode="bilinear", padding_mode="zeros",
                            align_corners=False)  # [B*og, C/og, Ho*kh, Wo*kw]
    if mask is not None:
        m = mask.to(compute).reshape(-1, og, 1, kh, kw, ho, wo).permute(0, 1, 2, 5, 3, 6, 4)
        samples = (samples.reshape(-1, og, cin // og, ho, kh, wo, kw) * m)
    samples = samples.reshape(-1, cin, ho * kh, wo * kw)
    out = F.conv2d(samples, weight.to(compute), None if bias is None else bias.to(compute),
                   stride=(kh, kw), groups=g.groups)
    return out.to(dtype)


def _base_grid(g, dtype, device) -> torch.Tensor:
    """Normalised (x, y) of every kernel point before offsets, [Ho, kh, Wo, kw, 2], as a constant."""
    import numpy as np

    ys = (np.arange(g.out_h)[:, None] * g.stride[0] - g.padding[0]
          + np.arange(g.kernel_h)[None, :] * g.dilation[0]).astype(np.float64)  # [Ho, kh]
    xs = (np.arange(g.out_w)[:, None] * g.stride[1] - g.padding[1]
          + np.arange(g.kernel_w)[None, :] * g.dilation[1]).astype(np.float64)  # [Wo, kw]
    shape = (g.out_h, g.kernel_h, g.out_w, g.kernel_w)
    gx = np.broadcast_to(((2 * xs + 1) / g.width - 1)[None, None], shape)
    gy = np.broadcast_to(((2 * ys + 1) / g.height - 1)[:, :, None, None], shape)
    return torch.from_numpy(np.stack((gx, gy), axis=-1)).to(device=device, dtype=dtype)


# --------------------------------------------------------------------------- routing


def _grn_export(x, gamma, beta, eps, data_format):
    return grn_reference(x, gamma, beta, eps, data_format)


def export_implementation(op: str, deform: str):
    """The traceable implementation of ``op`` used while exporting."""
    if deform not in DEFORM_MODES:
        raise ValueError(f"deform must be one of {DEFORM_MODES}, got {deform!r}")
    if op == "grn":
        return _grn_export
    if op == "deform_conv2d":
        return deform_conv2d_native if deform == "native" else deform_conv2d_decomposed
    raise ValueError(f"no export implementation for op {op!r}")


@contextlib.contextmanager
def export_backends(deform: str = "native"):
    """Route ``edgekit.ops.grn``/``deform_conv2d`` to traceable implementations (any
    ``backend`` the layers asked for) for the duration of an export.

    It swaps ``edgekit.kernels.dispatch.resolve`` process-wide under a re-entrant lock:
    nested use in one thread works (the inner mode wins until it exits), other threads
    wait to enter; threads calling the ops meanwhile get the export implementations, which
    compute the same values.
    """
    from edgekit.kernels import dispatch

    export_implementation("grn", deform)  # validates ``deform`` before anything is patched
    with _LOCK:
        original = dispatch.resolve

        def resolve(op, backend, tensor, needs_grad=None):
            return export_implementation(op, deform)

        dispatch.resolve = resolve
        try:
            yield
        finally:
            dispatch.resolve = original
