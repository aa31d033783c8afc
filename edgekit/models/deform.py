"""Deformable convolution v1/v2: the pure-PyTorch reference and the modules models use.

The reference reproduces ``torchvision.ops.deform_conv2d`` (its CPU kernel,
``torchvision/csrc/ops/cpu/deform_conv2d_kernel.cpp``): kernel point (i, j) of output
pixel (ho, wo) samples the input at ``y = ho*stride_h - pad_h + i*dil_h + dy`` and
``x = wo*stride_w - pad_w + j*dil_w + dx``, with (dy, dx) read from ``offset`` channels
``2*(g*kh*kw + i*kw + j)`` and ``+1`` of offset group ``g``. The sample is bilinear;
it is 0 when ``y <= -1 or y >= H or x <= -1 or x >= W``, and corners outside the map
read 0. The v2 ``mask`` multiplies each sample.

That rule is exactly bilinear interpolation over the map padded with zeros (at
``y == -1`` or ``y == H`` the formula gives 0 too), so the reference pads the input with
a zero border, points every outside sample at a zero corner, and does four gathers over
all kernel points at once plus one batched matmul per weight group. The gradient that
autograd derives from that formula is the one torchvision's backward computes, the exact
borders (-1, H) included. Arithmetic runs in float32 for float16/bfloat16 (float64 stays
float64) and the result is cast back: float16 sampling coordinates would be coarse on
large maps (a spacing of 0.5 between 512 and 1024).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from edgekit import ops
from edgekit.ops import as_pair


class DeformGeometry(NamedTuple):
    """Sizes every deformable-convolution implementation needs, validated once."""

    batch: int
    in_channels: int
    height: int
    width: int
    out_channels: int
    kernel_h: int
    kernel_w: int
    out_h: int
    out_w: int
    groups: int
    offset_groups: int
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]


def deform_geometry(input, offset, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                    mask=None) -> DeformGeometry:
    """Check the arguments of ``deform_conv2d`` as torchvision does and return the sizes.

    Shared by every backend so that they all reject the same inputs with the same
    ``ValueError`` messages. Groups and offset groups are inferred from the shapes:
    ``groups = C_in / weight.shape[1]``, ``offset_groups = offset.shape[1] / (2*kh*kw)``.
    """
    stride, padding, dilation = as_pair(stride, "stride"), as_pair(padding, "padding"), as_pair(dilation, "dilation")
    for name, t in (("input", input), ("offset", offset), ("weight", weight), ("mask", mask)):
        if t is not None and t.ndim != 4:
            raise ValueError(f"deform_conv2d: {name} must be a 4-D tensor, got shape {tuple(t.shape)}")
    batch, cin, height, width = input.shape
    cout, cin_per_group, kh, kw = weight.shape
    if kh <= 0 or kw <= 0:
        raise ValueError(f"deform_conv2d: kernel size must be positive, got weight shape {tuple(weight.shape)}")
    if min(stride) <= 0 or min(dilation) <= 0 or min(padding) < 0:
        raise ValueError(f"deform_conv2d: stride and dilation must be positive and padding non-negative, "
                         f"got stride={stride}, padding={padding}, dilation={dilation}")
    if cin_per_group <= 0 or cin % cin_per_group:
        raise ValueError(f"deform_conv2d: input has {cin} channels, which is not a multiple of "
                         f"weight.shape[1]={cin_per_group} (channels per group)")
    groups = cin // cin_per_group
    if cout % groups:
        raise ValueError(f"deform_conv2d: weight.shape[0]={cout} output channels are not divisible by "
                         f"groups={groups} (= input channels {cin} / weight.shape[1] {cin_per_group})")
    if bias is not None and tuple(bias.shape) != (cout,):
        raise ValueError(f"deform_conv2d: bias must have shape ({cout},), got {tuple(bias.shape)}")
    out_h = (height + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    out_w = (width + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    if out_h <= 0 or out_w <= 0:
        raise ValueError(f"deform_conv2d: calculated output size ({out_h}, {out_w}) is too small for input "
                         f"{height}x{width}, kernel {kh}x{kw}, padding {padding}, dilation {dilation}")
    per_group = 2 * kh * kw
    offset_groups = offset.shape[1] // per_group
    if offset_groups == 0 or offset.shape[1] != offset_groups * per_group:
        raise ValueError(f"deform_conv2d: offset.shape[1]={offset.shape[1]} is not valid; it must be a "
                         f"positive multiple of 2*kh*kw={per_group}")
    if cin % offset_groups:
        raise ValueError(f"deform_conv2d: input channels {cin} are not divisible by offset_groups={offset_groups} "
                         f"(= offset.shape[1] / (2*kh*kw))")
    if offset.shape[0] != batch or tuple(offset.shape[2:]) != (out_h, out_w):
        raise ValueError(f"deform_conv2d: offset has shape {tuple(offset.shape)}, expected "
                         f"({batch}, {offset.shape[1]}, {out_h}, {out_w}) (batch and output size)")
    if mask is not None and tuple(mask.shape) != (batch, offset_groups * kh * kw, out_h, out_w):
        raise ValueError(f"deform_conv2d: mask has shape {tuple(mask.shape)}, expected "
                         f"({batch}, {offset_groups * kh * kw}, {out_h}, {out_w}) "
                         f"(batch, offset_groups*kh*kw, output size)")
    return DeformGeometry(batch, cin, height, width, cout, kh, kw, out_h, out_w, groups, offset_groups,
                          stride, padding, dilation)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def deform_conv2d_reference(input: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor,
                            bias: torch.Tensor | None = None, stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                            mask: torch.Tensor | None = None) -> torch.Tensor:
    """``torchvision.ops.deform_conv2d`` in plain, differentiable PyTorch (any device)."""
    g = deform_geometry(input, offset, weight, bias, stride, padding, dilation, mask)
    dtype = _compute_dtype(input.dtype)
    cols = _deformable_columns(input.to(dtype), offset.to(dtype), None if mask is None else mask.to(dtype), g)
    # cols: [B, C*K, L] with (channel, kernel point) rows, the layout of weight.flatten(1).
    k = g.kernel_h * g.kernel_w
    cols = cols.reshape(g.batch, g.groups, (g.in_channels // g.groups) * k, g.out_h * g.out_w)
    w = weight.to(dtype).reshape(g.groups, g.out_channels // g.groups, -1)
    out = torch.matmul(w, cols).view(g.batch, g.out_channels, g.out_h, g.out_w)
    if bias is not None:
        out = out + bias.to(dtype).view(1, -1, 1, 1)
    return out.to(input.dtype)


def _deformable_columns(x, offset, mask, g: DeformGeometry) -> torch.Tensor:
    """The deformable im2col: [B, C*kh*kw, Ho*Wo] bilinear samples (times the mask)."""
    b, og, kh, kw, ho, wo = g.batch, g.offset_groups, g.kernel_h, g.kernel_w, g.out_h, g.out_w
    k = kh * kw
    dev, dt = x.device, x.dtype
    # Kernel-point positions before the offsets, broadcast to [B, og, K, Ho, Wo].
    ii = torch.arange(kh, device=dev, dtype=dt).repeat_interleave(kw) * g.dilation[0]
    jj = torch.arange(kw, device=dev, dtype=dt).repeat(kh) * g.dilation[1]
    oy = torch.arange(ho, device=dev, dtype=dt) * g.stride[0] - g.padding[0]
    ox = torch.arange(wo, device=dev, dtype=dt) * g.stride[1] - g.padding[1]
    off = offset.reshape(b, og, k, 2, ho, wo)
    y = (ii.view(k, 1, 1) + oy.view(1, ho, 1)) + off[:, :, :, 0]
    x_ = (jj.view(k, 1, 1) + ox.view(1, 1, wo)) + off[:, :, :, 1]
    # Samples outside [-1, H] x [-1, W] are 0: send them to the zero corner (-1, -1),
    # where their weights and gradients vanish like torchvision's.
    inside = (y >= -1) & (y <= g.height) & (x_ >= -1) & (x_ <= g.width)
    y = torch.where(inside, y, -1.0)
    x_ = torch.where(inside, x_, -1.0)
    y0, x0 = y.floor(), x_.floor()
    ly, lx = y - y0, x_ - x0
    hy, hx = 1 - ly, 1 - lx
    if mask is not None:
        m = mask.reshape(b, og, k, ho, wo)
        hy, ly = hy * m, ly * m
    # Padding: 1 row/col of zeros before, 2 after, so floor in [-1, H] and floor+1 fit.
    hp, wp = g.height + 3, g.width + 3
    xp = F.pad(x, (1, 2, 1, 2)).reshape(b, og, g.in_channels // og, hp * wp)
    top_left = ((y0.long() + 1) * wp + (x0.long() + 1)).reshape(b, og, 1, k * ho * wo)
    weights = torch.stack((hy * hx, hy * lx, ly * hx, ly * lx), dim=2).reshape(b, og, 4, k * ho * wo)
    cols = _BilinearGather.apply(xp, top_left, weights, (0, 1, wp, wp + 1))
    return cols.reshape(b, g.in_channels * k, ho * wo)


class _BilinearGather(torch.autograd.Function):
    """``out[..., c, n] = sum_q weights[..., q, n] * xp[..., c, index[..., n] + shifts[q]]``.

    The four corner reads over all channels are the big tensors of the reference; as
    plain autograd ops, four copies of them would be kept for the backward. This
    function keeps only its (input-sized) ``xp`` and re-reads the corners in the
    backward, which more than halves the training memory of a layer and is faster too.
    Like torchvision's op, it has no double backward.
    """

    @staticmethod
    def forward(ctx, xp, index, weights, shifts):
        ctx.save_for_backward(xp, index, weights)
        ctx.shifts = shifts
        full = (*xp.shape[:3], index.shape[-1])
        out, tmp = None, None
        for q, shift in enumerate(shifts):
            tmp = torch.gather(xp, 3, (index + shift).expand(full), out=tmp)
            w = weights[:, :, q : q + 1]
            out = tmp * w if out is None else out.addcmul_(tmp, w)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        xp, index, weights = ctx.saved_tensors
        full = grad.shape
        grad_xp = torch.zeros_like(xp) if ctx.needs_input_grad[0] else None
        grad_w = torch.empty_like(weights) if ctx.needs_input_grad[2] else None
        tmp = None
        for q, shift in enumerate(ctx.shifts):
            idx = (index + shift).expand(full)
            if grad_xp is not None:
                tmp = torch.mul(grad, weights[:, :, q : q + 1], out=tmp)
                grad_xp.scatter_add_(3, idx, tmp)
            if grad_w is not None:
                tmp = torch.gather(xp, 3, idx, out=tmp).mul_(grad)
                grad_w[:, :, q] = tmp.sum(dim=2)
        return grad_xp, None, grad_w, None


def _init_conv_params(weight: nn.Parameter, bias: nn.Parameter | None) -> None:
    """torch.nn.Conv2d's (and torchvision's DeformConv2d's) default initialisation."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        fan_in = weight.shape[1] * weight.shape[2] * weight.shape[3]
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
        nn.init.uniform_(bias, -bound, bound)


class DeformConv2d(nn.Module):
    """Deformable convolution layer (torchvision's ``DeformConv2d``: same parameter names
    and initialisation); offsets (and the v2 mask) are given to :meth:`forward`."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, offset_groups: int = 1, bias: bool = True, backend: str = "auto"):
        super().__init__()
        if groups <= 0 or in_channels % groups or out_channels % groups:
            raise ValueError(f"DeformConv2d: in_channels={in_channels} and out_channels={out_channels} "
                             f"must be divisible by groups={groups}")
        if offset_groups <= 0 or in_channels % offset_groups:
            raise ValueError(f"DeformConv2d: in_channels={in_channels} must be divisible by "
                             f"offset_groups={offset_groups}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = as_pair(kernel_size, "kernel_size")
        self.stride, self.padding = as_pair(stride, "stride"), as_pair(padding, "padding")
        self.dilation = as_pair(dilation, "dilation")
        self.groups, self.offset_groups, self.backend = groups, offset_groups, backend
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        _init_conv_params(self.weight, self.bias)

    @property
    def kernel_points(self) -> int:
        return self.kernel_size[0] * self.kernel_size[1]

    def forward(self, x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        want = 2 * self.offset_groups * self.kernel_points
        if offset.ndim != 4 or offset.shape[1] != want:
            raise ValueError(f"{type(self).__name__}: offset must have {want} channels "
                             f"(2*offset_groups*kh*kw), got shape {tuple(offset.shape)}")
        return ops.deform_conv2d(x, offset, self.weight, self.bias, self.stride, self.padding, self.dilation,
                                 mask=mask, backend=self.backend)

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"padding={self.padding}, dilation={self.dilation}")
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.offset_groups != 1:
            s += f", offset_groups={self.offset_groups}"
        if self.bias is None:
            s += ", bias=False"
        return s + (f", backend={self.backend!r}" if self.backend != "auto" else "")


class DeformConv2dPack(DeformConv2d):
    """DCN that predicts its own offsets (and, when ``modulated``, its mask) from its input
    with ``conv_offset``, as mmcv's ``DeformConv2dPack`` / ``ModulatedDeformConv2dPack``.

    ``conv_offset`` starts at zero, so a fresh layer samples the regular grid: DCNv1 is
    then exactly a Conv2d with the same weights, DCNv2 half of it (sigmoid(0) = 0.5)
    plus the bias. The modulated layout is mmcv's: ``o1, o2, m = chunk(3)``,
    ``offset = cat(o1, o2)``, ``mask = sigmoid(m)``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, offset_groups: int = 1, bias: bool = True, modulated: bool = True,
                 backend: str = "auto"):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                         offset_groups, bias, backend)
        self.modulated = modulated
        per_point = 3 if modulated else 2
        self.conv_offset = nn.Conv2d(in_channels, per_point * offset_groups * self.kernel_points,
                                     self.kernel_size, self.stride, self.padding, self.dilation, bias=True)
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = self.conv_offset(x)
        if not self.modulated:
            return super().forward(x, out)
        o1, o2, m = torch.chunk(out, 3, dim=1)
        return super().forward(x, torch.cat((o1, o2), dim=1), torch.sigmoid(m))

    def extra_repr(self) -> str:
        return super().extra_repr() + ("" if self.modulated else ", modulated=False")


class DeformableSkip(nn.Module):
    """DG-Font(++)'s feature deformation skip connection: ``main + dcn(skip)``.

    A DCNv2 (stride 1, 'same' padding) deforms the skip feature onto ``main_channels``;
    its offsets and mask come from ``cat(skip, main)``. ``skip`` and ``main`` must have
    the same spatial size (the caller resizes). Everything new starts at zero (the
    offset/mask predictor and the DCN's weight and bias), so inserting a fresh skip leaves
    the network's output unchanged (``forward`` returns ``main``); the DCN weight gets a
    gradient at once, the offset predictor as soon as that weight is non-zero.
    """

    def __init__(self, skip_channels: int, main_channels: int, kernel_size: int = 3, offset_groups: int = 1,
                 backend: str = "auto"):
        super().__init__()
        if kernel_size <= 0 or kernel_size % 2 == 0:
            raise ValueError(f"DeformableSkip: kernel_size must be a positive odd int (it keeps the size), "
                             f"got {kernel_size}")
        pad = kernel_size // 2
        self.dcn = DeformConv2d(skip_channels, main_channels, kernel_size, padding=pad,
                                offset_groups=offset_groups, backend=backend)
        self.conv_offset = nn.Conv2d(skip_channels + main_channels, 3 * offset_groups * kernel_size ** 2,
                                     kernel_size, padding=pad)
        for p in (self.dcn.weight, self.dcn.bias, self.conv_offset.weight, self.conv_offset.bias):
            nn.init.zeros_(p)

    def forward(self, skip: torch.Tensor, main: torch.Tensor) -> torch.Tensor:
        if skip.ndim != 4 or main.ndim != 4 or skip.shape[0] != main.shape[0] or skip.shape[2:] != main.shape[2:]:
            raise ValueError(f"DeformableSkip: skip {tuple(skip.shape)} and main {tuple(main.shape)} must be "
                             f"NCHW with the same batch and spatial size; resize one of them first")
        o1, o2, m = torch.chunk(self.conv_offset(torch.cat((skip, main), dim=1)), 3, dim=1)
        return main + self.dcn(skip, torch.cat((o1, o2), dim=1), torch.sigmoid(m))
