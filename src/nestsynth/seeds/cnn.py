"""Derive a sparse seed CNN from a reference architecture (paper §3.1, §4.1.1, §4.2)."""

from __future__ import annotations

import math

import torch

from ..registry import CNNSpec
from ..sparse import SparseCNN
from .mlp import random_connected_mask


def cnn_seed_widths(spec: CNNSpec, ratio: float) -> list[int]:
    """The seed's units per layer: the spec's explicit seed widths (the paper's AlexNet and
    VGG-16 seeds) or every hidden width times ``ratio`` (at least 1); input and classes kept.

    Example:
        >>> cnn_seed_widths(get_model("lenet-5"), 0.5)
        [1, 10, 25, 250, 10]
    """
    w = list(spec.widths)
    hidden = list(spec.seed_hidden) if spec.seed_hidden else [max(1, round(h * ratio)) for h in w[1:-1]]
    return [w[0]] + hidden + [w[-1]]


def make_cnn_seed(spec: CNNSpec, ratio: float, density: float, generator: torch.Generator) -> SparseCNN:
    """The seed CNN: seed widths, a random ``density`` share of every layer's connections
    (single kernel weights for conv layers), every feature map and neuron connected.

    A kernel mask is drawn on the (out, in * k * k) view, so every output map gets at
    least one kernel weight and (from the second layer on) every input map feeds at
    least one.  Weights use PyTorch's default init scaled by 1/sqrt(density), as in
    the MLP seed.
    """
    model = spec.build(generator, cnn_seed_widths(spec, ratio))
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            out_f = layer.weight.shape[0]
            flat = random_connected_mask(out_f, layer.weight[0].numel(), density, generator, connect_inputs=i > 0)
            mask = flat.view_as(layer.mask)
            layer.mask.copy_(mask)
            layer.weight.mul_(mask / math.sqrt(density))
    return model
