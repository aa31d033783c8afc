"""Small building blocks shared by the models (timm is not a dependency, so they live here).

``LayerNorm`` keeps the official ConvNeXt parameter names (``weight``, ``bias``) so
official checkpoints load unchanged; ``DropPath`` is stochastic depth (no parameters).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

DATA_FORMATS = ("channels_last", "channels_first")


class LayerNorm(nn.Module):
    """LayerNorm over the channel dimension of NHWC (``channels_last``) or NCHW
    (``channels_first``) tensors.

    channels_first goes through ``F.layer_norm`` on a permuted view rather than the
    official hand-written mean/variance: the result agrees to float rounding, the
    statistics are accumulated in float32 under autocast (half precision
    ``(x - u) ** 2`` overflows), and it exports as one ONNX LayerNormalization.
    """

    def __init__(self, normalized_shape: int, eps: float = 1e-6, data_format: str = "channels_last"):
        super().__init__()
        if data_format not in DATA_FORMATS:
            raise ValueError(f"LayerNorm: data_format must be one of {DATA_FORMATS}, got {data_format!r}")
        self.weight = nn.Parameter(torch.ones(normalized_shape))
        self.bias = nn.Parameter(torch.zeros(normalized_shape))
        self.eps = eps
        self.data_format = data_format
        self.normalized_shape = (normalized_shape,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.data_format == "channels_last":
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape[0]}, eps={self.eps}, data_format={self.data_format}"


def drop_path(x: torch.Tensor, drop_prob: float = 0.0, training: bool = False,
              scale_by_keep: bool = True) -> torch.Tensor:
    """Zero whole samples of a residual branch with probability ``drop_prob``
    (stochastic depth), rescaling the survivors so the expectation is unchanged."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1.0 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    keep = x.new_empty(shape).bernoulli_(keep_prob)
    if keep_prob > 0.0 and scale_by_keep:
        keep.div_(keep_prob)
    return x * keep


class DropPath(nn.Module):
    """Module form of :func:`drop_path`; the identity in eval mode."""

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True):
        super().__init__()
        if not 0.0 <= drop_prob <= 1.0:
            raise ValueError(f"DropPath: drop_prob must be in [0, 1], got {drop_prob}")
        self.drop_prob = float(drop_prob)
        self.scale_by_keep = scale_by_keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training, self.scale_by_keep)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"
