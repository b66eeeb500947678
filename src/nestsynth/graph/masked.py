"""Masked copies of captured networks, and unit surgery on coupled groups.

:func:`to_masked` turns a captured network into a ``torch.fx.GraphModule`` whose
Linear / Conv2d layers are the package's :class:`~nestsynth.sparse.MaskedLinear` /
:class:`~nestsynth.sparse.MaskedConv2d` (same weights, every mask one), so the connection
growth and pruning of :mod:`nestsynth.sparse` apply to any supported architecture.

:func:`remove_units` and :func:`add_units` change the units (neurons or feature maps) of
one coupled group (:meth:`nestsynth.graph.NetGraph.groups`) consistently: the output
rows of every member (weight, bias, mask, area mask), the entries of every batch norm
that normalizes the units (weight, bias, running mean and variance), and the inputs
every consumer reads from them (input columns of a Linear, input channels of a Conv2d,
at their offset in a channel concatenation and expanded by H*W after a flatten).  The
per-type details come from the dispatch table (:func:`nestsynth.graph.ops.ops_for`).
Both work on any module that carries a ``nest_graph`` (from :func:`to_masked`, or the
``graph.module`` of :func:`nestsynth.graph.capture`, whose submodules are the model's
own), and update that graph, so every other group's slices (cat offsets) stay right.

Parameters keep their identity (``param.data`` is replaced), so an optimizer built
before the surgery goes on working; its per-parameter state tensors are edited the same
way, with zeros for new entries (as :mod:`nestsynth.sparse.surgery`).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..errors import NestError
from ..sparse.conv import MaskedConv2d
from ..sparse.masked import MaskedLinear
from ..sparse.surgery import _edit
from .ir import Group, Layer, NetGraph, Slice
from .ops import UnitTensor, ops_for


class GraphMaskedConv2d(MaskedConv2d):
    """The :class:`~nestsynth.sparse.MaskedConv2d` that :func:`to_masked` builds: the same
    layer (masks, area mask, ``conv``), plus dilation ``(dh, dw)`` and a forward that
    passes the bias to ``F.conv2d`` as ``nn.Conv2d`` does.

    Adding the bias after the convolution, as the parent does, is the same function,
    but PyTorch may take another kernel (1x1 convolutions become a matrix product with
    the bias fused in), which changes the last bit of some outputs; fusing it keeps the
    masked copy bit-identical to the original network.
    """

    dilation: tuple[int, int] = (1, 1)

    def conv(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.mask, None, self.stride, self.padding, self.dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(x, self.weight * self.mask, self.bias, self.stride, self.padding, self.dilation)
        return y * self.area if not bool(self.area.all()) else y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dilation={self.dilation}"


def _compact(value):
    """``(k, k)`` -> ``k``; strings ("same") and unequal pairs unchanged."""
    if isinstance(value, tuple) and len(set(value)) == 1:
        return value[0]
    return value


def _copy_weights(dst: nn.Module, src: nn.Module) -> nn.Module:
    """Give ``dst`` (a fresh masked layer) ``src``'s weight, bias (zeros without one), a
    mask of ones, ``src``'s device, dtype and train/eval mode."""
    with torch.no_grad():
        dst.weight.data = src.weight.detach().clone()
        dst.bias.data = src.bias.detach().clone() if src.bias is not None else torch.zeros_like(dst.bias)
        dst.mask = torch.ones_like(dst.weight)
    return dst.to(device=src.weight.device, dtype=src.weight.dtype).train(src.training)


def masked_layer(module: nn.Module, layer: Layer) -> nn.Module:
    """The masked equivalent of an ``nn.Linear`` or ``nn.Conv2d`` (same weights, full masks).

    Args:
        module: the layer to copy.
        layer: its graph entry (a convolution's output size fixes its area mask).

    Returns:
        A MaskedLinear, or a :class:`GraphMaskedConv2d` (a MaskedConv2d) with the
        convolution's stride, padding (an int when both sides agree) and dilation.
    """
    if isinstance(module, nn.Linear):
        return _copy_weights(MaskedLinear(module.in_features, module.out_features), module)
    new = GraphMaskedConv2d(module.in_channels, module.out_channels, module.kernel_size[0], layer.out_hw)
    new.stride, new.padding, new.dilation = _compact(module.stride), _compact(module.padding), module.dilation
    return _copy_weights(new, module)


def _replace(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def to_masked(graph: NetGraph) -> fx.GraphModule:
    """A copy of the captured network whose weight layers are masked layers.

    Args:
        graph: from :func:`nestsynth.graph.capture`.

    Returns:
        A ``torch.fx.GraphModule`` (a deep copy; the model is not changed) with the same
        module paths, in which every ``nn.Linear`` / ``nn.Conv2d`` is a MaskedLinear /
        MaskedConv2d with the same weights and every mask one, so its forward equals the
        model's.  Its ``nest_graph`` attribute is the graph of the copy.  A convolution's
        area mask is sized for the example input the graph was captured with.
    """
    module = copy.deepcopy(graph.module)
    for name, layer in graph.layers.items():
        old = module.get_submodule(name)
        if isinstance(old, (nn.Linear, nn.Conv2d)):
            _replace(module, name, masked_layer(old, layer))
    module.nest_graph = graph.bind(module)
    for name, layer in module.nest_graph.layers.items():
        layer.kind = type(module.get_submodule(name)).__name__
    return module


# ---- surgery ---------------------------------------------------------------------

def _current_group(graph_module: nn.Module, group: Group) -> tuple[NetGraph, Group]:
    """The module's graph and the present state of ``group`` (found by its members)."""
    graph = getattr(graph_module, "nest_graph", None)
    if not isinstance(graph, NetGraph):
        raise NestError("unit surgery needs a module made by capture() or to_masked(), which carries a nest_graph.")
    if not group.members or group.members[0] not in graph.layers:
        raise NestError(f"the group with members {list(group.members)} is not a group of this module's graph.")
    current = graph.group_of(group.members[0])
    if current.members != group.members:
        raise NestError(f"the group with members {list(group.members)} is not a group of this module's graph.")
    if not current.resizable:
        raise NestError(f"group {current.index} ({', '.join(current.members)}) cannot be resized because it feeds "
                        "the network's output or is summed with the network input.")
    return graph, current


def _reader_plan(graph: NetGraph, slices: tuple[Slice, ...], root: str, kept: torch.Tensor,
                 n_new: int) -> torch.Tensor:
    """Old input index of each new input of a reader (-1 for a new unit's inputs)."""
    pieces = []
    for s in slices:
        if graph.find(s.sources[0]) != root:
            pieces.append(s.indices())
            continue
        pieces.append(s.indices(kept))
        pieces.append(torch.full((n_new * s.expansion,), -1, dtype=torch.long))
    return torch.cat(pieces)


def _new_entries(spec: UnitTensor, shape: list[int], like: torch.Tensor,
                 generator: torch.Generator | None) -> torch.Tensor:
    """Values of new entries: ``spec.fill``, or uniform in +-1/sqrt(fan_in) for new weight rows."""
    if spec.fill is not None:
        return torch.full(shape, spec.fill, dtype=like.dtype, device=like.device)
    bound = 1.0 / math.sqrt(max(1, math.prod(shape[1:])))
    return torch.empty(shape, dtype=like.dtype).uniform_(-bound, bound, generator=generator).to(like.device)


def _regather(module: nn.Module, spec: UnitTensor, plan: torch.Tensor, optimizer,
              generator: torch.Generator | None) -> None:
    """Rebuild ``module.<spec.attr>`` along ``spec.dim`` from ``plan`` (old indices; -1 = new)."""
    tensor = getattr(module, spec.attr, None)
    if tensor is None:
        return
    plan = plan.to(tensor.device)
    source, new = plan.clamp(min=0), (plan < 0).nonzero().flatten()

    def rebuild(t: torch.Tensor, values) -> torch.Tensor:
        out = t.index_select(spec.dim, source)
        if len(new):
            shape = list(out.shape)
            shape[spec.dim] = len(new)
            out.index_copy_(spec.dim, new, values(shape, t))
        return out

    with torch.no_grad():
        _edit(tensor, optimizer, lambda t: rebuild(t, lambda shape, x: _new_entries(spec, shape, x, generator)),
              lambda t: rebuild(t, lambda shape, x: torch.zeros(shape, dtype=x.dtype, device=x.device)))


def _resize(graph_module: nn.Module, group: Group, kept: torch.Tensor, n_new: int, optimizer,
            generator: torch.Generator | None) -> Group:
    """Keep units ``kept`` (sorted indices) of ``group`` and append ``n_new`` new ones."""
    graph, group = _current_group(graph_module, group)
    root = graph.find(group.members[0])
    member_plan = torch.cat([kept, torch.full((n_new,), -1, dtype=torch.long)])
    for name in group.members:
        module = graph_module.get_submodule(name)
        ops = ops_for(module)
        for spec in ops.outputs:
            _regather(module, spec, member_plan, optimizer, generator)
        ops.sync(module)
    readers = [(layer.name, layer.producers) for layer in graph.layers.values()] + \
              [(norm.name, norm.slices) for norm in graph.norms.values()]
    for name, slices in readers:
        if all(graph.find(s.sources[0]) != root for s in slices):
            continue
        module = graph_module.get_submodule(name)
        ops = ops_for(module)
        plan = _reader_plan(graph, slices, root, kept, n_new)
        for spec in ops.inputs:
            _regather(module, spec, plan, optimizer, generator)
        ops.sync(module)
    graph.set_units(group.members, len(kept) + n_new)
    return graph.group_of(group.members[0])


def remove_units(graph_module: nn.Module, group: Group, keep: torch.Tensor, optimizer=None) -> Group:
    """Remove the units of a coupled group where ``keep`` is False, everywhere they are used.

    Args:
        graph_module: a module with a ``nest_graph`` (:func:`to_masked`, or a captured
            ``graph.module``); it is changed in place.
        group: a group of that graph (found again by its members, so a group from before
            an earlier surgery is fine).
        keep: bool, one entry per present unit of the group.
        optimizer: an optimizer over the module's parameters whose state is cut alike.

    Returns:
        The group after the surgery.

    Raises:
        NestError: the group is not resizable or not of this graph, ``keep`` has the
            wrong length, or it would remove every unit.
    """
    _, current = _current_group(graph_module, group)
    keep = torch.as_tensor(keep, dtype=torch.bool).flatten()
    if len(keep) != current.units:
        raise NestError(f"keep has {len(keep)} entries but group {current.index} has {current.units} units.")
    if not bool(keep.any()):
        raise NestError(f"cannot remove every unit of group {current.index} ({', '.join(current.members)}).")
    return _resize(graph_module, current, keep.nonzero().flatten().cpu(), 0, optimizer, None)


def add_units(graph_module: nn.Module, group: Group, n: int, optimizer=None,
              generator: torch.Generator | None = None) -> Group:
    """Append ``n`` units to a coupled group without changing the network's function.

    New output rows of the members get weights drawn like a fresh layer's (uniform in
    +-1/sqrt(fan_in)), zero biases and full masks; new batch-norm entries are the
    identity (weight 1, bias 0, mean 0, variance 1); every consumer's new input columns
    are zero (masks one, so training can grow them), so the output is unchanged.

    Args:
        graph_module: a module with a ``nest_graph``; it is changed in place.
        group: a group of that graph.
        n: units to add (0 changes nothing).
        optimizer: an optimizer whose state gets zeros for the new entries.
        generator: RNG for the new rows' weights.

    Returns:
        The group after the surgery.

    Raises:
        NestError: the group is not resizable or not of this graph, or ``n`` < 0.
    """
    _, current = _current_group(graph_module, group)
    if int(n) < 0:
        raise NestError(f"cannot add {n} units; give a count of 0 or more.")
    return _resize(graph_module, current, torch.arange(current.units), int(n), optimizer, generator)
