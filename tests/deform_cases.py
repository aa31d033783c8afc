"""Random deformable-convolution cases shared by the reference, ONNX and kernel tests.

``random_deform_case(rng)`` draws a case that exercises the edges of torchvision's rule:
offsets large enough to push samples off the map, samples landing exactly on the
borders (-1, H, and integer pixel positions), weight groups and offset groups,
stride/padding/dilation, even kernels (2x2, 4x4), batch 1 and >1, odd sizes, with and
without mask and bias. Every parameter can be pinned by keyword. Tests print the seed of
a failing case; ``EDGEKIT_TEST_SEED=<seed>`` replays it.
"""

from __future__ import annotations

import math
import os
import secrets

import numpy as np
import torch


def fresh_seed() -> int:
    """A new seed per run, or ``EDGEKIT_TEST_SEED`` to replay a failure."""
    env = os.environ.get("EDGEKIT_TEST_SEED")
    return int(env) if env else secrets.randbits(32)


def output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def base_positions(out: int, kernel: int, stride: int, padding: int, dilation: int) -> np.ndarray:
    """Sampling position before offsets, [kernel, out]: ``o*stride - padding + k*dilation``."""
    return (np.arange(kernel)[:, None] * dilation + np.arange(out)[None, :] * stride - padding).astype(np.float64)


def _pick(rng, value, choices, p=None):
    return value if value is not None else choices[int(rng.choice(len(choices), p=p))]


OFFSET_KINDS = ("smooth", "integer", "border")


def _offsets(rng, base, size, shape, scale, kinds):
    """Offsets along one axis, [B, og, kh, kw, Ho, Wo]; ``base`` broadcasts to that shape.

    A mix of: smooth random offsets of the given scale; integer offsets (samples on pixel
    centres, where the bilinear weights are exactly 0/1 and the offset gradient is
    one-sided); and offsets that land exactly on the borders -1 and ``size`` or just
    inside/outside them, or far off the map.
    """
    smooth = rng.normal(0.0, scale, shape)
    integer = rng.integers(-3, 4, shape).astype(np.float64)
    targets = np.array([-1.0, size, 0.0, size - 1.0, -0.5, size - 0.5, -2.0, size + 1.0,
                        -1.25, size + 0.25, -3.0 * size - 7.0, 3.0 * size + 7.0])
    border = targets[rng.integers(0, len(targets), shape)] - base
    choices = {"smooth": smooth, "integer": integer, "border": border}
    if set(kinds) - set(choices):
        raise ValueError(f"offset kinds must be among {OFFSET_KINDS}, got {kinds!r}")
    weights = np.array([{"smooth": 2.0}.get(k, 1.0) for k in kinds])
    kind = rng.choice(len(kinds), size=shape, p=weights / weights.sum())
    out = choices[kinds[0]]
    for n, k in enumerate(kinds[1:], start=1):
        out = np.where(kind == n, choices[k], out)
    return out


def random_deform_case(rng: np.random.Generator, *, batch=None, in_channels=None, out_channels=None,
                       groups=None, offset_groups=None, kernel=None, stride=None, padding=None, dilation=None,
                       size=None, use_mask=None, use_bias=None, offset_scale=None, offset_kinds=OFFSET_KINDS,
                       min_size=1, max_size=9, dtype=torch.float64, requires_grad=False) -> dict:
    """A random case: ``input, offset, weight, bias, mask`` tensors (bias/mask may be None)
    and ``stride, padding, dilation`` pairs, plus ``groups``, ``offset_groups`` and
    ``kernel``. Pairs may be given as ints. ``size`` is (H, W); by default it is drawn so
    that the output is at least 1x1 and the map has ``min_size``..``max_size`` pixels a
    side (more when the kernel needs it).
    """
    groups = _pick(rng, groups, [1, 2], [0.6, 0.4])
    offset_groups = _pick(rng, offset_groups, [1, 2, 3], [0.5, 0.3, 0.2])
    unit = groups * offset_groups // math.gcd(groups, offset_groups)
    in_channels = in_channels or unit * int(rng.integers(1, 3))
    out_channels = out_channels or groups * int(rng.integers(1, 3))
    pair = lambda v, choices, p=None: (v, v) if isinstance(v, int) else (  # noqa: E731
        tuple(v) if v is not None else (_pick(rng, None, choices, p), _pick(rng, None, choices, p)))
    kernel = pair(kernel, [1, 2, 3, 4], [0.15, 0.2, 0.45, 0.2])
    stride = pair(stride, [1, 2, 3], [0.6, 0.3, 0.1])
    padding = pair(padding, [0, 1, 2], [0.4, 0.4, 0.2])
    dilation = pair(dilation, [1, 2], [0.7, 0.3])
    if size is None:
        lows = [max(min_size, d * (k - 1) + 1 - 2 * p) for k, p, d in zip(kernel, padding, dilation)]
        size = tuple(int(rng.integers(low, max(low, max_size) + 1)) for low in lows)
    batch = batch or int(rng.integers(1, 3))
    use_mask = bool(rng.random() < 0.6) if use_mask is None else use_mask
    use_bias = bool(rng.random() < 0.6) if use_bias is None else use_bias
    (h, w), (kh, kw) = size, kernel
    ho, wo = (output_size(n, k, s, p, d) for n, k, s, p, d in zip(size, kernel, stride, padding, dilation))
    if ho <= 0 or wo <= 0:
        raise ValueError(f"random_deform_case: size {size} gives an empty output for kernel {kernel}, "
                         f"stride {stride}, padding {padding}, dilation {dilation}")
    scale = offset_scale if offset_scale is not None else float(rng.choice([0.5, 1.5, max(h, w) / 2 + 1]))
    shape = (batch, offset_groups, kh, kw, ho, wo)
    by = base_positions(ho, kh, stride[0], padding[0], dilation[0])[None, None, :, None, :, None]
    bx = base_positions(wo, kw, stride[1], padding[1], dilation[1])[None, None, None, :, None, :]
    dy, dx = (_offsets(rng, b, n, shape, scale, tuple(offset_kinds)) for b, n in ((by, h), (bx, w)))
    # torchvision's layout: channel 2*(g*kh*kw + i*kw + j) is dy, the next one dx.
    offset = np.stack([dy, dx], axis=4).reshape(batch, 2 * offset_groups * kh * kw, ho, wo)
    mask = None
    if use_mask:
        mask = rng.uniform(0.0, 1.0, (batch, offset_groups * kh * kw, ho, wo))
        mask[rng.random(mask.shape) < 0.1] = 0.0
        mask[rng.random(mask.shape) < 0.1] = 1.0

    def tensor(a):
        if a is None:
            return None
        t = torch.tensor(np.asarray(a), dtype=dtype)
        return t.requires_grad_() if requires_grad else t

    return {
        "input": tensor(rng.normal(size=(batch, in_channels, h, w))),
        "offset": tensor(offset),
        "weight": tensor(rng.normal(size=(out_channels, in_channels // groups, kh, kw))),
        "bias": tensor(rng.normal(size=out_channels) if use_bias else None),
        "mask": tensor(mask),
        "stride": stride, "padding": padding, "dilation": dilation,
        "groups": groups, "offset_groups": offset_groups, "kernel": kernel,
    }


def tensor_args(case: dict) -> tuple:
    """Positional arguments of ``deform_conv2d(input, offset, weight, bias, stride, padding, dilation, mask)``."""
    return (case["input"], case["offset"], case["weight"], case["bias"], case["stride"], case["padding"],
            case["dilation"], case["mask"])


def run_case(fn, case: dict, **kwargs):
    """Call a ``deform_conv2d``-compatible function on a case."""
    return fn(*tensor_args(case), **kwargs)


def describe(case: dict) -> str:
    """One line naming a case's shapes and parameters, for failure messages."""
    x, w = case["input"], case["weight"]
    return (f"input {tuple(x.shape)} weight {tuple(w.shape)} groups {case['groups']} "
            f"offset_groups {case['offset_groups']} stride {case['stride']} padding {case['padding']} "
            f"dilation {case['dilation']} mask {case['mask'] is not None} bias {case['bias'] is not None} "
            f"{x.dtype}")


FLOAT16_UNIT = 2.0 ** -11  # unit roundoff of IEEE binary16 (round to nearest)


def float16_error_bound(input, offset, weight, bias, stride, padding, dilation, mask) -> torch.Tensor:
    """Per-element bound on |out - reference| for a float16 deformable conv whose columns,
    GEMM result and bias sum are each rounded to float16 (accumulation in float32).

    The arguments are the float64 values the kernel saw. With A = sum |w| |column| (a
    reference run on |input| and |weight|: bilinear weights and the mask are >= 0) and
    |out| <= A + |bias|, the three roundings add at most u*A + u*A + u*(A + |bias|);
    4u*(A + |bias|) leaves room for the float32 sums. A relative bound on the largest
    output is no bound here: the columns' rounding scales with A, which cancellation
    can make many times the output itself."""
    from edgekit.models.deform import deform_conv2d_reference
    total = deform_conv2d_reference(input.abs(), offset, weight.abs(), None, stride, padding, dilation, mask)
    if bias is not None:
        total = total + bias.abs().view(1, -1, 1, 1)
    return 4 * FLOAT16_UNIT * total
