"""Models: ConvNeXt V2 with GRN, deformable convolution, detectors, and the registry.

Importing this package registers every model with :func:`create_model`.
"""

from edgekit.models.registry import create_model, list_models, register_model
from edgekit.models.grn import GRN, grn_reference
from edgekit.models.convnextv2 import ConvNeXtV2, backbone_state_dict

__all__ = ["create_model", "list_models", "register_model", "ConvNeXtV2", "backbone_state_dict",
           "GRN", "grn_reference"]

from edgekit.models import deform  # noqa: F401,E402
from edgekit.models import detector  # noqa: F401,E402
