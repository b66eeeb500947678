"""One dispatch table keyed by layer type: weight counts, FLOPs and what surgery edits.

Every per-type question the graph core asks (how many weights, how many
multiply-accumulates, which tensors are indexed by output units or by input units, which
size attributes to update after surgery) is answered by the :class:`LayerOps` entry of
the module's type in :data:`OPS`, found along the class's MRO by :func:`ops_for` (the
Torch-Pruning pattern): supporting a new layer type is one new entry.

FLOPs follow :mod:`nestsynth.metrics` exactly: 2 FLOPs per multiply-accumulate
(:func:`nestsynth.metrics.layer_flops`); biases, batch norm, activations and pooling
are not counted; a convolution costs (non-zero kernel weights of kernel n) x (output
positions it computes) summed over kernels (:func:`nestsynth.metrics.conv_macs`), with
positions that read the zero padding counted.  A plain ``nn.Linear`` / ``nn.Conv2d``
without a mask counts as dense (every weight, as :func:`nestsynth.metrics.reference_flops`);
a :class:`~nestsynth.sparse.MaskedLinear` / :class:`~nestsynth.sparse.MaskedConv2d`
counts its active (non-zero, unmasked) weights and its area mask (as
:func:`nestsynth.metrics.weight_layer_flops`); an extra mask passed to
:func:`graph_flops` multiplies the weight before counting.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import nn

from ..errors import NestError
from ..metrics import conv_macs, layer_flops
from ..sparse.conv import MaskedConv2d
from ..sparse.masked import MaskedLinear
from .ir import Layer, NetGraph


@dataclass(frozen=True)
class UnitTensor:
    """A tensor attribute of a module indexed by units along one dimension.

    Attributes:
        attr: the attribute name (``"weight"``, ``"bias"``, ``"mask"``, ``"running_var"``).
        dim: the dimension indexed by units.
        fill: the value of new entries; None means drawn like a fresh layer's weights
            (uniform in +-1/sqrt(fan_in), PyTorch's Linear/Conv2d default range).
    """

    attr: str
    dim: int
    fill: float | None


@dataclass(frozen=True)
class LayerOps:
    """What the graph core needs to know about one layer type.

    Attributes:
        weights: dense weight count of a module (0 for batch norm).
        macs: ``macs(module, layer, mask)`` multiply-accumulates of one inference
            (see the module docstring); None for layers that cost no counted FLOPs.
        outputs: tensors indexed by the module's output units (rows).
        inputs: tensors indexed by the units it reads (input columns / channels, or the
            entries of a batch norm).
        sync: updates the module's size attributes after its tensors changed shape.
    """

    weights: Callable[[nn.Module], int]
    macs: Callable[[nn.Module, Layer, torch.Tensor | None], int] | None
    outputs: tuple[UnitTensor, ...]
    inputs: tuple[UnitTensor, ...]
    sync: Callable[[nn.Module], None]


def _dense_weights(module: nn.Module) -> int:
    return int(module.weight.numel())


def _effective_weight(module: nn.Module, mask: torch.Tensor | None) -> torch.Tensor | None:
    """The weight with the module's own mask and ``mask`` applied; None when it has neither."""
    own = getattr(module, "mask", None)
    if own is None and mask is None:
        return None
    w = module.weight.detach()
    if own is not None:
        w = w * own
    if mask is not None:
        w = w * mask.to(w.dtype)
    return w


def _linear_macs(module: nn.Module, layer: Layer, mask: torch.Tensor | None) -> int:
    """out x in for a dense Linear; the non-zero effective weights otherwise."""
    w = _effective_weight(module, mask)
    return _dense_weights(module) if w is None else int(torch.count_nonzero(w))


def _conv_macs(module: nn.Module, layer: Layer, mask: torch.Tensor | None) -> int:
    """weights x H_out x W_out for a dense Conv2d; :func:`nestsynth.metrics.conv_macs` of
    the effective weight (and the area mask of a MaskedConv2d) otherwise."""
    w = _effective_weight(module, mask)
    if w is None:
        return _dense_weights(module) * math.prod(layer.out_hw)
    area = getattr(module, "area", None)
    area = torch.ones(w.shape[0], *layer.out_hw) if area is None else area
    return conv_macs(SimpleNamespace(weight=w, mask=torch.ones(()), area=area))


def _sync_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape


def _sync_conv(module: nn.Module) -> None:
    if isinstance(module, nn.Conv2d):
        module.out_channels, module.in_channels = module.weight.shape[:2]


def _sync_norm(module: nn.Module) -> None:
    stats = module.running_mean if module.running_mean is not None else module.weight
    if stats is not None:  # a norm with neither statistics nor affine weights has nothing sized
        module.num_features = int(stats.shape[0])


_ROWS = (UnitTensor("weight", 0, None), UnitTensor("bias", 0, 0.0))
_COLUMNS = (UnitTensor("weight", 1, 0.0),)
_MASK_ROWS, _MASK_COLUMNS = (UnitTensor("mask", 0, 1.0),), (UnitTensor("mask", 1, 1.0),)
_NORM_ENTRIES = (UnitTensor("weight", 0, 1.0), UnitTensor("bias", 0, 0.0),
                 UnitTensor("running_mean", 0, 0.0), UnitTensor("running_var", 0, 1.0))

_LINEAR = LayerOps(_dense_weights, _linear_macs, _ROWS, _COLUMNS, _sync_linear)
_CONV = LayerOps(_dense_weights, _conv_macs, _ROWS, _COLUMNS, _sync_conv)
_NORM = LayerOps(lambda module: 0, None, (), _NORM_ENTRIES, _sync_norm)

OPS: dict[type, LayerOps] = {
    nn.Linear: _LINEAR,
    nn.Conv2d: _CONV,
    MaskedLinear: LayerOps(_dense_weights, _linear_macs, _ROWS + _MASK_ROWS, _COLUMNS + _MASK_COLUMNS,
                           _sync_linear),
    MaskedConv2d: LayerOps(_dense_weights, _conv_macs, _ROWS + _MASK_ROWS + (UnitTensor("area", 0, 1.0),),
                           _COLUMNS + _MASK_COLUMNS, _sync_conv),
    nn.BatchNorm1d: _NORM,
    nn.BatchNorm2d: _NORM,
}


def ops_for(module: nn.Module) -> LayerOps:
    """The :data:`OPS` entry of the nearest class in ``module``'s MRO.

    Raises:
        NestError: no class of the module's MRO has an entry.
    """
    for cls in type(module).__mro__:
        if cls in OPS:
            return OPS[cls]
    raise NestError(f"the graph core has no entry for {type(module).__name__} layers.")


def layer_costs(graph: NetGraph, masks: Mapping[str, torch.Tensor] | None = None) -> list[dict]:
    """Per weight layer: dense weights, multiply-accumulates and FLOPs.

    Args:
        graph: a captured graph.
        masks: optional 0/1 masks of weight shape by layer name (others count as above).

    Returns:
        One dict per weight layer in topological order with ``name``, ``kind``,
        ``weights`` (dense), ``macs`` and ``flops`` (2 x macs).

    Raises:
        NestError: a mask names no weight layer of the graph.
    """
    masks = dict(masks or {})
    unknown = sorted(set(masks) - set(graph.layers))
    if unknown:
        raise NestError(f"masks name {unknown[0]!r}, which is not a weight layer of the graph.")
    rows = []
    for name, layer in graph.layers.items():
        module = graph.module_of(name)
        ops = ops_for(module)
        macs = ops.macs(module, layer, masks.get(name))
        rows.append({"name": name, "kind": layer.kind, "weights": ops.weights(module), "macs": macs,
                     "flops": int(layer_flops(macs))})
    return rows


def graph_weights(graph: NetGraph) -> int:
    """Dense weights of every weight layer (out x in x kh x kw; biases and batch norm not counted)."""
    return sum(ops_for(graph.module_of(name)).weights(graph.module_of(name)) for name in graph.layers)


def graph_flops(graph: NetGraph, masks: Mapping[str, torch.Tensor] | None = None) -> int:
    """FLOPs of one inference, the :mod:`nestsynth.metrics` convention (see the module docstring).

    Args:
        graph: a captured graph.
        masks: optional 0/1 masks of weight shape by layer name.

    Returns:
        2 x the multiply-accumulates of every weight layer.
    """
    return sum(row["flops"] for row in layer_costs(graph, masks))
