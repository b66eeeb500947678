"""A graph core for any traceable PyTorch network (foundation; not wired into synthesis yet).

:func:`capture` traces a model into a :class:`NetGraph` (weight layers, the channels
they read, coupled-unit groups).
"""

from .capture import capture
from .ir import INPUT, Group, Layer, NetGraph, Norm, Segment, Slice

__all__ = ["capture", "NetGraph", "Group", "Layer", "Norm", "Segment", "Slice", "INPUT"]
