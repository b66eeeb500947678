"""Derive a sparse seed MLP from a reference architecture."""

from __future__ import annotations

import math

import torch

from ..select import top_k
from ..sparse import SparseMLP


def seed_widths(widths, ratio: float) -> list[int]:
    """Every hidden width times ``ratio`` (rounded, at least 1); input and output kept.

    Example:
        >>> seed_widths([784, 300, 100, 10], 0.4)
        [784, 120, 40, 10]
    """
    return [widths[0]] + [max(1, round(w * ratio)) for w in widths[1:-1]] + [widths[-1]]


def random_connected_mask(out_f: int, in_f: int, density: float, generator: torch.Generator,
                          connect_inputs: bool) -> torch.Tensor:
    """A random 0/1 mask with ``round(density * out_f * in_f)`` ones where every row has
    at least one one (each unit gets an input) and, if ``connect_inputs``, every column
    too (each feeding neuron gets an output).  More ones are used only when the
    connectivity guarantee needs them.

    Returns:
        float tensor (out_f, in_f).
    """
    mask = torch.zeros(out_f, in_f)
    mask[torch.arange(out_f), torch.randint(in_f, (out_f,), generator=generator)] = 1
    if connect_inputs:
        mask[torch.randint(out_f, (in_f,), generator=generator), torch.arange(in_f)] = 1
    extra = round(density * out_f * in_f) - int(mask.sum())
    if extra > 0:
        scores = torch.rand(out_f, in_f, generator=generator).masked_fill_(mask.bool(), -1.0)
        mask.view(-1)[top_k(scores, extra)] = 1
    return mask


def make_seed(widths, ratio: float, density: float, generator: torch.Generator,
              activations="relu", batch_norm: bool = False, topology: str = "random") -> SparseMLP:
    """The seed network: hidden widths scaled by ``ratio``, a fraction ``density`` of the
    connections of every layer active, every neuron connected.

    ``topology`` "random" draws the active connections at random; "radix" uses a
    RadiX-Net topology (:func:`nestsynth.seeds.radix.radix_seed_masks`; its density is
    quantized to radix / N', so a layer's actual density may differ from ``density``).

    Weights are drawn like PyTorch's Linear default and then scaled by
    1/sqrt(density) (for "radix", the layer's actual density), so the variance of a
    unit's input matches a dense layer despite the missing fan-in (a documented choice;
    the paper does not state its init).
    """
    model = SparseMLP(seed_widths(widths, ratio), activations, batch_norm, generator=generator)
    if topology == "radix":
        from .radix import radix_seed_masks
        masks = radix_seed_masks(model.widths, density, generator)
    else:
        masks = [random_connected_mask(layer.out_features, layer.in_features, density, generator,
                                       connect_inputs=i > 0) for i, layer in enumerate(model.layers)]
    with torch.no_grad():
        for layer, mask in zip(model.layers, masks):
            layer.mask.copy_(mask)
            scale = float(mask.mean()) if topology == "radix" else density
            layer.weight.mul_(mask / math.sqrt(scale))
    return model
