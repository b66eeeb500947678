"""Derive a sparse seed from a graph reference (a :class:`~nestsynth.graph.SparseGraph`):
the chain seed's rules (paper §3.1, §4.1.1) applied by graph surgery.

* Width: every resizable coupled group keeps ``max(1, round(ratio * units))`` of its units
  (:meth:`~nestsynth.graph.SparseGraph.remove_units`, so a residual stream narrows in
  every member, batch norm and reader at once); groups fixed by the data (the classifier,
  a stream summed with the input) keep their size.
* Weights: the reference's weights are drawn like a fresh layer's, uniform in
  +-1/sqrt(fan_in) of the *reference* width; after narrowing they are rescaled to the
  seed's fan-in (weights and biases times sqrt(fan_in_ref / fan_in_seed)), i.e. drawn as a
  fresh layer of the seed's width, as the chain seed is.
* Connections: a random ``density`` share of each layer's connections (single kernel
  weights for a convolution, drawn on the (out, in * kh * kw) view) with every output unit
  fed and, for a layer that does not read the network input, every input unit read
  (:func:`~nestsynth.seeds.mlp.random_connected_mask`); weights scaled by 1/sqrt(density).
"""

from __future__ import annotations

import math

import torch

from ..graph.ir import INPUT
from .mlp import random_connected_mask


def seed_group_units(units: int, ratio: float) -> int:
    """Units a resizable group keeps in the seed."""
    return max(1, round(units * ratio))


@torch.no_grad()
def make_graph_seed(dense, ratio: float, density: float, generator: torch.Generator):
    """The seed of a dense SparseGraph (changed in place and returned; see the module docstring).

    Args:
        dense: the reference as a SparseGraph with freshly drawn weights.
        ratio: share of every resizable group's units kept.
        density: share of every layer's connections switched on.
        generator: RNG of the masks.
    """
    fan_in = [layer.weight[0].numel() for layer in dense.layers]
    for group in dense.groups():
        if group.resizable:
            keep = torch.zeros(group.units, dtype=torch.bool)
            keep[:seed_group_units(group.units, ratio)] = True
            dense.remove_units(group, keep)
    graph = dense.graph
    for name, layer, ref_fan_in in zip(dense.layer_names, dense.layers, fan_in):
        scale = math.sqrt(ref_fan_in / layer.weight[0].numel())
        layer.weight.mul_(scale)
        layer.bias.mul_(scale)
        reads_input = any(INPUT in s.sources for s in graph.producers(name))
        flat = random_connected_mask(layer.weight.shape[0], layer.weight[0].numel(), density, generator,
                                     connect_inputs=not reads_input)
        mask = flat.view_as(layer.mask).to(layer.mask)
        layer.mask.copy_(mask)
        layer.weight.mul_(mask / math.sqrt(density))
    return dense
