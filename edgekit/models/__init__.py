"""Models: ConvNeXt V2 with GRN, deformable convolution, detectors, and the registry.

Importing this package registers every model with :func:`create_model`.
"""

from edgekit.models.registry import create_model, list_models, register_model
from edgekit.models.grn import GRN, grn_reference
from edgekit.models.convnextv2 import ConvNeXtV2, backbone_state_dict

__all__ = ["create_model", "list_models", "register_model", "ConvNeXtV2", "backbone_state_dict",
           "GRN", "grn_reference"]

from edgekit.models.deform import (  # noqa: E402
    DeformableSkip, DeformConv2d, DeformConv2dPack, deform_conv2d_reference)
from edgekit.models.detector import RSDet  # noqa: E402

__all__ += ["DeformConv2d", "DeformConv2dPack", "DeformableSkip", "deform_conv2d_reference", "RSDet"]
