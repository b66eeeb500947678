"""Capture any traceable PyTorch network as a :class:`NetGraph`.

:func:`capture` traces the model with ``torch.fx``, propagates an example input through
it to learn every tensor's shape (``torch.fx.passes.shape_prop.ShapeProp``), then walks
the nodes in order and tracks, for every tensor, the layout of its dimension 1
(channels or features) as segments of source streams (see :mod:`nestsynth.graph.ir`).

Supported operations (everything else is refused with one sentence naming the
operation and where it is):

* weight layers: ``nn.Linear`` on (N, F) inputs and ``nn.Conv2d`` with ``groups=1``
  and zero padding (any stride, padding, dilation; bias optional), and the package's
  :class:`~nestsynth.sparse.MaskedLinear` / :class:`~nestsynth.sparse.MaskedConv2d`;
* ``nn.BatchNorm1d`` on (N, F) and ``nn.BatchNorm2d`` on (N, C, H, W);
* element-wise activations (modules ReLU, ReLU6, LeakyReLU, ELU, GELU, SiLU, Tanh,
  Sigmoid, Softplus, Identity; functions relu, relu6, elu, gelu, tanh, sigmoid, silu,
  leaky_relu, softplus from ``torch`` / ``torch.nn.functional`` and as tensor methods)
  and dropout (``nn.Dropout``, ``F.dropout``; the traced ``F.dropout`` follows the traced
  module's train/eval mode, see :func:`_follow_training`);
* max / average / adaptive-average 2-d pooling (modules and ``F.`` forms);
* flattening (N, C, ...) to (N, C*...): ``nn.Flatten``, ``torch.flatten``,
  ``Tensor.flatten`` / ``view`` / ``reshape`` (a reshape that keeps the shape is allowed);
* residual ``+`` of two tensors of the same shape (``operator.add``, ``+=``,
  ``torch.add``, ``Tensor.add``/``add_``) and ``torch.cat`` along dimension 1;
* shape queries used to flatten (``x.size(0)``, ``x.shape[0]`` and integer arithmetic).

The model is run in eval mode for the shape pass (batch norm statistics are not
touched) and its train/eval flags are restored afterwards.
"""

from __future__ import annotations

import contextlib
import io
import math
import operator
import warnings

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from ..errors import NestError
from ..sparse.conv import MaskedConv2d
from ..sparse.masked import MaskedLinear
from .ir import INPUT, Layer, NetGraph, Norm, Segment

SUPPORTED = ("nestsynth supports Linear, Conv2d with groups 1, BatchNorm1d/2d, element-wise activations, "
             "max/avg/adaptive-avg pooling, flatten, dropout, residual add and concatenation along channels")

LINEAR_TYPES = (nn.Linear, MaskedLinear)
CONV_TYPES = (nn.Conv2d, MaskedConv2d)
NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)

_ELEMENTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid,
                        nn.Softplus, nn.Identity, nn.Dropout)
_POOL_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)
_ELEMENTWISE_FUNCTIONS = {F.relu, F.relu_, F.relu6, F.elu, F.gelu, F.tanh, F.sigmoid, F.silu, F.leaky_relu,
                          F.softplus, F.dropout, torch.relu, torch.relu_, torch.tanh, torch.sigmoid}
_ELEMENTWISE_METHODS = {"relu", "relu_", "tanh", "tanh_", "sigmoid", "sigmoid_"}
_POOL_FUNCTIONS = {F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d}
_FLATTEN_FUNCTIONS = {torch.flatten, torch.reshape}
_FLATTEN_METHODS = {"flatten", "view", "reshape"}
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}
_CAT_FUNCTIONS = {torch.cat, torch.concat, torch.concatenate}
_SHAPE_FUNCTIONS = {getattr, operator.getitem, operator.mul, operator.floordiv, operator.sub, operator.add}
_SHAPE_METHODS = {"size", "dim"}
_MODULE_TYPES = LINEAR_TYPES + CONV_TYPES + NORM_TYPES + _ELEMENTWISE_MODULES + _POOL_MODULES + (nn.Flatten,)
_FUNCTIONS = (_ELEMENTWISE_FUNCTIONS | _POOL_FUNCTIONS | _FLATTEN_FUNCTIONS | _ADD_FUNCTIONS | _CAT_FUNCTIONS
              | _SHAPE_FUNCTIONS)
_METHODS = _ELEMENTWISE_METHODS | _FLATTEN_METHODS | _ADD_METHODS | _SHAPE_METHODS
FUNCTIONS = frozenset(_FUNCTIONS)  # every function a captured graph may call (nestsynth.graph.plain names them)


class _Shape:
    """Marker value of a node that computes a shape (an int or a torch.Size), not a tensor."""


class _Const:
    """Marker value of a parameter, buffer or other non-input tensor read by the forward."""


class _Value:
    """The channel layout and example shape of a tensor node."""

    __slots__ = ("segments", "shape")

    def __init__(self, segments: tuple[Segment, ...], shape: tuple[int, ...]):
        self.segments, self.shape = segments, shape


def module_type_name(cls: type) -> str:
    """``nn.Conv2d`` for classes of ``torch.nn``, the class name otherwise."""
    return f"nn.{cls.__name__}" if getattr(nn, cls.__name__, None) is cls else cls.__name__


def _op_name(node: fx.Node, module: fx.GraphModule) -> str:
    """A readable name of a node's operation: ``nn.LSTM``, ``torch.sort``, ``Tensor.sort``."""
    if node.op == "call_module":
        return module_type_name(type(module.get_submodule(node.target)))
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    target = node.target
    name = getattr(target, "__name__", str(target))
    for prefix, namespace in (("torch.nn.functional", F), ("torch", torch), ("operator", operator)):
        if getattr(namespace, name, None) is target:
            return f"{prefix}.{name}"
    return getattr(target, "__qualname__", name)


def _where(node: fx.Node) -> str:
    """Where a node is: its module path, or its name and the module whose forward made it."""
    if node.op == "call_module":
        return f"module '{node.target}'"
    stack = node.meta.get("nn_module_stack")
    if stack:
        return f"node '{node.name}' in module '{list(stack.values())[-1][0]}'"
    return f"node '{node.name}' of the model's forward"


def _refusal(node: fx.Node, module: fx.GraphModule, detail: str = "") -> NestError:
    """The one-sentence error for an unsupported node (``detail`` follows the op's name)."""
    return NestError(f"unsupported operation {_op_name(node, module)}{detail} at {_where(node)}; {SUPPORTED}.")


def _check_ops(module: fx.GraphModule) -> None:
    """Refuse unsupported operations by kind alone, before the example is run through them."""
    for node in module.graph.nodes:
        if node.op == "call_module":
            m = module.get_submodule(node.target)
            if not isinstance(m, _MODULE_TYPES):
                raise _refusal(node, module)
            if isinstance(m, CONV_TYPES) and getattr(m, "groups", 1) != 1:
                raise _refusal(node, module, f" with groups={m.groups}")
            if isinstance(m, CONV_TYPES) and getattr(m, "padding_mode", "zeros") != "zeros":
                raise _refusal(node, module, f" with padding_mode={m.padding_mode!r}")
        elif (node.op == "call_function" and node.target not in _FUNCTIONS) or \
                (node.op == "call_method" and node.target not in _METHODS):
            raise _refusal(node, module)


class _Tracer(fx.Tracer):
    """fx tracer that keeps the masked layers whole and remembers where tracing failed."""

    def __init__(self):
        super().__init__()
        self.failed_in: tuple[str, str] | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, (MaskedLinear, MaskedConv2d)) or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = (self.path_of_module(m), type(m).__name__)
            raise


def _short_reason(exc: Exception) -> str:
    """A few words on why tracing or the shape pass failed, safe inside one sentence."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "control flow" in text:
        return "its forward branches or loops on tensor values (data-dependent control flow)"
    text = text.replace(". ", "; ").rstrip(".")
    return text if len(text) <= 160 else text[:157] + "..."


def _follow_training(module: fx.GraphModule) -> None:
    """Make every ``F.dropout`` read the traced module's ``training`` flag.

    Tracing evaluates ``self.training`` once, so ``F.dropout(x, p, self.training)``
    would stay in training mode forever; the flag becomes a read of
    ``module.training`` instead (a literal ``training=True`` is treated the same).
    """
    for node in list(module.graph.nodes):
        if node.op != "call_function" or node.target is not F.dropout:
            continue
        with module.graph.inserting_before(node), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # a get_attr of a bool, not of a tensor
            flag = module.graph.get_attr("training")
        if len(node.args) > 2:
            node.args = (*node.args[:2], flag, *node.args[3:])
        else:
            node.kwargs = {**node.kwargs, "training": flag}
    module.recompile()


def _trace(model: nn.Module) -> fx.GraphModule:
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # noqa: BLE001 - any tracing failure becomes one sentence
        where = (f"module '{tracer.failed_in[0]}' ({tracer.failed_in[1]})" if tracer.failed_in and
                 tracer.failed_in[0] else f"the forward of {type(model).__name__}")
        raise NestError(f"torch.fx cannot trace {where} because {_short_reason(exc)}.") from None
    module = fx.GraphModule(tracer.root, graph, type(model).__name__)
    _follow_training(module)
    return module


@torch.no_grad()
def _propagate_shapes(module: fx.GraphModule, model: nn.Module, example: torch.Tensor) -> None:
    """Run ShapeProp in eval mode, restoring every submodule's train/eval flag."""
    flags = [(m, m.training) for m in [module, *model.modules()]]
    module.eval()
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # ShapeProp prints the traceback it re-raises
            ShapeProp(module).propagate(example)
    except Exception as exc:  # noqa: BLE001 - a model that fails on the example: one sentence
        cause = exc.__cause__ or exc  # ShapeProp wraps the model's own error
        raise NestError(f"the model fails on an example input of shape {tuple(example.shape)} "
                        f"because {_short_reason(cause)}.") from None
    finally:
        for m, training in flags:
            m.training = training


class _Walker:
    """Walks a shape-propagated GraphModule and builds the :class:`NetGraph`."""

    def __init__(self, module: fx.GraphModule, example: torch.Tensor):
        self.module = module
        self.example = example
        self.values: dict[fx.Node, object] = {}
        self.layers: dict[str, Layer] = {}
        self.norms: dict[str, Norm] = {}
        self.units: dict[str, int] = {}
        self.parent: dict[str, str] = {}
        self.outputs: tuple[Segment, ...] = ()
        self.seen_input = False

    # ---- helpers ---------------------------------------------------------------
    def refuse(self, node: fx.Node, detail: str = "") -> NestError:
        return _refusal(node, self.module, detail)

    def tensor(self, node: fx.Node, arg=None, what: str = " on a non-tensor") -> _Value:
        """The layout of ``arg`` (default: the node's first argument), which must be a tensor node."""
        if arg is None:
            arg = node.args[0] if node.args else next(iter(node.kwargs.values()), None)
        value = self.values.get(arg) if isinstance(arg, fx.Node) else None
        if not isinstance(value, _Value):
            raise self.refuse(node, " of a parameter, buffer or constant" if isinstance(value, _Const) else what)
        return value

    @staticmethod
    def shape_of(node: fx.Node) -> tuple[int, ...] | None:
        meta = node.meta.get("tensor_meta")
        return tuple(meta.shape) if isinstance(meta, TensorMetadata) else None

    def find(self, source: str) -> str:
        while self.parent[source] != source:
            source = self.parent[source]
        return source

    def source_units(self, seg: Segment) -> int:
        return self.units[next(iter(seg.sources))]

    # ---- the walk ----------------------------------------------------------------
    def run(self) -> NetGraph:
        for node in self.module.graph.nodes:
            self.values[node] = self.visit(node)
        if not self.seen_input:
            raise NestError("the model's forward takes no tensor input; capture needs one example tensor.")
        return NetGraph(self.module, tuple(self.example.shape), self.layers, self.norms, self.units,
                        self.outputs, _parent=dict(self.parent))

    def visit(self, node: fx.Node):
        if node.op == "placeholder":
            return self.placeholder(node)
        if node.op == "get_attr":
            return _Const()
        if node.op == "output":
            self.output(node)
            return None
        if self.shape_of(node) is None and node.op != "call_module":
            return self.shape_value(node)
        if node.op == "call_module":
            return self.call_module(node)
        if node.op == "call_method":
            return self.call_method(node)
        return self.call_function(node)

    def placeholder(self, node: fx.Node):
        if self.seen_input:
            if node.args:  # an optional argument left at its default
                return _Const()
            raise NestError(f"the model's forward takes a second input '{node.target}'; capture supports "
                            "networks with one tensor input.")
        shape = self.shape_of(node)
        if shape is None or len(shape) < 2:
            raise NestError(f"capture needs an example tensor of shape (N, C, ...), not {tuple(self.example.shape)}.")
        self.seen_input = True
        self.units[INPUT] = shape[1]
        self.parent[INPUT] = INPUT
        return _Value((Segment(frozenset({INPUT})),), shape)

    def output(self, node: fx.Node) -> None:
        outputs: list[Segment] = []

        def collect(n: fx.Node) -> fx.Node:
            value = self.values.get(n)
            if isinstance(value, _Value):
                outputs.extend(value.segments)
            return n

        fx.node.map_arg(node.args, collect)
        self.outputs = tuple(outputs)

    def shape_value(self, node: fx.Node):
        """Nodes that compute ints or sizes from shapes (``x.size(0)``, ``x.shape[0] * 2``)."""
        fn_ok = node.op == "call_function" and node.target in _SHAPE_FUNCTIONS
        method_ok = node.op == "call_method" and node.target in _SHAPE_METHODS
        if not (fn_ok or method_ok):
            raise self.refuse(node)
        if node.op == "call_function" and node.target is getattr and node.args[1] not in ("shape", "ndim"):
            raise self.refuse(node, f" of attribute {node.args[1]!r}")
        for arg in node.all_input_nodes:
            if isinstance(self.values.get(arg), _Const):
                raise self.refuse(node, " of a parameter, buffer or constant")
        return _Shape()

    # ---- modules -----------------------------------------------------------------
    def call_module(self, node: fx.Node):
        module = self.module.get_submodule(node.target)
        if self.shape_of(node) is None:
            raise self.refuse(node, " (its output is not one tensor)")
        if isinstance(module, LINEAR_TYPES + CONV_TYPES):
            return self.weight_layer(node, module)
        if isinstance(module, NORM_TYPES):
            return self.norm(node, module)
        if isinstance(module, _ELEMENTWISE_MODULES):
            return self.same_layout(node)
        if isinstance(module, _POOL_MODULES):
            return self.pool(node)
        if isinstance(module, nn.Flatten):
            return self.flatten(node)
        raise self.refuse(node)

    def weight_layer(self, node: fx.Node, module: nn.Module) -> _Value:
        name = node.target
        value = self.tensor(node)
        conv = isinstance(module, CONV_TYPES)
        if name in self.layers:
            raise self.refuse(node, " called a second time (shared weights)")
        if conv and len(value.shape) != 4:
            raise self.refuse(node, f" on a {len(value.shape)}-d input")
        if not conv and len(value.shape) != 2:
            raise self.refuse(node, f" on a {len(value.shape)}-d input (only (N, features) is supported)")
        out = self.shape_of(node)
        self.layers[name] = Layer(name, type(module).__name__, value.segments,
                                  in_hw=tuple(value.shape[2:]) if conv else None,
                                  out_hw=tuple(out[2:]) if conv else None)
        self.units[name] = out[1]
        self.parent[name] = name
        return _Value((Segment(frozenset({name})),), out)

    def norm(self, node: fx.Node, module: nn.Module) -> _Value:
        value = self.tensor(node)
        rank = 2 if isinstance(module, nn.BatchNorm1d) else 4
        if len(value.shape) != rank:
            raise self.refuse(node, f" on a {len(value.shape)}-d input")
        if node.target in self.norms:
            raise self.refuse(node, " called a second time (shared statistics)")
        self.norms[node.target] = Norm(node.target, type(module).__name__, value.segments)
        return _Value(value.segments, self.shape_of(node))

    # ---- layout-preserving and reshaping ops ---------------------------------------
    def same_layout(self, node: fx.Node) -> _Value:
        value = self.tensor(node)
        out = self.shape_of(node)
        if out[:2] != value.shape[:2]:
            raise self.refuse(node, f" changing the shape {value.shape} to {out}")
        return _Value(value.segments, out)

    def pool(self, node: fx.Node) -> _Value:
        value = self.tensor(node)
        if len(value.shape) != 4:
            raise self.refuse(node, f" on a {len(value.shape)}-d input")
        return self.same_layout(node)

    def flatten(self, node: fx.Node) -> _Value:
        value = self.tensor(node)
        before, after = value.shape, self.shape_of(node)
        if after == before:
            return _Value(value.segments, after)
        if after != (before[0], math.prod(before[1:])):
            raise self.refuse(node, f" from shape {before} to {after} (only (N, C, ...) to (N, C*...) is supported)")
        spatial = math.prod(before[2:])
        return _Value(tuple(Segment(s.sources, s.expansion * spatial) for s in value.segments), after)

    def add(self, node: fx.Node) -> _Value:
        operands = [*node.args[:2], *node.kwargs.values()][:2]
        if len(operands) != 2:
            raise self.refuse(node, " with one operand")
        a, b = (self.tensor(node, x, " of a tensor and a constant") for x in operands)
        if a.shape != b.shape:
            raise self.refuse(node, f" broadcasting shapes {a.shape} and {b.shape}")
        if len(a.segments) != len(b.segments) or any(
                (self.source_units(x), x.expansion) != (self.source_units(y), y.expansion)
                for x, y in zip(a.segments, b.segments)):
            raise self.refuse(node, " of tensors whose channels are concatenated differently")
        segments = []
        for x, y in zip(a.segments, b.segments):
            roots = {self.find(s) for s in x.sources | y.sources}
            first = roots.pop()
            for other in roots:
                self.parent[other] = first
            segments.append(Segment(x.sources | y.sources, x.expansion))
        return _Value(tuple(segments), self.shape_of(node))

    def cat(self, node: fx.Node) -> _Value:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        values = [self.tensor(node, t) for t in tensors]
        rank = len(values[0].shape)
        if not isinstance(dim, int) or dim % rank != 1:
            raise self.refuse(node, f" along dim {dim}")
        return _Value(tuple(s for v in values for s in v.segments), self.shape_of(node))

    # ---- functions and methods ---------------------------------------------------
    def call_function(self, node: fx.Node) -> _Value:
        target = node.target
        if target in _ELEMENTWISE_FUNCTIONS:
            return self.same_layout(node)
        if target in _POOL_FUNCTIONS:
            return self.pool(node)
        if target in _FLATTEN_FUNCTIONS:
            return self.flatten(node)
        if target in _ADD_FUNCTIONS:
            return self.add(node)
        if target in _CAT_FUNCTIONS:
            return self.cat(node)
        raise self.refuse(node)

    def call_method(self, node: fx.Node) -> _Value:
        if node.target in _ELEMENTWISE_METHODS:
            return self.same_layout(node)
        if node.target in _FLATTEN_METHODS:
            return self.flatten(node)
        if node.target in _ADD_METHODS:
            return self.add(node)
        raise self.refuse(node)


def capture(model: nn.Module, example: torch.Tensor) -> NetGraph:
    """Trace ``model`` and describe its weight layers, channel flow and coupled groups.

    Args:
        model: any ``nn.Module`` that ``torch.fx.symbolic_trace`` can trace, built from
            the supported operations (see the module docstring).
        example: one input batch of shape (N, C, ...) (N >= 1); its values are only used
            to learn every tensor's shape.

    Returns:
        The :class:`NetGraph`; ``graph.module`` is the traced ``GraphModule`` (it shares
        the model's submodules) and ``graph.module.nest_graph`` is the graph.

    Raises:
        NestError: the model cannot be traced, fails on the example, or uses an
            unsupported operation (one sentence naming the operation and where it is).
    """
    if not isinstance(model, nn.Module):
        raise NestError(f"capture needs a torch.nn.Module, not {type(model).__name__}.")
    if not torch.is_tensor(example):
        raise NestError(f"capture needs an example tensor, not {type(example).__name__}.")
    return capture_traced(_trace(model), example, model)


def capture_traced(module: fx.GraphModule, example: torch.Tensor, model: nn.Module | None = None) -> NetGraph:
    """:func:`capture` of a module that is already a traced ``GraphModule`` (for example one
    rebuilt from plain data by :func:`nestsynth.graph.plain.rebuild`): the same checks and
    walk, without tracing it again, so its nodes and their names stay as they are.

    Args:
        module: the GraphModule; it becomes the graph's ``module`` and gets ``nest_graph``.
        example: one input batch of shape (N, C, ...).
        model: the module ``module`` was traced from, whose train/eval flags the shape pass
            restores too (default: ``module`` itself).

    Raises:
        NestError: as :func:`capture`.
    """
    _check_ops(module)
    _propagate_shapes(module, module if model is None else model, example)
    graph = _Walker(module, example).run()
    module.nest_graph = graph
    return graph
