"""The deploy form of an edgekit model: the same parameters, a graph that runtimes run faster.

:func:`to_deploy_form` returns a copy of a model whose layers compute the training form's
function in the form that ONNX Runtime's CPU provider fuses best (measured in
``benchmarks/deploy_form.py``). It swaps the class of three kinds of layers (their
parameters, names and shapes stay as they are, so every exported initializer keeps its
torch name and shape, and the QDQ writer finds each layer's weight by name):

- ConvNeXt V2 :class:`Block`: channels-first throughout. The pointwise Linear layers
  become 1x1 convolutions over a reshaped view of the Linear weight (the exporter writes
  ``Reshape(<path>.weight)``, which runtimes fold at load), so no permute pair wraps the
  block's body and ORT runs them as blocked NCHWc convolutions (pwconv2 with the residual
  add fused in). GELU is ``F.gelu``, which the exporter writes as one opset-20 ``Gelu``.
  LayerNorm keeps its trailing-axis ``LayerNormalization`` between two transposes: ORT
  folds them into its NCHWc reorders (``ReorderOutput(channels_last=1)``), which measured
  faster than a channel-axis ReduceMean decomposition in NCHW. GRN is rewritten as
  ``x * (gamma * Nx + 1) + beta`` (see :func:`grn_channels_first`).
- :class:`DeformConv2dPack` (modulated): offsets and mask are two slices of the offset
  conv's output instead of ``chunk`` + ``cat`` (which export as SplitToSequence,
  SequenceAt and Concat); ``cat(o1, o2)`` of the first two chunks is exactly the first
  two thirds of the channels.

Everything else (stems, FPN, head, GroupNorm) is unchanged.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from edgekit.models.convnextv2 import Block
from edgekit.models.deform import DeformConv2d, DeformConv2dPack

FORMS = ("deploy", "training")


def grn_channels_first(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float) -> torch.Tensor:
    """GRN of an NCHW tensor as ``x * (gamma * Nx + 1) + beta``.

    The same function as :func:`edgekit.models.grn.grn_reference`'s ``gamma * (x * Nx) + beta + x``
    with two full-size passes (one Mul, one Add) instead of four; the per-channel factor
    ``gamma * Nx + 1`` is [N, C, 1, 1]. The spatial L2 norm is reduced in float32 whatever
    ``x``'s dtype (float16 sums of squares overflow), as the reference does; the
    contiguous H*W axes of NCHW make it a fast reduction, where channels-last reduced
    across strided axes.
    """
    channels = x.shape[1]
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    gx = torch.linalg.vector_norm(x.to(compute), ord=2, dim=(2, 3), keepdim=True)
    nx = gx / (gx.mean(dim=1, keepdim=True) + eps)
    factor = gamma.reshape(1, channels, 1, 1).to(compute) * nx + 1.0
    return x * factor.to(x.dtype) + beta.reshape(1, channels, 1, 1).to(x.dtype)


def pointwise_conv(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``linear`` applied to the channels of NCHW ``x`` as a 1x1 convolution over its own weight."""
    out_features, in_features = linear.weight.shape
    return F.conv2d(x, linear.weight.reshape(out_features, in_features, 1, 1), linear.bias)


class DeployBlock(Block):
    """:class:`Block` computed channels-first (its parameters unchanged); see the module docstring."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.dwconv(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        y = F.gelu(pointwise_conv(self.pwconv1, y))
        y = grn_channels_first(y, self.grn.gamma, self.grn.beta, self.grn.eps)
        return x + self.drop_path(pointwise_conv(self.pwconv2, y))


class DeployDeformConv2dPack(DeformConv2dPack):
    """:class:`DeformConv2dPack` with its offsets and mask taken as slices (no chunk/cat)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = self.conv_offset(x)
        if not self.modulated:
            return DeformConv2d.forward(self, x, out)
        split = 2 * self.offset_groups * self.kernel_points
        return DeformConv2d.forward(self, x, out[:, :split], torch.sigmoid(out[:, split:]))


# Exact classes only: a user's subclass may have its own forward, which the swap would lose.
_DEPLOY_CLASSES = {Block: DeployBlock, DeformConv2dPack: DeployDeformConv2dPack}


def to_deploy_form(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` in deploy form (``model`` itself is not touched).

    Only the class of the swapped layers changes, so ``named_parameters()``, the state
    dict and every output agree with ``model`` (to float rounding).
    """
    deployed = copy.deepcopy(model)
    for module in deployed.modules():
        swap = _DEPLOY_CLASSES.get(type(module))
        if swap is not None:
            module.__class__ = swap
    return deployed


def deployed_layers(model: nn.Module) -> dict[str, int]:
    """How many layers of each kind :func:`to_deploy_form` rewrites in ``model`` (for the export record)."""
    counts: dict[str, int] = {}
    for module in model.modules():
        swap = _DEPLOY_CLASSES.get(type(module))
        if swap is not None:
            counts[type(module).__name__] = counts.get(type(module).__name__, 0) + 1
    return counts
