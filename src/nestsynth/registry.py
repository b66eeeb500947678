"""Registered reference architectures: name -> spec, with errors that list the names.

A registered name (``lenet-300-100``) fixes the hidden widths; its input and output
widths follow the data set (LeNet-300-100 on 8x8 digits is 64-300-100-10).  An
explicit spec ``mlp:784-500-250-10`` fixes every width and must match the data.

Three kinds of spec: :class:`ModelSpec` (an MLP), :class:`CNNSpec` (a sequential CNN)
and :class:`GraphSpec` (any network :func:`nestsynth.graph.capture` accepts -- residual
adds, concatenations, batch norm on some layers only --, built as a
:class:`~nestsynth.graph.SparseGraph`): the CIFAR ResNets ``resnet20`` and
``resnet18-cifar``, the MNIST ResNet-8 ``resnet-mnist``, and a user's own ``nn.Module``
(:meth:`GraphSpec.of_module`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn

from .errors import NestError
from .graph.capture import capture
from .graph.ir import INPUT
from .graph.models import resnet8_mnist, resnet18_cifar, resnet20_cifar
from .graph.network import SparseGraph, example_input
from .graph.ops import graph_flops, graph_weights
from .graph.plain import describe
from .metrics import dense_flops


@dataclass(frozen=True)
class ModelSpec:
    """A fully connected reference architecture."""

    name: str
    widths: tuple[int, ...]  # (in, hidden..., out)
    activation: str = "relu"
    batch_norm: bool = False
    adaptive: bool = True  # input/output widths follow the data
    description: str = ""

    @property
    def hidden(self) -> tuple[int, ...]:
        return self.widths[1:-1]

    def dense_weights(self) -> int:
        return sum(a * b for a, b in zip(self.widths[:-1], self.widths[1:]))

    def dense_flops(self) -> int:
        return dense_flops(self.widths)

    def for_data(self, in_features: int, num_classes: int) -> "ModelSpec":
        """The spec with its input/output widths checked against (or fitted to) the data.

        Raises:
            NestError: when a fixed spec does not match the data's shape.
        """
        if self.adaptive:
            return ModelSpec(self.name, (in_features, *self.hidden, num_classes),
                             self.activation, self.batch_norm, True, self.description)
        if self.widths[0] != in_features or self.widths[-1] != num_classes:
            raise NestError(
                f"model {self.name!r} has {self.widths[0]} inputs and {self.widths[-1]} outputs, "
                f"but the data has {in_features} features and {num_classes} classes.")
        return self


def _conv(out: int, kernel: int, stride: int = 1, padding: int = 0, pool: str | None = None,
          dropout: float = 0.0) -> dict:
    return {"out": out, "kernel": kernel, "stride": stride, "padding": padding, "act": "relu",
            "pool": pool, "dropout": dropout}


def _fc(out: int, dropout: float = 0.0) -> dict:
    return {"out": out, "act": "relu", "dropout": dropout}


@dataclass(frozen=True)
class CNNSpec:
    """A sequential CNN reference: conv stages (``SparseCNN`` layer dicts), then linear layers.

    ``seed_hidden`` optionally fixes the seed's hidden widths (the paper's AlexNet and
    VGG-16 seeds, §4.2); otherwise the seed scales every hidden width by ``seed_net.ratio``.
    With ``adaptive`` the input channels and the classes follow the data; the spatial
    input size is fixed.
    """

    name: str
    input_shape: tuple[int, int, int]
    conv: tuple[dict, ...]
    fc: tuple[dict, ...]
    batch_norm: bool = False
    adaptive: bool = True
    seed_hidden: tuple[int, ...] | None = None
    seed_density: float | None = None  # the paper's connection density of this seed, if it states one
    description: str = ""
    activation: str = "relu"

    @property
    def widths(self) -> tuple[int, ...]:
        """Units per layer: input channels, conv channels, fc neurons (classes last)."""
        return (self.input_shape[0], *(c["out"] for c in self.conv), *(f["out"] for f in self.fc))

    @property
    def hidden(self) -> tuple[int, ...]:
        return self.widths[1:-1]

    def with_widths(self, widths) -> "CNNSpec":
        """The same layout with other units per layer (``widths`` as :attr:`widths`)."""
        n = len(self.conv)
        conv = tuple(dict(c, out=int(w)) for c, w in zip(self.conv, widths[1:1 + n]))
        fc = tuple(dict(f, out=int(w)) for f, w in zip(self.fc, widths[1 + n:]))
        shape = (int(widths[0]), *self.input_shape[1:])
        return CNNSpec(self.name, shape, conv, fc, self.batch_norm, self.adaptive, self.seed_hidden,
                       self.seed_density, self.description, self.activation)

    def layer_shapes(self) -> list[dict]:
        """Per weight layer: kind, in, out, kernel, output size and dense weights/FLOPs."""
        from .metrics import layer_flops
        from .sparse.conv import conv_out_size

        rows, (c_in, h, w) = [], self.input_shape
        for c in self.conv:
            ho, wo = (conv_out_size(n, c["kernel"], c["stride"], c["padding"]) for n in (h, w))
            weights = c["out"] * c_in * c["kernel"] ** 2
            rows.append({"kind": "conv", "in": c_in, "out": c["out"], "out_hw": (ho, wo), "weights": weights,
                         "flops": layer_flops(weights * ho * wo)})
            h, w = ho, wo
            if c.get("pool"):
                _, k, s = c["pool"].split(":")
                h, w = conv_out_size(h, int(k), int(s), 0), conv_out_size(w, int(k), int(s), 0)
            c_in = c["out"]
        features = c_in * h * w
        for f in self.fc:
            rows.append({"kind": "fc", "in": features, "out": f["out"], "weights": features * f["out"],
                         "flops": layer_flops(features * f["out"])})
            features = f["out"]
        return rows

    def dense_weights(self) -> int:
        return sum(r["weights"] for r in self.layer_shapes())

    def dense_flops(self) -> int:
        return int(sum(r["flops"] for r in self.layer_shapes()))

    def for_data(self, input_shape, num_classes: int) -> "CNNSpec":
        """The spec fitted to the data's channels and classes.

        Raises:
            NestError: the data's images do not have this model's spatial size.
        """
        shape = tuple(int(v) for v in input_shape)
        if len(shape) != 3 or shape[1:] != self.input_shape[1:]:
            raise NestError(f"model {self.name!r} expects images of {self.input_shape[1]}x{self.input_shape[2]} "
                            f"pixels, but the data's inputs have shape {shape}.")
        if not self.adaptive:
            if shape[0] != self.input_shape[0] or self.widths[-1] != num_classes:
                raise NestError(f"model {self.name!r} has {self.input_shape[0]} input channels and "
                                f"{self.widths[-1]} outputs, but the data has {shape[0]} channels and "
                                f"{num_classes} classes.")
            return self
        return self.with_widths((shape[0], *self.hidden, num_classes))

    def build(self, generator=None, widths=None):
        """A dense SparseCNN of this layout (optionally with other ``widths``)."""
        from .sparse import SparseCNN

        spec = self.with_widths(widths) if widths is not None else self
        return SparseCNN(spec.input_shape, list(spec.conv), list(spec.fc), self.batch_norm, generator)


@dataclass(frozen=True)
class _GraphSummary:
    """What a GraphSpec's network is, from one capture (see :attr:`GraphSpec.summary`)."""

    widths: tuple[int, ...]
    weights: int
    flops: int
    has_conv: bool
    output_is_last_layer: bool
    outputs: int


@dataclass(frozen=True)
class GraphSpec:
    """A reference network of any architecture capture accepts, built as a SparseGraph.

    Either ``make`` builds it (a registered network: ``make(in_channels, num_classes)``)
    or ``module`` is it (a user's network, copied when the spec is made).  With
    ``adaptive`` the input channels, the classes and the image size follow the data (the
    registered ResNets end in a global average pool, so any image size fits); a user's
    network is taken as it is.

    ``widths`` are the units of the input (channels) and of every weight layer's output,
    in graph order; dense weights and FLOPs (:mod:`nestsynth.graph.ops`, the
    :mod:`nestsynth.metrics` convention) are for ``input_shape``.
    """

    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    make: Callable[[int, int], nn.Module] | None = dataclasses.field(default=None, compare=False)
    module: nn.Module | None = dataclasses.field(default=None, compare=False)
    adaptive: bool = True
    description: str = ""

    @classmethod
    def of_module(cls, module: nn.Module, input_shape, num_classes: int) -> "GraphSpec":
        """The spec of a user's network (named "custom") for data of ``input_shape`` samples
        and ``num_classes`` classes.

        The network reads the samples as they are, or flattened when it only runs on flat
        vectors (an MLP-like network on image data).

        Raises:
            NestError: capture's one sentence for an unsupported network, a module that
                cannot be stored as plain data, or fewer outputs than classes.
        """
        shape = tuple(int(v) for v in input_shape)
        module = module.net if isinstance(module, SparseGraph) else module
        spec = cls("custom", shape, int(num_classes), module=copy.deepcopy(module), adaptive=False,
                   description="user network")
        try:
            spec.summary  # noqa: B018  (captures: refuses an unsupported network now)
        except NestError:
            if len(shape) == 1:
                raise
            flat = dataclasses.replace(spec, input_shape=(math.prod(shape),))
            try:
                flat.summary  # noqa: B018
            except NestError:
                spec.summary  # noqa: B018  (the sentence about the data's own shape)
            spec = flat
        return spec.for_data(shape, num_classes)

    def network(self) -> nn.Module:
        """A new ``nn.Module`` of this architecture (PyTorch's own initialization)."""
        if self.make is not None:
            return self.make(int(self.input_shape[0]), int(self.num_classes))
        return copy.deepcopy(self.module)

    @cached_property
    def summary(self) -> _GraphSummary:
        """Widths, dense counts and shape facts of the network on ``input_shape`` (one capture).

        Raises:
            NestError: capture's one sentence, or a module plain data cannot describe.
        """
        graph = capture(self.network(), example_input(self.input_shape))
        describe(graph.module)  # a module type a model file could not rebuild: refused before training
        layers = list(graph.layers)
        widths = (graph.units[INPUT], *(graph.units[name] for name in layers))
        outputs = graph.outputs
        last = len(outputs) == 1 and outputs[0].expansion == 1 and outputs[0].sources == frozenset({layers[-1]})
        n_out = sum(graph.units[next(iter(seg.sources))] * seg.expansion for seg in outputs)
        has_conv = any(layer.out_hw is not None for layer in graph.layers.values())
        return _GraphSummary(widths, graph_weights(graph), graph_flops(graph), has_conv, last, n_out)

    @property
    def widths(self) -> tuple[int, ...]:
        return self.summary.widths

    @property
    def hidden(self) -> tuple[int, ...]:
        return self.widths[1:-1]

    @property
    def is_mlp(self) -> bool:
        """No convolution, and the output is the last layer's (the layer-wise methods' MLP)."""
        return not self.summary.has_conv and self.summary.output_is_last_layer

    def dense_weights(self) -> int:
        return self.summary.weights

    def dense_flops(self) -> int:
        return self.summary.flops

    def for_data(self, input_shape, num_classes: int) -> "GraphSpec":
        """The spec fitted to the data (adaptive) or checked against it.

        Raises:
            NestError: an adaptive (image) network on data that are not images, a network
                that does not run on the data's samples (capture's sentence), or fewer
                outputs than the data has classes.
        """
        shape = tuple(int(v) for v in input_shape)
        if self.adaptive:
            if len(shape) != 3:
                raise NestError(f"model {self.name!r} needs image inputs (C, H, W), but the data's inputs have "
                                f"shape {shape}.")
            fitted = dataclasses.replace(self, input_shape=shape, num_classes=int(num_classes))
        else:
            if math.prod(shape) != math.prod(self.input_shape):
                raise NestError(f"model {self.name!r} reads inputs of shape {self.input_shape}, but the data's "
                                f"inputs have shape {shape}.")
            fitted = self
        if fitted.summary.outputs < num_classes:
            raise NestError(f"model {self.name!r} has {fitted.summary.outputs} outputs, but the data has "
                            f"{num_classes} classes.")
        return fitted

    def build(self, generator: torch.Generator | None = None) -> SparseGraph:
        """The dense SparseGraph of this network (every mask one).

        Args:
            generator: draw every weight from it (see :meth:`SparseGraph.from_module`);
                None keeps the network's own weights (a user's trained ones).
        """
        return SparseGraph.from_module(self.network(), self.input_shape, generator)


_MODELS: dict[str, ModelSpec | CNNSpec | GraphSpec] = {}


def register_model(spec):
    _MODELS[spec.name] = spec
    return spec


register_model(ModelSpec("lenet-300-100", (784, 300, 100, 10),
                         description="LeNet-300-100 MLP (LeCun et al. 1998; NeST Table 2)"))
register_model(ModelSpec("lenet-500-150", (784, 500, 150, 10),
                         description="LeNet-500-150 MLP (LeCun et al. 1998)"))


# LeNet-5 as in Caffe's MNIST example (the paper's Table 2): 431K weights, 4,586K FLOPs dense.
register_model(CNNSpec("lenet-5", (1, 28, 28),
                       (_conv(20, 5, pool="max:2:2"), _conv(50, 5, pool="max:2:2")), (_fc(500), _fc(10)),
                       description="LeNet-5 CNN, Caffe layout (NeST Table 2)"))
# AlexNet (one tower, no grouping; torchvision's channel counts) for 224x224 inputs; the paper's seed
# has 60, 140, 240, 210, 160 maps and 3200, 1600 hidden neurons, 30% of the connections active.
register_model(CNNSpec("alexnet", (3, 224, 224),
                       (_conv(64, 11, 4, 2, "max:3:2"), _conv(192, 5, 1, 2, "max:3:2"), _conv(384, 3, 1, 1),
                        _conv(256, 3, 1, 1), _conv(256, 3, 1, 1, "max:3:2")),
                       (_fc(4096, 0.5), _fc(4096, 0.5), _fc(1000)),
                       seed_hidden=(60, 140, 240, 210, 160, 3200, 1600), seed_density=0.3,
                       description="AlexNet for 224x224 inputs (NeST Table 5 seed)"))
_VGG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def _vgg_convs() -> tuple[dict, ...]:
    convs = []
    for v in _VGG:
        if v == "M":
            convs[-1]["pool"] = "max:2:2"
        else:
            convs.append(_conv(v, 3, 1, 1))
    return tuple(convs)


_VGG_SEED_CONV = tuple(round(0.75 * v) for v in _VGG if v != "M")
register_model(CNNSpec("vgg-16", (3, 224, 224), _vgg_convs(), (_fc(4096, 0.5), _fc(4096, 0.5), _fc(1000)),
                       batch_norm=True, seed_hidden=(*_VGG_SEED_CONV, 3200, 1600), seed_density=0.3,
                       description="VGG-16 (batch norm) for 224x224 inputs (NeST Table 6 seed)"))
register_model(CNNSpec("vgg-16-cifar", (3, 32, 32), _vgg_convs(), (_fc(512, 0.5), _fc(512, 0.5), _fc(10)),
                       batch_norm=True, seed_hidden=(*_VGG_SEED_CONV, 400, 200), seed_density=0.3,
                       description="VGG-16 (batch norm) for 32x32 CIFAR-10 inputs; seed r = 0.75 as in §4.2"))
register_model(CNNSpec("tiny-cnn", (1, 8, 8), (_conv(8, 3, 1, 1, "max:2:2"), _conv(16, 3, 1, 1, "max:2:2")),
                       (_fc(32), _fc(10)), description="a small CNN for 8x8 digits (tests, quick start)"))
# Residual networks (graph references, SparseGraph); the counts are for the input shape given here.
register_model(GraphSpec("resnet20", (3, 32, 32), 10, lambda c, k: resnet20_cifar(k, c),
                         description="ResNet-20 for 32x32 CIFAR-10 (He et al. 2016; 1x1 projection shortcuts)"))
register_model(GraphSpec("resnet18-cifar", (3, 32, 32), 10, lambda c, k: resnet18_cifar(k, c),
                         description="ResNet-18, CIFAR variant (3x3 stem, no max pool; projection shortcuts)"))
register_model(GraphSpec("resnet-mnist", (1, 28, 28), 10, lambda c, k: resnet8_mnist(k, c),
                         description="ResNet-8 for 28x28 MNIST (8/16/32 channels, one block per stage)"))


def list_models() -> list[ModelSpec | CNNSpec | GraphSpec]:
    """All registered reference architectures, sorted by name."""
    return [_MODELS[k] for k in sorted(_MODELS)]


def get_model(name: str) -> ModelSpec | CNNSpec | GraphSpec:
    """Look up a registered name or parse an ``mlp:IN-H1-...-OUT`` spec.

    Raises:
        NestError: unknown name or malformed spec.
    """
    if name in _MODELS:
        return _MODELS[name]
    if name.startswith("mlp:"):
        return _parse_mlp(name)
    known = ", ".join(sorted(_MODELS))
    raise NestError(f"unknown model {name!r}; known models: {known}, or mlp:IN-H1-...-OUT "
                    "(e.g. mlp:784-500-250-10).")


def _parse_mlp(name: str) -> ModelSpec:
    parts = name[4:].split("-")
    try:
        widths = tuple(int(p) for p in parts)
    except ValueError:
        widths = ()
    if len(widths) < 2 or any(w < 1 for w in widths):
        raise NestError(f"model spec {name!r} is malformed; write mlp: followed by two or more "
                        "positive widths joined by '-', e.g. mlp:784-500-250-10.")
    return ModelSpec(name, widths, adaptive=False, description="user MLP spec")


def is_cnn(spec) -> bool:
    return isinstance(spec, CNNSpec)


def is_graph(spec) -> bool:
    return isinstance(spec, GraphSpec)


def in_features_of(input_shape: tuple[int, ...]) -> int:
    return math.prod(input_shape)
