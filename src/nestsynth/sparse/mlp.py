"""The sparse multi-layer perceptron that NeST grows and prunes.

Layout: ``layers[i]`` is a :class:`MaskedLinear`; hidden layer ``h`` (0-based) is the
output of ``layers[h]``, optionally batch-normalised (``norms[h]``), then passed
through the element-wise ``acts[h]``.  The architecture is described by plain data
(:meth:`SparseMLP.arch`) so a checkpoint can rebuild it without pickle.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import NestError
from .masked import MaskedLinear
from .network import MaskedNetwork

_ACTIVATIONS = {
    "relu": lambda a: nn.ReLU(),
    "leaky_relu": lambda a: nn.LeakyReLU(float(a) if a else 0.01),
    "tanh": lambda a: nn.Tanh(),
    "sigmoid": lambda a: nn.Sigmoid(),
    "elu": lambda a: nn.ELU(float(a) if a else 1.0),
    "gelu": lambda a: nn.GELU(),
    "silu": lambda a: nn.SiLU(),
    "softplus": lambda a: nn.Softplus(),
    "identity": lambda a: nn.Identity(),
}


def make_activation(spec: str) -> nn.Module:
    """Build an element-wise activation from ``"name"`` or ``"name:arg"``.

    Raises:
        NestError: unknown activation name.
    """
    name, _, arg = spec.partition(":")
    if name not in _ACTIVATIONS:
        raise NestError(f"unknown activation {spec!r}; known: {', '.join(sorted(_ACTIVATIONS))}.")
    return _ACTIVATIONS[name](arg)


def activation_spec(module: nn.Module) -> str | None:
    """The string spec of an element-wise activation module, or None if it is not one."""
    table = {nn.ReLU: "relu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.GELU: "gelu",
             nn.SiLU: "silu", nn.Softplus: "softplus", nn.Identity: "identity"}
    if type(module) in table:
        return table[type(module)]
    if isinstance(module, nn.LeakyReLU):
        return f"leaky_relu:{module.negative_slope}"
    if isinstance(module, nn.ELU):
        return f"elu:{module.alpha}"
    return None


class SparseMLP(MaskedNetwork):
    """A masked MLP whose widths can grow and shrink.

    Args:
        widths: (in, hidden..., out).
        activations: one activation spec per hidden layer (or one string for all).
        batch_norm: BatchNorm1d after every hidden linear layer.
        generator: RNG for the initial weights.
    """

    def __init__(self, widths, activations="relu", batch_norm: bool = False,
                 generator: torch.Generator | None = None):
        super().__init__()
        widths = [int(w) for w in widths]
        n_hidden = len(widths) - 2
        if isinstance(activations, str):
            activations = [activations] * n_hidden
        if len(activations) != n_hidden:
            raise NestError(f"{len(activations)} activations given for {n_hidden} hidden layers.")
        self.activation_specs = list(activations)
        self.layers = nn.ModuleList(MaskedLinear(a, b, generator) for a, b in zip(widths[:-1], widths[1:]))
        self.norms = nn.ModuleList(nn.BatchNorm1d(w) for w in widths[1:-1]) if batch_norm else nn.ModuleList()
        self.acts = nn.ModuleList(make_activation(a) for a in activations)

    # ---- structure ---------------------------------------------------------
    @property
    def widths(self) -> list[int]:
        return [self.layers[0].in_features] + [layer.out_features for layer in self.layers]

    def arch(self) -> dict:
        """Plain-data description, enough to rebuild the module (see :meth:`from_arch`)."""
        return {"widths": self.widths, "activations": list(self.activation_specs),
                "batch_norm": self.batch_norm}

    @classmethod
    def from_arch(cls, arch: dict) -> "SparseMLP":
        return cls(arch["widths"], arch["activations"], bool(arch["batch_norm"]))

    # ---- forward -----------------------------------------------------------
    def hidden_post(self, h: int, u: torch.Tensor) -> torch.Tensor:
        """Hidden layer h's output from its linear output u: batch norm, then activation."""
        if self.norms:
            u = self.norms[h](u)
        return self.acts[h](u)

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)  # (B, *input_shape) -> (B, in)


def from_sequential(seq: nn.Sequential) -> SparseMLP:
    """Convert a user's ``nn.Sequential`` of Linear / BatchNorm1d / activations to a SparseMLP.

    The result is fully connected (mask of ones) and carries the same weights, so it
    computes the same function.  A leading ``nn.Flatten`` is accepted.

    Raises:
        NestError: for a module that is not Linear, BatchNorm1d, Flatten or an
            element-wise activation, or for an irregular layer order.
    """
    linears, norms, acts = [], [], []
    previous = None
    for module in seq:
        if isinstance(module, nn.Flatten) and not linears:
            continue
        if isinstance(module, nn.Linear):
            if linears and len(acts) != len(linears):
                raise NestError("each hidden Linear must be followed by an activation before the next Linear.")
            linears.append(module)
        elif isinstance(module, nn.BatchNorm1d) and linears:
            if not isinstance(previous, nn.Linear):
                raise NestError("a BatchNorm1d must come directly after a Linear layer (before its activation).")
            norms.append(module)
        elif activation_spec(module) is not None and linears:
            acts.append(activation_spec(module))
        else:
            raise NestError(f"cannot synthesize from a {type(module).__name__} module; a model must be an "
                            "nn.Sequential of Linear layers, optional BatchNorm1d and element-wise activations.")
        previous = module
    if not linears or len(acts) != len(linears) - 1 or len(norms) not in (0, len(linears) - 1):
        raise NestError("the nn.Sequential must be Linear (BatchNorm1d) activation ... Linear, with one "
                        "activation after every hidden Linear and none after the last.")
    widths = [linears[0].in_features] + [lin.out_features for lin in linears]
    for a, b in zip(linears[:-1], linears[1:]):
        if a.out_features != b.in_features:
            raise NestError(f"Linear layers do not chain: {a.out_features} outputs feed {b.in_features} inputs.")
    model = SparseMLP(widths, acts, batch_norm=bool(norms))
    with torch.no_grad():
        for dst, src in zip(model.layers, linears):
            dst.weight.copy_(src.weight)
            if src.bias is not None:
                dst.bias.copy_(src.bias)
            else:
                dst.bias.zero_()
        for dst, src in zip(model.norms, norms):
            dst.load_state_dict(src.state_dict())
    return model
