"""Public operators: GRN and deformable convolution, dispatched to a kernel backend.

``backend`` is one of ``auto``, ``torch`` (the pure-PyTorch reference), ``numba``,
``numba-cuda`` or ``cuda``. ``EDGEKIT_BACKEND`` overrides ``auto``. Asking for a backend
that cannot run here raises :class:`edgekit.errors.BackendUnavailableError`.
"""

from __future__ import annotations

import torch

from edgekit.kernels import dispatch


def grn(
    x: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    eps: float = 1e-6,
    data_format: str = "channels_last",
    backend: str = "auto",
) -> torch.Tensor:
    """Global Response Normalization (ConvNeXt V2).

    ``x`` is NHWC for ``channels_last`` and NCHW for ``channels_first``; ``gamma`` and
    ``beta`` have C elements (any shape that flattens to C, e.g. (1, 1, 1, C)).
    The L2 reduction is accumulated in float32 whatever the input dtype.
    """
    if data_format not in ("channels_last", "channels_first"):
        raise ValueError(f"grn: data_format must be 'channels_last' or 'channels_first', got {data_format!r}")
    impl = dispatch.resolve("grn", backend, x, _needs_grad(x, gamma, beta))
    return impl(x, gamma, beta, eps, data_format)


def deform_conv2d(
    input: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    mask: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Deformable convolution v1 (``mask=None``) and v2, with torchvision's semantics.

    ``offset`` is [B, 2*offset_groups*kh*kw, Ho, Wo] holding (dy, dx) per kernel point;
    ``mask`` is [B, offset_groups*kh*kw, Ho, Wo]; samples outside the map read zeros.
    """
    impl = dispatch.resolve("deform_conv2d", backend, input, _needs_grad(input, offset, weight, bias, mask))
    return impl(input, offset, weight, bias, as_pair(stride, "stride"),
                as_pair(padding, "padding"), as_pair(dilation, "dilation"), mask)


def _needs_grad(*tensors) -> bool:
    """Whether autograd will need a backward through the op (any operand may be trainable)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def as_pair(v, name: str = "argument") -> tuple[int, int]:
    """An int or a pair of ints -> a pair (torchvision's convention for conv arguments)."""
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(i) for i in v)
    if len(v) != 2:
        raise ValueError(f"deform_conv2d: {name} must be an int or a pair of ints, got {v!r}")
    return v
