"""RadiX-Net baseline: train from scratch on a fixed RadiX-Net topology (seed 002).

radix (Robinett & Kepner 2019, "RadiX-Net: Structured Sparse Matrices for Deep Neural
Networks"; trained from scratch by Alford, Robinett, Milechin & Kepner 2019, "Training
Behavior of Sparse Neural Network Topologies")
    Definition followed: the reference MLP's layers get fixed RadiX-Net masks (extended
    mixed-radix topology on ``N'`` nodes, blown up to the layer widths; see
    :mod:`nestsynth.seeds.radix` for the exact construction) and the sparse network trains
    for ``epochs`` with ``cfg.train``.  The topology never changes.
    ``topology = "radix"``: the RadiX-Net.  With ``radices`` empty, ``N'`` and one radix
    per layer are chosen so that every layer's density is nearest to ``density``
    (quantized to ``radix / N'``; LeNet-300-100 at 0.1 gives ``N' = 100`` and radices
    ((10, 10), (10)), exactly 10% of each layer); otherwise ``radices`` gives one radix per
    layer on ``nodes`` nodes (0: their product, i.e. one mixed-radix system).
    ``topology = "random"``: the control of Alford et al. ("the random equivalent"):
    random masks with exactly the same number of connections per layer as the RadiX-Net
    of these settings, every neuron connected.
    Defaults: density 0.2 (at 0.1 digits' 64-64-32-10 gets a 10-output layer of 36 weights
    and ends at 18.6% test error; 0.2: 3.3%), epochs 30, ``rescale_init`` false (the layers keep PyTorch's
    dense initialization, as the other from-scratch sparse baselines here; true scales
    each layer's weights by ``1/sqrt(layer density)`` as NeST's seed does).
    Deviations: the reference widths (784-300-100-10) are not ``N' * B_i`` products, so the
    Kronecker blow-up is done by an index map with blocks of uneven size (exact Kronecker
    product when ``N'`` divides every width), documented in :mod:`nestsynth.seeds.radix`;
    the optimizer is ``cfg.train``'s (Adam by default) instead of the authors' TensorFlow
    setup.

MLP references only (a CNN reference is refused with a NestError before any work): RadiX-Net
topologies are masks of fully connected layers.  Chains only (a graph reference is refused the
same way): the topology is built for consecutive layer widths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..config import check
from ..errors import NestError
from ..seeds.radix import choose_radices, radix_masks_for_widths, random_equivalent, split_radices
from ..sparse import SparseMLP, set_mask
from .context import chain_only, mlp_only
from .registry import register_method

TOPOLOGIES = ("radix", "random")


@dataclass
class RadixMethodConfig:
    """[methods.radix]: a fixed RadiX-Net (or its random equivalent) trained from scratch."""

    density: float = 0.2  # target density of every layer (used when radices is empty)
    radices: list = field(default_factory=list)  # one radix per layer, e.g. [10, 10, 10]; [] = from density
    nodes: int = 0  # N' for explicit radices; 0 = product of the radices (one mixed-radix system)
    topology: str = "radix"  # radix | random (same per-layer connection counts, random positions)
    epochs: int = 30
    rescale_init: bool = False  # weights x 1/sqrt(layer density) after masking

    def validate(self, prefix: str) -> None:
        check(0 < self.density <= 1, f"{prefix}.density", self.density, "in (0, 1]")
        check(all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in self.radices),
              f"{prefix}.radices", self.radices, "a list of integers >= 1")
        check(self.nodes >= 0, f"{prefix}.nodes", self.nodes, ">= 0")
        check(self.topology in TOPOLOGIES, f"{prefix}.topology", self.topology, " or ".join(TOPOLOGIES))
        check(self.epochs >= 0, f"{prefix}.epochs", self.epochs, ">= 0")


def plan(widths, mcfg: RadixMethodConfig) -> tuple[int, list[list[int]]]:
    """``(N', radix_lists)`` of the RadiX-Net these settings build for ``widths``.

    Raises:
        NestError: explicit ``radices`` that do not form mixed-radix systems on ``nodes``.
    """
    if not mcfg.radices:
        return choose_radices(widths, mcfg.density)
    n_nodes = mcfg.nodes or math.prod(mcfg.radices)
    try:
        return n_nodes, split_radices(mcfg.radices, n_nodes)
    except ValueError as exc:
        raise NestError(f"methods.radix.radices: {exc}.") from None


def build_masks(widths, mcfg: RadixMethodConfig, generator: torch.Generator) -> list[torch.Tensor]:
    """The masks of the run: the RadiX-Net of :func:`plan`, or its random equivalent.

    Returns:
        One float (out, in) mask per layer.
    """
    _, radix_lists = plan(widths, mcfg)
    masks = radix_masks_for_widths(widths, radices=radix_lists, generator=generator)
    return random_equivalent(masks, generator) if mcfg.topology == "random" else masks


def install(model: SparseMLP, masks, rescale: bool) -> None:
    """Put ``masks`` on the model's layers (dormant weights zeroed), optionally rescaling."""
    for layer, mask in zip(model.layers, masks):
        set_mask(layer, mask.to(layer.mask.device))
        if rescale:
            with torch.no_grad():
                layer.weight.mul_(1.0 / math.sqrt(float(mask.mean())))


@register_method("radix", RadixMethodConfig,
                 "RadiX-Net (Robinett & Kepner 2019) fixed sparse topology, trained from scratch")
@chain_only("a RadiX-Net is a topology of consecutive layer widths, which only a chain has")
@mlp_only("RadiX-Net topologies are defined for fully connected layers only")
def run_radix(ctx, mcfg: RadixMethodConfig) -> SparseMLP:
    """Train the reference MLP from scratch on a fixed RadiX-Net (or random-equivalent) topology."""
    model = ctx.dense_model()
    masks = build_masks(ctx.widths, mcfg, ctx.generator)
    install(model, masks, mcfg.rescale_init)
    n_nodes, radix_lists = plan(ctx.widths, mcfg)
    info = {"topology": mcfg.topology, "nodes": n_nodes, "radix_lists": radix_lists,
            "layer_density": [round(float(m.mean()), 6) for m in masks]}
    ctx.log("init", 0, model, **info)
    ctx.train(model, mcfg.epochs, on_epoch=lambda e: ctx.log("train", e + 1, model))
    model.zero_dormant()
    ctx.log("final", mcfg.epochs, model, **info)
    return model
