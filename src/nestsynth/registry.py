"""Registered reference architectures: name -> spec, with errors that list the names.

A registered name (``lenet-300-100``) fixes the hidden widths; its input and output
widths follow the data set (LeNet-300-100 on 8x8 digits is 64-300-100-10).  An
explicit spec ``mlp:784-500-250-10`` fixes every width and must match the data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import NestError
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


_MODELS: dict[str, ModelSpec | CNNSpec] = {}


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


def list_models() -> list[ModelSpec]:
    """All registered reference architectures, sorted by name."""
    return [_MODELS[k] for k in sorted(_MODELS)]


def get_model(name: str) -> ModelSpec:
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


def in_features_of(input_shape: tuple[int, ...]) -> int:
    return math.prod(input_shape)
