"""Gradient-based growth (paper §3.2): scores first, then selection."""

from .scores import GradientScan, gradient_scan
from .connections import grow_connections, grow_connections_global, connections_to_grow
from .neurons import bridge_neuron, grow_neurons
from .conv import dormant_topk, layer_gradients, top_dormant, weight_gradient
from .feature_maps import grow_feature_map, grow_feature_maps

__all__ = ["GradientScan", "gradient_scan", "grow_connections", "grow_connections_global", "connections_to_grow",
           "bridge_neuron", "grow_neurons", "dormant_topk", "layer_gradients", "top_dormant", "weight_gradient",
           "grow_feature_map", "grow_feature_maps"]
