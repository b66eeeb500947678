"""Masked layers, the sparse MLP and CNN, and shape surgery (adding/removing units)."""

from .masked import MaskedLinear
from .conv import MaskedConv2d
from .mlp import SparseMLP, make_activation, from_sequential
from .cnn import SparseCNN, cnn_from_sequential
from .surgery import append_units, keep_units, set_mask


def model_from_arch(arch: dict):
    """Rebuild a SparseMLP or SparseCNN from its plain-data ``arch()``."""
    return SparseCNN.from_arch(arch) if arch.get("kind") == "cnn" else SparseMLP.from_arch(arch)


__all__ = ["MaskedLinear", "MaskedConv2d", "SparseMLP", "SparseCNN", "make_activation", "from_sequential",
           "cnn_from_sequential", "model_from_arch", "append_units", "keep_units", "set_mask"]
