"""Gradient-based growth (paper §3.2): scores first, then selection."""

from .scores import GradientScan, gradient_scan
from .connections import grow_connections, grow_connections_global, connections_to_grow
from .neurons import bridge_neuron, grow_neurons

__all__ = ["GradientScan", "gradient_scan", "grow_connections", "grow_connections_global", "connections_to_grow",
           "bridge_neuron", "grow_neurons"]
