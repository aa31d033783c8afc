"""edgekit: take a vision model from PyTorch to an embedded device.

Public entry points: :mod:`edgekit.ops` (GRN, deformable convolution),
:func:`edgekit.models.create_model`, :mod:`edgekit.data`, and the ``edgekit`` command.
"""

__version__ = "0.1.0"
