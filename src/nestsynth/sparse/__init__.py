"""Masked layers, the sparse MLP and shape surgery (adding/removing units)."""

from .masked import MaskedLinear
from .mlp import SparseMLP, make_activation, from_sequential
from .surgery import append_units, keep_units, set_mask

__all__ = ["MaskedLinear", "SparseMLP", "make_activation", "from_sequential",
           "append_units", "keep_units", "set_mask"]
