"""A linear layer whose connections are switched on and off by a mask buffer."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class MaskedLinear(nn.Module):
    """``y = x @ (W * M).T + b`` with a 0/1 mask ``M`` of the weight's shape.

    The weight stays a Parameter with a stable identity (so optimizers keep working
    when the mask or the shape changes); the mask is a float buffer.  Dormant weights
    (mask 0) are kept at exactly zero, so ``weight`` alone is the effective matrix.

    Example:
        >>> layer = MaskedLinear(4, 3)
        >>> layer.mask.zero_(); layer.mask[0, 0] = 1
        >>> layer.active_weights() <= 1
        True
    """

    def __init__(self, in_features: int, out_features: int, generator: torch.Generator | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features))
        self.register_buffer("mask", torch.ones(out_features, in_features))
        bound = 1.0 / math.sqrt(in_features)  # PyTorch's default Linear init range
        with torch.no_grad():
            self.weight.uniform_(-bound, bound, generator=generator)
            self.bias.uniform_(-bound, bound, generator=generator)

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, in) -> (B, out)
        return F.linear(x, self.weight * self.mask, self.bias)

    def active_weights(self) -> int:
        """Non-zero connections (the paper's #Param for this layer)."""
        return int(torch.count_nonzero(self.weight.detach() * self.mask))

    def active_connections(self) -> int:
        """Connections switched on by the mask (a grown weight may still be zero)."""
        return int(self.mask.sum())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"active={self.active_connections()}")
