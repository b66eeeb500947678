"""A graph core for any traceable PyTorch network (foundation; not wired into synthesis yet).

:func:`capture` traces a model into a :class:`NetGraph` (weight layers, the channels
they read, coupled-unit groups); :mod:`.ops` counts weights and FLOPs through one table
keyed by layer type; :mod:`.models` holds reference networks (CIFAR ResNets).
"""

from .capture import capture
from .ir import INPUT, Group, Layer, NetGraph, Norm, Segment, Slice
from .models import resnet18_cifar, resnet20_cifar
from .ops import OPS, graph_flops, graph_weights, layer_costs, ops_for

__all__ = ["capture", "NetGraph", "Group", "Layer", "Norm", "Segment", "Slice", "INPUT", "OPS", "ops_for",
           "graph_weights", "graph_flops", "layer_costs", "resnet20_cifar", "resnet18_cifar"]
