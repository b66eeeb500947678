"""A graph core for any traceable PyTorch network (foundation; not wired into synthesis yet).

:func:`capture` traces a model into a :class:`NetGraph` (weight layers, the channels
they read, coupled-unit groups); :mod:`.ops` counts weights and FLOPs through one table
keyed by layer type; :func:`to_masked` makes a copy with the package's masked layers, and
:func:`remove_units` / :func:`add_units` resize one coupled group everywhere it is used;
:mod:`.models` holds reference networks (CIFAR ResNets).
"""

from .capture import capture
from .ir import INPUT, Group, Layer, NetGraph, Norm, Segment, Slice
from .masked import add_units, remove_units, to_masked
from .models import resnet18_cifar, resnet20_cifar
from .ops import OPS, graph_flops, graph_weights, layer_costs, ops_for

__all__ = ["capture", "NetGraph", "Group", "Layer", "Norm", "Segment", "Slice", "INPUT", "OPS", "ops_for",
           "graph_weights", "graph_flops", "layer_costs", "to_masked", "remove_units", "add_units",
           "resnet20_cifar", "resnet18_cifar"]
