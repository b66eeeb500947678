""":class:`SparseGraph`: any captured network with masked weight layers, offering what the
methods use from the sparse MLP and CNN (:class:`~nestsynth.sparse.network.MaskedLayers`).

It wraps the ``torch.fx.GraphModule`` of :func:`nestsynth.graph.to_masked` (``net``) and
its :class:`~nestsynth.graph.NetGraph` (``graph``):

* ``layers`` are the masked weight layers in graph (topological) order, so every method
  that works on ``layers`` and their masks runs unchanged; ``layer_names`` are their
  module paths, and the graph knows each one's producers, consumers and coupled group
  (:meth:`SparseGraph.groups`, :meth:`SparseGraph.consumers`);
* :meth:`SparseGraph.trace` returns every weight layer's input and (pre-batch-norm)
  output, taken by forward hooks on the layers during one ordinary forward pass;
* :meth:`SparseGraph.norm_entries` finds the batch norm that normalizes a layer's output
  channels (at their offset in a concatenation), so ``effective_weight`` and
  ``folded_layer`` mean what they mean for a chain;
* :meth:`SparseGraph.arch` is plain data (:func:`nestsynth.graph.plain.describe` of the
  GraphModule, which records every layer's present shape) and :meth:`SparseGraph.from_arch`
  rebuilds the same network from it, so model files and checkpoints need no pickle;
* :meth:`SparseGraph.remove_units` / :meth:`SparseGraph.add_units` resize one coupled
  group everywhere it is used (:func:`nestsynth.graph.remove_units`).

Dense weight counts and FLOPs come from the same dispatch table as the graph core
(:mod:`nestsynth.graph.ops`), which counts as :mod:`nestsynth.metrics` does, so
``metrics.layer_table`` and ``metrics.reference_flops`` take a SparseGraph as they take a
SparseCNN.
"""

from __future__ import annotations

import math

import torch
from torch import fx, nn

from ..errors import NestError
from ..sparse.conv import MaskedConv2d
from ..sparse.masked import MaskedLinear
from ..sparse.network import MaskedLayers
from .capture import capture, capture_traced
from .ir import INPUT, Group, NetGraph
from .masked import add_units, remove_units, to_masked
from .ops import graph_flops, graph_weights
from .plain import describe, rebuild

KIND = "graph"  # arch()["kind"]


def example_input(input_shape) -> torch.Tensor:
    """The example batch a SparseGraph is captured with: two zero samples of ``input_shape``."""
    return torch.zeros(2, *(int(v) for v in input_shape))


class SparseGraph(MaskedLayers):
    """A captured network whose Linear / Conv2d layers are masked (see the module docstring).

    Args:
        module: a GraphModule made by :func:`nestsynth.graph.to_masked` (or rebuilt by
            :meth:`from_arch`): it carries ``nest_graph`` and its weight layers are
            MaskedLinear / MaskedConv2d.
        input_shape: shape of one input sample, e.g. (1, 28, 28); inputs are reshaped to it.

    Raises:
        NestError: ``module`` has no graph or a weight layer that is not masked.
    """

    def __init__(self, module: fx.GraphModule, input_shape):
        super().__init__()
        graph = getattr(module, "nest_graph", None)
        if not isinstance(graph, NetGraph):
            raise NestError("a SparseGraph needs a module made by to_masked(), which carries a nest_graph.")
        for name in graph.layers:
            if not isinstance(module.get_submodule(name), (MaskedLinear, MaskedConv2d)):
                raise NestError(f"layer '{name}' of the graph is not masked; build the SparseGraph from to_masked().")
        self.net = module
        self.input_shape = tuple(int(v) for v in input_shape)
        self._netgraph = graph

    @classmethod
    def from_module(cls, model: nn.Module, input_shape, generator: torch.Generator | None = None) -> "SparseGraph":
        """Capture ``model`` on inputs of ``input_shape`` and make its masked copy.

        Args:
            model: any module :func:`nestsynth.graph.capture` accepts (not changed).
            input_shape: shape of one input sample.
            generator: when given, every weight layer is drawn again from it, in graph
                order (weight, then bias, uniform in +-1/sqrt(fan_in): PyTorch's default
                range, as the package's masked layers; a layer built without a bias keeps
                a zero bias) and every batch norm is reset; otherwise the weights are
                ``model``'s.

        Raises:
            NestError: capture's one sentence for an unsupported model, or a module that
                cannot be stored as plain data.
        """
        if isinstance(model, SparseGraph):
            model = model.net
        graph = capture(model, example_input(input_shape))
        biased = {name for name in graph.layers if getattr(graph.module_of(name), "bias", None) is not None}
        sparse = cls(to_masked(graph), input_shape)
        describe(sparse.net)  # refuse now, not when the result is saved
        if generator is not None:
            sparse.reset_parameters(generator, biased)
        return sparse

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator, biased=None) -> None:
        """Draw every weight layer again (see :meth:`from_module`) and reset every batch norm.

        Args:
            generator: the source of the new weights.
            biased: names of the layers whose bias is drawn too (default: all); the
                others get a zero bias.
        """
        for name, layer in zip(self.layer_names, self.layers):
            bound = 1.0 / math.sqrt(max(1, layer.weight[0].numel()))
            layer.weight.uniform_(-bound, bound, generator=generator)
            layer.weight.mul_(layer.mask)
            if biased is None or name in biased:
                layer.bias.uniform_(-bound, bound, generator=generator)
            else:
                layer.bias.zero_()
        for norm in self.norms:
            norm.reset_parameters()

    # ---- structure ---------------------------------------------------------
    @property
    def graph(self) -> NetGraph:
        """The NetGraph of :attr:`net` (kept as ``net.nest_graph`` for the surgery functions)."""
        graph = self._netgraph
        if getattr(self.net, "nest_graph", None) is not graph:  # a deep copy of net drops the attribute
            self.net.nest_graph = graph
        return graph

    @property
    def layer_names(self) -> list[str]:
        """Module paths of the weight layers, in graph order."""
        return list(self._netgraph.layers)

    @property
    def layers(self) -> nn.ModuleList:
        """The masked weight layers (MaskedLinear / MaskedConv2d), in graph order.

        A ModuleList made on each access and not registered (the layers live in
        :attr:`net`; the state dict names them there), so ``model.layers[i]`` and paths
        such as ``"layers.0.weight"`` (``torch.func.functional_call``) mean what they mean
        for a SparseMLP or SparseCNN.
        """
        return nn.ModuleList(self.net.get_submodule(name) for name in self._netgraph.layers)

    @property
    def norms(self) -> list[nn.Module]:
        """The batch norms, in graph order."""
        return [self.net.get_submodule(name) for name in self._netgraph.norms]

    @property
    def widths(self) -> list[int]:
        """Input channels (features for a flat input), then every weight layer's output units."""
        units = self._netgraph.units
        return [units[INPUT]] + [units[name] for name in self._netgraph.layers]

    @property
    def has_conv(self) -> bool:
        return any(isinstance(layer, MaskedConv2d) for layer in self.layers)

    @property
    def output_is_last_layer(self) -> bool:
        """True when the network's output is exactly the last weight layer's output (its logits)."""
        outputs = self._netgraph.outputs
        return len(outputs) == 1 and outputs[0].expansion == 1 and \
            outputs[0].sources == frozenset({self.layer_names[-1]})

    def groups(self) -> list[Group]:
        """The coupled-unit groups (:meth:`nestsynth.graph.NetGraph.groups`)."""
        return self.graph.groups()

    def group_of(self, i: int) -> Group:
        """The coupled group whose members include layer ``i``."""
        return self.graph.group_of(self.layer_names[i])

    def consumers(self, i: int) -> list[int]:
        """Indices of the weight layers that read layer ``i``'s output (through any path)."""
        names = self.layer_names
        return [names.index(c) for c in self._netgraph.consumers(names[i])]

    def arch(self) -> dict:
        """Plain-data description, enough to rebuild the module (see :meth:`from_arch`)."""
        return {"kind": KIND, "input_shape": list(self.input_shape), "graph": describe(self.net)}

    @classmethod
    def from_arch(cls, arch: dict) -> "SparseGraph":
        """The SparseGraph :meth:`arch` describes (fresh weights; load the state dict after it).

        Raises:
            NestError: not a graph description, or one that cannot be rebuilt.
        """
        if not isinstance(arch, dict) or arch.get("kind") != KIND:
            raise NestError("the architecture is not a graph network's.")
        module = rebuild(arch["graph"])
        capture_traced(module, example_input(arch["input_shape"]))
        return cls(module, arch["input_shape"])

    # ---- forward -----------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, *input_shape) -> the network's output
        return self.net(x.reshape(len(x), *self.input_shape))

    def trace(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """One forward pass that also returns every weight layer's input and output.

        Returns:
            (inputs, outputs), in the order of :attr:`layers`: ``inputs[i]`` is what
            ``layers[i]`` reads ((B, in) or (B, C, H, W)), ``outputs[i]`` its output before
            any batch norm.  Both are the tensors of the pass (gradients flow through them).
        """
        names = self.layer_names
        seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        handles = [layer.register_forward_hook(lambda m, args, out, name=name: seen.__setitem__(name, (args[0], out)))
                   for name, layer in zip(names, self.layers)]
        try:
            self(x)
        finally:
            for handle in handles:
                handle.remove()
        return [seen[n][0] for n in names], [seen[n][1] for n in names]

    # ---- batch norm of a layer -------------------------------------------------
    def norm_entries(self, i: int) -> tuple[nn.Module, torch.Tensor | None, bool] | None:
        """The batch norm that normalizes layer ``i``'s output channels (see
        :meth:`~nestsynth.sparse.network.MaskedLayers.norm_entries`).

        A batch norm that reads layer i's output alone comes first; otherwise the first
        (in graph order) that reads a residual sum layer i's output is part of.  Entries
        fed through a flatten (several per unit) do not count: no per-unit scale.
        """
        graph, name = self._netgraph, self.layer_names[i]
        shared = None
        for norm in graph.norms.values():
            module = self.net.get_submodule(norm.name)
            if module.running_var is None:  # no running statistics: normalizes by the batch's
                continue
            for s in norm.slices:
                if name not in s.sources or s.expansion != 1:
                    continue
                index = None if (s.offset == 0 and s.units == norm.num_features) else s.indices()
                if s.sources == (name,):
                    return module, index, True
                shared = shared or (module, index, False)
        return shared

    # ---- counts --------------------------------------------------------------
    def dense_weights(self) -> int:
        """Weights of every layer with every mask full (out x in x kh x kw)."""
        return graph_weights(self.graph)

    def flops(self) -> int:
        """FLOPs of one inference with the present masks (:func:`nestsynth.graph.graph_flops`)."""
        return graph_flops(self.graph)

    # ---- unit surgery ----------------------------------------------------------
    def remove_units(self, group: Group, keep: torch.Tensor, optimizer=None) -> Group:
        """:func:`nestsynth.graph.remove_units` on this network (in place)."""
        self.graph  # noqa: B018  (binds net.nest_graph, which the surgery reads)
        return remove_units(self.net, group, keep, optimizer)

    def add_units(self, group: Group, n: int, optimizer=None, generator: torch.Generator | None = None) -> Group:
        """:func:`nestsynth.graph.add_units` on this network (in place)."""
        self.graph  # noqa: B018  (binds net.nest_graph, which the surgery reads)
        return add_units(self.net, group, n, optimizer, generator)

    def extra_repr(self) -> str:
        return f"input_shape={self.input_shape}, layers={len(self.layer_names)}, norms={len(self._netgraph.norms)}"
