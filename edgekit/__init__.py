"""edgekit: take a vision model from PyTorch to an embedded device.

Public entry points: :mod:`edgekit.ops` (GRN, deformable convolution),
:func:`edgekit.models.create_model`, :mod:`edgekit.data`, and the ``edgekit`` command.
"""

__version__ = "0.1.0"

from edgekit.output import hide_third_party as _hide_third_party  # noqa: E402

_hide_third_party()
