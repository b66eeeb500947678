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


_MODELS: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> ModelSpec:
    _MODELS[spec.name] = spec
    return spec


register_model(ModelSpec("lenet-300-100", (784, 300, 100, 10),
                         description="LeNet-300-100 MLP (LeCun et al. 1998; NeST Table 2)"))
register_model(ModelSpec("lenet-500-150", (784, 500, 150, 10),
                         description="LeNet-500-150 MLP (LeCun et al. 1998)"))


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


def in_features_of(input_shape: tuple[int, ...]) -> int:
    return math.prod(input_shape)
