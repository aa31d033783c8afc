"""Global Response Normalization (ConvNeXt V2): the pure-PyTorch reference and the module.

GRN divides each channel's spatial L2 norm by the mean of those norms over channels and
uses the ratio to re-weight the channel. The sum of squares over H*W overflows float16
(max 65504) for ordinary activations, which turns a half-precision GRN into inf/NaN (the
known TensorRT-FP16 ConvNeXt V2 failure); the reference therefore always reduces in
float32 (float64 stays float64) and only casts the result back to the input's dtype.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from edgekit import ops

_LAYOUTS = {
    # data_format: (spatial dims reduced by the L2 norm, channel dim, parameter shape)
    "channels_last": ((1, 2), 3, (1, 1, 1, -1)),
    "channels_first": ((2, 3), 1, (1, -1, 1, 1)),
}


def grn_reference(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float = 1e-6,
                  data_format: str = "channels_last") -> torch.Tensor:
    """GRN of a 4-D tensor: ``gamma * (x * Nx) + beta + x`` with
    ``Nx = ||x||_HW / (mean_C ||x||_HW + eps)``; differentiable, any device.

    In float32 this is bit-for-bit the official formula; half-precision inputs are
    reduced in float32 and the output is returned in ``x.dtype``.
    """
    if data_format not in _LAYOUTS:
        raise ValueError(f"grn: data_format must be one of {tuple(_LAYOUTS)}, got {data_format!r}")
    if x.ndim != 4:
        raise ValueError(f"grn: expected a 4-D tensor, got shape {tuple(x.shape)}")
    spatial, channel, param_shape = _LAYOUTS[data_format]
    channels = x.shape[channel]
    if not torch.jit.is_tracing() and (gamma.numel() != channels or beta.numel() != channels):
        raise ValueError(f"grn: gamma and beta need {channels} elements ({data_format} input of shape "
                         f"{tuple(x.shape)}), got {gamma.numel()} and {beta.numel()}")
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(compute)
    g = gamma.reshape(param_shape).to(compute)
    b = beta.reshape(param_shape).to(compute)
    gx = torch.norm(xf, p=2, dim=spatial, keepdim=True)
    nx = gx / (gx.mean(dim=channel, keepdim=True) + eps)
    return (g * (xf * nx) + b + xf).to(x.dtype)


class GRN(nn.Module):
    """GRN layer with the official parameter names and shapes (``gamma``, ``beta``:
    (1, 1, 1, dim), zero-initialised so a fresh GRN is the identity); the computation
    goes through :func:`edgekit.ops.grn` so a fast kernel backend can be chosen."""

    def __init__(self, dim: int, eps: float = 1e-6, data_format: str = "channels_last",
                 backend: str = "auto"):
        super().__init__()
        if data_format not in _LAYOUTS:
            raise ValueError(f"GRN: data_format must be one of {tuple(_LAYOUTS)}, got {data_format!r}")
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.eps = eps
        self.data_format = data_format
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.grn(x, self.gamma, self.beta, self.eps, self.data_format, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{self.gamma.shape[-1]}, eps={self.eps}, data_format={self.data_format}, backend={self.backend}"
