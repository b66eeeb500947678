"""The graph IR: weight layers, the channels they read, and coupled-unit groups.

A :class:`NetGraph` describes a traced network by what matters for growing and pruning
units (neurons and feature maps):

* every weight layer (Linear, Conv2d and their masked versions), in topological order;
* for every *reader* (a weight layer's input, or a batch norm's entries) the layout of
  its input along dimension 1 as a sequence of :class:`Segment`: runs of consecutive
  channels that come from one *source*.  A source is a weight layer's output, or the
  network input (:data:`INPUT`).  Channel concatenation puts segments side by side;
  flattening an (N, C, H, W) map to (N, C*H*W) multiplies each segment's
  ``expansion`` by H*W (channel-major, as ``torch.flatten``: input feature
  ``offset + c * expansion + p`` is position ``p`` of the segment's channel ``c``);
* element-wise activations, pooling, dropout and batch norm keep the layout; a residual
  ``+`` sums two tensors channel by channel, so its segments' sources become *coupled*:
  they share one unit count and one indexing, and are merged by union-find.

A coupled *group* (:meth:`NetGraph.groups`) is the set of weight layers whose outputs are
one stream of units: adding or removing unit ``c`` changes output row ``c`` of every
member, entry ``c`` of every batch norm that normalizes the stream, and the input columns
that unit ``c`` feeds in every consumer (:class:`Slice`).  The unit counts live in one
table (:attr:`NetGraph.units`); offsets of the slices follow from it, so surgery only
has to update the count (:meth:`NetGraph.set_units`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

INPUT = "<input>"  # the source name of the network input


@dataclass(frozen=True)
class Segment:
    """Consecutive input channels of a reader that come from one coupled stream.

    Attributes:
        sources: the weight layers (or :data:`INPUT`) whose outputs are summed into
            these channels (one source unless a residual ``+`` joined several).
        expansion: inputs per source unit: 1 for feature maps and plain features,
            H*W after flattening an (N, C, H, W) map.
    """

    sources: frozenset[str]
    expansion: int = 1


@dataclass(frozen=True)
class Slice:
    """The inputs of one reader that one stream's units feed.

    Unit ``c`` of the stream feeds the reader's inputs
    ``offset + c * expansion + p`` for ``p`` in ``range(expansion)`` (input columns of a
    Linear, input channels of a Conv2d, entries of a batch norm).

    Attributes:
        reader: module path of the weight layer or batch norm that reads the units.
        sources: the producing weight layers (or :data:`INPUT`), in topological order.
        offset: the reader's first input fed by unit 0.
        units: how many units the stream has.
        expansion: inputs per unit (H*W after a flatten, else 1).
    """

    reader: str
    sources: tuple[str, ...]
    offset: int
    units: int
    expansion: int = 1

    def indices(self, units: torch.Tensor | None = None) -> torch.Tensor:
        """The reader's input indices fed by ``units`` (all units when None).

        Args:
            units: int64 unit indices of the stream.

        Returns:
            int64 indices, unit-major: the ``expansion`` inputs of each unit in turn.
        """
        units = torch.arange(self.units) if units is None else units.long()
        return (self.offset + units.view(-1, 1) * self.expansion + torch.arange(self.expansion)).flatten()


@dataclass
class Layer:
    """A weight layer of the graph (refreshed by :meth:`NetGraph.set_units`).

    Attributes:
        name: module path in the traced module (``"layer1.0.conv1"``).
        kind: the module's class name (``"Linear"``, ``"Conv2d"``, ``"MaskedConv2d"``).
        inputs: the layout of its input channels or features.
        in_hw: spatial size of its input (conv layers; None for linear layers).
        out_hw: spatial size of its output (conv layers; None for linear layers).
        in_units: input channels (conv) or features (linear).
        out_units: output channels or features.
        producers: one :class:`Slice` per input segment (the reader is this layer).
        consumers: the weight layers that read its output, in topological order.
    """

    name: str
    kind: str
    inputs: tuple[Segment, ...]
    in_hw: tuple[int, int] | None = None
    out_hw: tuple[int, int] | None = None
    in_units: int = 0
    out_units: int = 0
    producers: tuple[Slice, ...] = ()
    consumers: tuple[str, ...] = ()


@dataclass
class Norm:
    """A batch norm of the graph: its entries are the channels it normalizes.

    Attributes:
        name: module path in the traced module.
        kind: ``"BatchNorm1d"`` or ``"BatchNorm2d"``.
        inputs: the layout of its channels (features for BatchNorm1d after a flatten).
        num_features: its entries.
        slices: one :class:`Slice` per input segment.
    """

    name: str
    kind: str
    inputs: tuple[Segment, ...]
    num_features: int = 0
    slices: tuple[Slice, ...] = ()


@dataclass(frozen=True)
class Group:
    """Coupled units: weight layers whose outputs are one stream (see the module docstring).

    Attributes:
        index: position in :meth:`NetGraph.groups` (topological order of first members).
        members: the weight layers whose output rows are the units.
        units: how many units the group has.
        resizable: False when the stream is the network's output or is summed with the
            network input (their sizes are fixed by the data).
        norms: the batch-norm entries that normalize the units (``Slice.reader`` is the
            batch norm).
        reads: every (consumer layer, input slice) that reads the units.
    """

    index: int
    members: tuple[str, ...]
    units: int
    resizable: bool
    norms: tuple[Slice, ...]
    reads: tuple[Slice, ...]

    @property
    def consumers(self) -> tuple[str, ...]:
        """The weight layers that read the units, each once, in topological order."""
        return tuple(dict.fromkeys(s.reader for s in self.reads))


@dataclass
class NetGraph:
    """A traced network described by its weight layers, batch norms and coupled groups.

    Built by :func:`nestsynth.graph.capture`; the traced module is ``module`` (a
    ``torch.fx.GraphModule`` whose submodules are the model's own, so surgery on it
    changes the model), and ``module.nest_graph`` is this graph.

    Attributes:
        module: the traced module.
        input_shape: shape of the example input the shapes were propagated with.
        layers: weight layers by module path, in topological order.
        norms: batch norms by module path, in topological order.
        units: output units of every source (weight layers and :data:`INPUT`).
        outputs: the layout of the network's output(s).
        _parent: the union-find forest over sources (a residual ``+`` joins two trees).
    """

    module: nn.Module
    input_shape: tuple[int, ...]
    layers: dict[str, Layer]
    norms: dict[str, Norm]
    units: dict[str, int]
    outputs: tuple[Segment, ...]
    _parent: dict[str, str] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for source in self.units:
            self._parent.setdefault(source, source)
        self._refresh()

    # ---- union-find over sources ------------------------------------------------
    def find(self, source: str) -> str:
        """The representative of ``source``'s coupled stream (path-halving union-find)."""
        parent = self._parent
        while parent[source] != source:
            parent[source] = parent[parent[source]]
            source = parent[source]
        return source

    # ---- queries --------------------------------------------------------------
    def module_of(self, name: str) -> nn.Module:
        """The submodule at ``name`` in :attr:`module`."""
        return self.module.get_submodule(name)

    def producers(self, name: str) -> tuple[Slice, ...]:
        """The input slices of weight layer ``name`` (see :class:`Layer`)."""
        return self.layers[name].producers

    def consumers(self, name: str) -> tuple[str, ...]:
        """The weight layers that read weight layer ``name``'s output."""
        return self.layers[name].consumers

    def groups(self) -> list[Group]:
        """Coupled-unit groups of the weight layers, ordered by their first member.

        A group holding the network input but no weight layer is not listed; a group
        summed with the input, or read by the network's output, is not resizable.
        """
        output_roots = {self.find(s) for seg in self.outputs for s in seg.sources}
        input_root = self.find(INPUT)
        members: dict[str, list[str]] = {}
        for name in self.layers:
            members.setdefault(self.find(name), []).append(name)
        groups = []
        for index, (root, names) in enumerate(members.items()):
            def ours(s: Slice, root=root) -> bool:
                return self.find(s.sources[0]) == root
            groups.append(Group(
                index=index, members=tuple(names), units=self.units[names[0]],
                resizable=root != input_root and root not in output_roots,
                norms=tuple(s for norm in self.norms.values() for s in norm.slices if ours(s)),
                reads=tuple(s for layer in self.layers.values() for s in layer.producers if ours(s))))
        return groups

    def group_of(self, name: str) -> Group:
        """The group whose members include weight layer ``name``."""
        root = self.find(name)
        for group in self.groups():
            if self.find(group.members[0]) == root:
                return group
        raise KeyError(name)

    # ---- bookkeeping --------------------------------------------------------------
    def set_units(self, members, units: int) -> None:
        """Record that the sources ``members`` now have ``units`` units each (after surgery)."""
        for name in members:
            self.units[name] = int(units)
        self._refresh()

    def bind(self, module: nn.Module) -> "NetGraph":
        """A copy of this graph that describes ``module`` (a copy of :attr:`module` with the
        same module paths, e.g. from :func:`nestsynth.graph.to_masked`)."""
        return copy.deepcopy(self, memo={id(self.module): module})

    def _slices(self, reader: str, inputs: tuple[Segment, ...]) -> tuple[tuple[Slice, ...], int]:
        """The slices of a reader's input layout, and its total input size."""
        order = {name: i for i, name in enumerate([INPUT, *self.layers])}
        slices, offset = [], 0
        for seg in inputs:
            units = self.units[next(iter(seg.sources))]
            sources = tuple(sorted(seg.sources, key=order.__getitem__))
            slices.append(Slice(reader, sources, offset, units, seg.expansion))
            offset += units * seg.expansion
        return tuple(slices), offset

    def _refresh(self) -> None:
        """Recompute unit counts, slices and consumers from :attr:`units`."""
        consumers: dict[str, list[str]] = {name: [] for name in self.layers}
        for layer in self.layers.values():
            layer.producers, layer.in_units = self._slices(layer.name, layer.inputs)
            layer.out_units = self.units[layer.name]
            for s in layer.producers:
                for source in s.sources:
                    if source != INPUT and layer.name not in consumers[source]:
                        consumers[source].append(layer.name)
        for layer in self.layers.values():
            layer.consumers = tuple(consumers[layer.name])
        for norm in self.norms.values():
            norm.slices, norm.num_features = self._slices(norm.name, norm.inputs)
