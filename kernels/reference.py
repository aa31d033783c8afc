"""The pure-PyTorch reference backend: always available, differentiable, any device."""

from edgekit.models.deform import deform_conv2d_reference as deform_conv2d  # noqa: F401
from edgekit.models.grn import grn_reference as grn  # noqa: F401

DEVICES = frozenset({"cpu", "cuda"})
SUPPORTS_BACKWARD = frozenset({"grn", "deform_conv2d"})


def unavailable_reason():
    return None
