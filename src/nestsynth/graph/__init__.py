"""A graph core for any traceable PyTorch network.

:func:`capture` traces a model into a :class:`NetGraph` (weight layers, the channels
they read, coupled-unit groups); :mod:`.ops` counts weights and FLOPs through one table
keyed by layer type; :func:`to_masked` makes a copy with the package's masked layers, and
:func:`remove_units` / :func:`add_units` resize one coupled group everywhere it is used;
:class:`SparseGraph` wraps that masked copy with what the methods use from the sparse
MLP and CNN (layers, trace, effective weights, a plain-data ``arch()``; :mod:`.plain`);
:mod:`.models` holds reference networks (CIFAR ResNets, a ResNet-8 for MNIST).
"""

from .capture import capture, capture_traced
from .ir import INPUT, Group, Layer, NetGraph, Norm, Segment, Slice
from .masked import add_units, remove_units, to_masked
from .models import resnet8_mnist, resnet18_cifar, resnet20_cifar
from .network import SparseGraph
from .ops import OPS, graph_flops, graph_weights, layer_costs, ops_for
from .plain import describe, rebuild

__all__ = ["capture", "capture_traced", "NetGraph", "Group", "Layer", "Norm", "Segment", "Slice", "INPUT", "OPS",
           "ops_for", "graph_weights", "graph_flops", "layer_costs", "to_masked", "remove_units", "add_units",
           "SparseGraph", "describe", "rebuild", "resnet8_mnist", "resnet20_cifar", "resnet18_cifar"]
