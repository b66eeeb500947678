"""A traced network as plain data, and back: checkpoints of graph networks without pickle.

:func:`describe` turns a ``torch.fx.GraphModule`` built from the operations
:func:`nestsynth.graph.capture` supports into a dict of lists, strings and numbers: its
nodes in order (operation, target, arguments with other nodes named) and, for every
module a node calls, its type and constructor settings.  :func:`rebuild` makes the same
GraphModule again from that dict (fresh weights; load the state dict after it).  The
dict can be stored with ``torch.save`` and read back with ``weights_only=True``, or
written as JSON.

Functions are stored by name (``torch.nn.functional.relu``, ``operator.add``) and only the
ones capture supports are accepted, so rebuilding never imports or runs anything the
file names: a description naming another function or module type is refused.
"""

from __future__ import annotations

import builtins
import operator
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..errors import NestError
from ..sparse.conv import MaskedConv2d
from ..sparse.masked import MaskedLinear
from .capture import FUNCTIONS
from .masked import GraphMaskedConv2d

VERSION = 1

# module type -> the attributes that are its constructor's keyword arguments
_SETTINGS: dict[type, tuple[str, ...]] = {
    nn.BatchNorm1d: ("num_features", "eps", "momentum", "affine", "track_running_stats"),
    nn.BatchNorm2d: ("num_features", "eps", "momentum", "affine", "track_running_stats"),
    nn.ReLU: ("inplace",), nn.ReLU6: ("inplace",), nn.LeakyReLU: ("negative_slope", "inplace"),
    nn.ELU: ("alpha", "inplace"), nn.GELU: ("approximate",), nn.SiLU: ("inplace",), nn.Tanh: (),
    nn.Sigmoid: (), nn.Softplus: ("beta", "threshold"), nn.Identity: (), nn.Dropout: ("p", "inplace"),
    nn.MaxPool2d: ("kernel_size", "stride", "padding", "dilation", "return_indices", "ceil_mode"),
    nn.AvgPool2d: ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"),
    nn.AdaptiveAvgPool2d: ("output_size",), nn.Flatten: ("start_dim", "end_dim"),
    nn.Linear: ("in_features", "out_features"),
    nn.Conv2d: ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "padding_mode"),
}
_CONV_SETTINGS = ("stride", "padding", "dilation")  # attributes of a masked convolution set after construction
_TYPES: dict[str, type] = {cls.__name__: cls for cls in (*_SETTINGS, MaskedLinear, MaskedConv2d, GraphMaskedConv2d)}


def _function_name(fn: Callable) -> str:
    """``torch.nn.functional.relu``, ``torch.relu``, ``operator.add``, ``builtins.getattr``."""
    name = getattr(fn, "__name__", "")
    for prefix, namespace in (("torch.nn.functional", F), ("torch", torch), ("operator", operator),
                              ("builtins", builtins)):
        if getattr(namespace, name, None) is fn:
            return f"{prefix}.{name}"
    raise NestError(f"the function {fn!r} has no stable name to store.")


_FUNCTIONS: dict[str, Callable] = {_function_name(fn): fn for fn in FUNCTIONS}


def _plain(value):
    """A setting as plain data (tuples become lists)."""
    return list(value) if isinstance(value, tuple) else value


def _settings(module: nn.Module) -> dict:
    """Type name and constructor settings of a module :func:`rebuild` can make again."""
    cls = type(module)
    if cls in (MaskedLinear, MaskedConv2d, GraphMaskedConv2d):
        out = {"type": cls.__name__, "weight_shape": list(module.weight.shape)}
        if cls is not MaskedLinear:
            out["out_hw"] = list(module.out_hw)
            out.update({k: _plain(getattr(module, k)) for k in _CONV_SETTINGS if hasattr(module, k)})
        return out
    if cls not in _SETTINGS:
        raise NestError(f"a {cls.__name__} module cannot be described as plain data; the graph networks store "
                        f"{', '.join(sorted(_TYPES))} modules.")
    out = {"type": cls.__name__, **{k: _plain(getattr(module, k)) for k in _SETTINGS[cls]}}
    if cls in (nn.Linear, nn.Conv2d):
        out["bias"] = module.bias is not None
    return out


def _encode(value, where: str):
    """A node argument as plain data: nodes as ``{"node": name}``, tuples as ``{"tuple": [...]}``."""
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if isinstance(value, tuple):
        return {"tuple": [_encode(v, where) for v in value]}
    if isinstance(value, list):
        return [_encode(v, where) for v in value]
    if isinstance(value, dict):
        return {"dict": {str(k): _encode(v, where) for k, v in value.items()}}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise NestError(f"the argument {value!r} of {where} cannot be stored as plain data.")


def describe(module: fx.GraphModule) -> dict:
    """The GraphModule as plain data (see the module docstring).

    Raises:
        NestError: a module type, function or argument that cannot be stored.
    """
    nodes, modules = [], {}
    for node in module.graph.nodes:
        where = f"node '{node.name}'"
        target = node.target
        if node.op == "call_function":
            if target not in FUNCTIONS:
                raise NestError(f"the function {target!r} of {where} cannot be stored as plain data.")
            target = _function_name(target)
        elif node.op == "call_module":
            modules[target] = _settings(module.get_submodule(target))
        elif node.op == "get_attr" and target != "training":
            raise NestError(f"{where} reads the attribute {target!r}, which cannot be stored as plain data.")
        nodes.append({"name": node.name, "op": node.op, "target": target,
                      "args": _encode(node.args, where), "kwargs": _encode(node.kwargs, where)})
    return {"version": VERSION, "nodes": nodes, "modules": modules}


def _decode(value, nodes: dict[str, fx.Node]):
    if isinstance(value, dict):
        if "node" in value:
            return nodes[value["node"]]
        if "tuple" in value:
            return tuple(_decode(v, nodes) for v in value["tuple"])
        return {k: _decode(v, nodes) for k, v in value["dict"].items()}
    if isinstance(value, list):
        return [_decode(v, nodes) for v in value]
    return value


def _setting(value):
    return tuple(value) if isinstance(value, list) else value


def _make_module(spec: dict) -> nn.Module:
    """A fresh module from :func:`_settings`' description."""
    cls = _TYPES.get(spec.get("type"))
    if cls is None:
        raise NestError(f"unknown module type {spec.get('type')!r} in the description.")
    if cls is MaskedLinear:
        out_features, in_features = spec["weight_shape"]
        return MaskedLinear(int(in_features), int(out_features))
    if cls in (MaskedConv2d, GraphMaskedConv2d):
        shape = [int(v) for v in spec["weight_shape"]]
        layer = cls(shape[1], shape[0], shape[2], tuple(spec["out_hw"]))
        for key in _CONV_SETTINGS:
            if key in spec:
                setattr(layer, key, _setting(spec[key]))
        with torch.no_grad():  # a non-square kernel: tensors of the stored shape
            layer.weight.data = torch.zeros(shape)
            layer.mask = torch.ones(shape)
        return layer
    kwargs = {k: _setting(spec[k]) for k in _SETTINGS[cls]}
    if cls in (nn.Linear, nn.Conv2d):
        kwargs["bias"] = bool(spec["bias"])
    return cls(**kwargs)


def rebuild(data: dict) -> fx.GraphModule:
    """The GraphModule that :func:`describe` described (fresh weights, training mode).

    Raises:
        NestError: the description is not one :func:`describe` writes (unknown version,
            function, module type or node).
    """
    try:
        if data.get("version") != VERSION:
            raise NestError(f"graph description version {data.get('version')!r} is not supported "
                            f"(this nestsynth reads version {VERSION}).")
        root = nn.Module()
        for path, spec in data["modules"].items():
            parent = root
            *parents, leaf = path.split(".")
            for part in parents:
                if not hasattr(parent, part):
                    parent.add_module(part, nn.Module())
                parent = getattr(parent, part)
            parent.add_module(leaf, _make_module(spec))
        graph, nodes = fx.Graph(), {}
        for entry in data["nodes"]:
            target = entry["target"]
            if entry["op"] == "call_function":
                if target not in _FUNCTIONS:
                    raise NestError(f"unknown function {target!r} in the description.")
                target = _FUNCTIONS[target]
            elif entry["op"] not in ("placeholder", "get_attr", "call_module", "call_method", "output"):
                raise NestError(f"unknown node operation {entry['op']!r} in the description.")
            node = graph.create_node(entry["op"], target, _decode(entry["args"], nodes),
                                     _decode(entry["kwargs"], nodes), name=entry["name"])
            nodes[entry["name"]] = node
        return fx.GraphModule(root, graph, "SparseGraphModule")
    except NestError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
        raise NestError(f"the graph description is damaged or incomplete ({type(exc).__name__}: "
                        f"{str(exc)[:120]}).") from None
