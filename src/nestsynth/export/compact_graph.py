"""The compact inference model of a :class:`~nestsynth.graph.SparseGraph` (a residual or
branched network): dead units physically removed, masks applied, plain layers.

:func:`compact_graph_from_sparse` copies the masked network and, repeated until nothing
changes, removes from every resizable coupled group (:meth:`NetGraph.groups`) the units
that cannot influence the output, with :func:`nestsynth.graph.remove_units` (member
rows, batch-norm entries and consumer inputs, at their concatenation offsets and flatten
expansion):

* a unit that no live weight reads (every consumer's input columns or channels fed by it
  are zero), or
* a unit that every member computes from no live weight (its rows are zero) and whose
  value reaches every consumer as exactly zero.  Such a unit's value does not depend on
  the input (it is the members' biases through per-channel operations: batch norm,
  activations, pooling, residual adds within the group), so one forward pass shows it:
  ``relu(bn(b)) = 0`` is removed, a non-zero constant is kept (it would have to be folded
  into the consumers, which a convolution's zero padding does not allow in general).

A group whose units are all dead keeps one (a layer needs an output).  The masked layers
then become plain ``nn.Linear`` / ``nn.Conv2d`` with weight ``W * M`` (a convolution with a
partial area mask stays a masked one, whose forward applies it).  Every layer is stored
dense: CSR is for the MLP and sequential-CNN exports.

Batch norm is folded, as the chain exports fold it (always; there is no option to keep
it): :func:`fold_batch_norms` folds a batch norm (eval statistics) into the plain Linear /
Conv2d whose output it reads directly when that output has no other reader,
``W' = W * s``, ``b' = (b - mean) * s + beta`` with ``s = gamma / sqrt(var + eps)`` per
unit (in float64), and removes the batch norm from the graph.  Where folding would not
be exact the batch norm is kept as it is: it reads a residual sum, a concatenation or
anything after an activation or pooling; the layer's output has another reader as
well; the layer keeps a partial area mask (positions it zeroes would get the batch
norm's shift); or the batch norm has no running statistics.

:class:`CompactGraph` is described by plain data (:meth:`CompactGraph.arch`: the
:func:`nestsynth.graph.describe` of the module, ``kind: "graph"``) plus its state dict, so
it is written as a ``weights_only`` torch file, as safetensors + JSON, or as ONNX by
:mod:`.formats` like the other compact models.
"""

from __future__ import annotations

import copy
import math
from collections import Counter

import torch
from torch import fx, nn

from ..errors import NestError
from ..graph.capture import capture_traced
from ..graph.masked import GraphMaskedConv2d
from ..graph.network import SparseGraph, example_input
from ..graph.ops import graph_flops
from ..graph.plain import describe, rebuild
from ..sparse.conv import MaskedConv2d
from .compact_base import FORMAT, VERSION

KIND = "graph"


class CompactGraph(nn.Module):
    """A graph network for inference: plain (or area-masked) weight layers, batch norm,
    the captured forward.

    Args:
        net: the GraphModule (weight layers in ``layer_names`` order).
        input_shape: shape of one input sample; inputs are reshaped to it.
        layer_names: module paths of the weight layers, in graph order.
        meta: plain data carried along (source run, data set, ...).
    """

    def __init__(self, net: fx.GraphModule, input_shape, layer_names, meta: dict | None = None):
        super().__init__()
        self.net = net
        self.input_shape = [int(v) for v in input_shape]
        self.layer_names = list(layer_names)
        self.meta = dict(meta or {})

    @property
    def n_inputs(self) -> int:
        return math.prod(self.input_shape)

    @property
    def widths(self) -> list[int]:
        """Input channels, then every weight layer's output units."""
        return [self.input_shape[0]] + [int(self.net.get_submodule(n).weight.shape[0]) for n in self.layer_names]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.reshape(-1, *self.input_shape))

    # ---- counts --------------------------------------------------------------
    def _weights(self) -> dict[str, torch.Tensor]:
        out = {}
        for name in self.layer_names:
            layer = self.net.get_submodule(name)
            mask = getattr(layer, "mask", None)
            out[name] = layer.weight.detach() if mask is None else layer.weight.detach() * mask
        return out

    def nnz(self) -> int:
        return sum(int(torch.count_nonzero(w)) for w in self._weights().values())

    def dense_flops(self) -> int:
        """FLOPs of one inference with every weight layer dense (how it is executed)."""
        return graph_flops(capture_traced(copy.deepcopy(self.net), example_input(self.input_shape)))

    def executed_flops(self) -> int:
        return self.dense_flops()

    def nonzero_flops(self) -> int:
        """2 x MACs of the non-zero weights (conv: at the positions each kernel computes)."""
        graph = capture_traced(copy.deepcopy(self.net), example_input(self.input_shape))
        return graph_flops(graph, {n: (w != 0) for n, w in self._weights().items()})

    def storages(self) -> list[str]:
        return ["dense"] * len(self.layer_names)

    def specs(self) -> list[dict]:
        """One plain record per weight layer: name, type, weight shape, storage (bench-infer's ``storage``)."""
        return [{"name": name, "type": type(self.net.get_submodule(name)).__name__, "shape": list(w.shape),
                 "storage": "dense"} for name, w in self._weights().items()]

    def densified(self) -> "CompactGraph":
        """This model (every layer is already dense)."""
        return self

    # ---- plain-data state --------------------------------------------------
    def arch(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "kind": KIND, "input_shape": list(self.input_shape),
                "layer_names": list(self.layer_names), "graph": describe(self.net), "meta": self.meta}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.net.state_dict().items()}

    @classmethod
    def from_state(cls, arch: dict, tensors: dict[str, torch.Tensor]) -> "CompactGraph":
        """Rebuild from :meth:`arch` and :meth:`tensors`.

        Raises:
            NestError: not a compact graph model, another version, or tensors that do not
                match the description.
        """
        if not isinstance(arch, dict) or arch.get("format") != FORMAT or arch.get("kind") != KIND:
            raise NestError("the file is not a nestsynth compact graph model (its format tag is missing).")
        if arch.get("version") != VERSION:
            raise NestError(f"compact model version {arch.get('version')!r} is not supported "
                            f"(this nestsynth reads version {VERSION}).")
        net = rebuild(arch["graph"])
        try:
            net.load_state_dict(tensors, strict=True)
            model = cls(net, arch["input_shape"], arch["layer_names"], arch.get("meta"))
        except (KeyError, TypeError, RuntimeError) as exc:
            raise NestError(f"the compact model's tensors do not match its architecture description "
                            f"({type(exc).__name__}).") from None
        return model.eval()


# ---- dead units ---------------------------------------------------------------------
def _unit_any(t: torch.Tensor, units: int) -> torch.Tensor:
    """(units,) bool: any non-zero in each unit's block of ``t`` (units along dim 0, blocks contiguous)."""
    return t.reshape(units, -1).ne(0).any(dim=1)


def _dead_units(model: SparseGraph, group, x: torch.Tensor) -> torch.Tensor:
    """(units,) bool: the group's units that cannot influence the output (module docstring)."""
    layers = dict(zip(model.layer_names, model.layers))
    read = torch.zeros(group.units, dtype=torch.bool)
    computed = torch.zeros(group.units, dtype=torch.bool)
    for name in group.members:
        layer = layers[name]
        computed |= _unit_any((layer.weight.detach() * layer.mask).flatten(1).cpu(), group.units)
    inputs, _ = model.trace(x)
    reaches = torch.zeros(group.units, dtype=torch.bool)  # a non-zero value reaches a consumer
    for s in group.reads:
        i = model.layer_names.index(s.reader)
        layer, index = layers[s.reader], s.indices()
        w = (layer.weight.detach() * layer.mask).cpu().index_select(1, index)  # (out, units * expansion, ...)
        read |= _unit_any(w.transpose(0, 1).contiguous(), group.units)
        seen = inputs[i].detach().cpu().index_select(1, index)  # (B, units * expansion, ...)
        reaches |= _unit_any(seen.transpose(0, 1).contiguous(), group.units)
    return ~read | (~computed & ~reaches)


def _plain_layer(layer: nn.Module) -> nn.Module:
    """An ``nn.Linear`` / ``nn.Conv2d`` with weight W * M (a partial-area convolution stays masked)."""
    w, b = (layer.weight.detach() * layer.mask), layer.bias.detach()
    if isinstance(layer, MaskedConv2d):
        if not bool(layer.area.all()):
            return layer
        new = nn.Conv2d(w.shape[1], w.shape[0], tuple(w.shape[2:]), layer.stride, layer.padding,
                        getattr(layer, "dilation", 1))
    else:
        new = nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        new.weight.copy_(w)
        new.bias.copy_(b)
    return new.to(w.device).eval()


_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)


@torch.no_grad()
def _fold_into(layer: nn.Module, bn: nn.Module) -> None:
    """Fold ``bn``'s eval-mode affine map into ``layer``'s weight and bias (in place, float64 math)."""
    w, b = layer.weight.detach().double(), layer.bias.detach().double()
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach().double()
    shift = -bn.running_mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach().double()
    layer.weight.copy_(w * scale.view(-1, *([1] * (w.dim() - 1))))
    layer.bias.copy_(b * scale + shift)


@torch.no_grad()
def fold_batch_norms(net: fx.GraphModule, layer_names) -> tuple[dict[str, str], list[str]]:
    """Fold every batch norm that can be folded exactly into the weight layer before it (module docstring).

    Args:
        net: the GraphModule with plain layers (changed in place: folded layers get new
            weights and biases, folded batch norms leave the graph and the module).
        layer_names: module paths of its weight layers.

    Returns:
        (folded, kept): the batch norms folded (module path -> the layer it was folded
        into) and the module paths of those kept, in graph order.
    """
    layers = set(layer_names)
    calls = Counter(n.target for n in net.graph.nodes if n.op == "call_module")
    folded, kept = {}, []
    for node in list(net.graph.nodes):
        if node.op != "call_module" or not isinstance(net.get_submodule(node.target), _NORM_TYPES):
            continue
        bn, src = net.get_submodule(node.target), node.args[0] if len(node.args) == 1 else None
        layer = net.get_submodule(src.target) if (isinstance(src, fx.Node) and src.op == "call_module"
                                                  and src.target in layers) else None
        if (layer is None or type(layer) not in (nn.Linear, nn.Conv2d) or node.kwargs or len(src.users) != 1
                or calls[node.target] != 1 or calls[src.target] != 1 or bn.running_var is None):
            kept.append(node.target)
            continue
        _fold_into(layer, bn)
        node.replace_all_uses_with(src)
        net.graph.erase_node(node)
        net.delete_submodule(node.target)
        folded[node.target] = src.target
    if folded:
        net.recompile()
    return folded, kept


@torch.no_grad()
def compact_graph_from_sparse(model: SparseGraph, storage: str = "auto", batch_size: int = 1,
                              meta: dict | None = None) -> tuple[CompactGraph, dict]:
    """The compact inference model of a SparseGraph (see the module docstring).

    Args:
        model: the masked network (eval-mode batch norm is used; it is not changed).
        storage: ``"auto"`` or ``"dense"`` (every layer is stored dense).
        batch_size: recorded with the export.
        meta: plain data to carry along.

    Returns:
        (compact model in eval mode, info) with the widths before and after, the units
        removed per weight layer and one record per layer, in the layout of
        :func:`nestsynth.export.compact.compact_from_sparse`'s info, plus ``batch_norm``:
        the batch norms ``folded`` (module path -> its layer) and ``kept`` (module paths).

    Raises:
        NestError: ``storage`` ``"csr"`` or ``"ckernel"``.
    """
    if storage in ("csr", "ckernel"):
        raise NestError(f"a graph network is exported with dense layers only ({storage} is for MLP and sequential "
                        "CNN runs); use --sparse auto or dense.")
    work = copy.deepcopy(model).eval()
    work.zero_dormant()
    x = torch.zeros(1, *work.input_shape, device=work.layers[0].weight.device)
    changed = True
    while changed:  # removing units of one group can leave another group's units unread
        changed = False
        for members in [g.members for g in work.groups() if g.resizable]:
            group = work.graph.group_of(members[0])  # as it is now (cat offsets follow other removals)
            keep = ~_dead_units(work, group, x)
            if not bool(keep.any()):
                keep[0] = True  # a layer needs an output
            if not bool(keep.all()):
                work.remove_units(group, keep)
                changed = True
    net, names = work.net, work.layer_names
    for name in names:
        net.set_submodule(name, _plain_layer(net.get_submodule(name)))
    net.__dict__.pop("nest_graph", None)  # described the masked layers
    folded, kept = fold_batch_norms(net, names)
    compact = CompactGraph(net, work.input_shape, names, {**dict(meta or {}), "storage_mode": storage,
                                                            "batch_size": int(batch_size)}).eval()
    before, after = model.widths, compact.widths
    decisions = []
    for i, (name, w) in enumerate(compact._weights().items()):
        nnz = int(torch.count_nonzero(w))
        decisions.append({"layer": i, "name": name, "in": int(w.shape[1]), "out": int(w.shape[0]), "nnz": nnz,
                          "density": nnz / max(1, w.numel()), "storage": "dense",
                          "reason": "graph networks are stored dense"
                          + ("; partial area mask kept" if isinstance(net.get_submodule(name), GraphMaskedConv2d)
                             else "") + "".join(f"; batch norm {bn} folded in" for bn, layer in folded.items()
                                                if layer == name)})
    info = {"widths_masked": list(before), "widths_compact": list(after), "inputs_read": int(before[0]),
            "inputs": int(before[0]), "input_gather": False,
            "removed_neurons": {"constant_folded": [0] * len(names), "dead": [a - b for a, b in zip(before[1:],
                                                                                               after[1:])]},
            "nnz_masked": int(model.active_weights()), "nnz_compact": compact.nnz(), "storage_mode": storage,
            "batch_size": int(batch_size), "layers": decisions,
            "batch_norm": {"folded": folded, "kept": kept}}
    return compact, info
