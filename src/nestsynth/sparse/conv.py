"""A convolution whose kernel weights and output positions are switched by masks."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def conv_out_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Output length of a convolution (or pooling) along one axis."""
    return (size + 2 * padding - kernel) // stride + 1


class MaskedConv2d(nn.Module):
    """``y = (conv2d(x, W * M) + b) * A`` with two 0/1 masks.

    ``M`` (out, in, kh, kw) switches single kernel weights (connection growth and
    pruning work at this granularity); ``A`` (out, H_out, W_out) is the area mask of
    partial-area convolution (paper Algorithm 2's ``Msk``): kernel n computes only the
    output positions where ``A[n]`` is 1, and the output elsewhere is exactly zero, so
    the layer equals a dense convolution whose masked outputs are zeroed.  Dormant
    weights (mask 0) are kept at exactly zero, as in :class:`MaskedLinear`.

    Args:
        in_channels, out_channels, kernel_size, stride, padding: as ``nn.Conv2d`` (square
            kernels, groups = 1).
        out_hw: (H_out, W_out), the output size for the model's input size (fixes ``A``).
        generator: RNG for the initial weights (PyTorch's Conv2d default range).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, out_hw: tuple[int, int],
                 stride: int = 1, padding: int = 0, generator: torch.Generator | None = None):
        super().__init__()
        self.stride, self.padding = int(stride), int(padding)
        k = int(kernel_size)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, k, k))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.register_buffer("mask", torch.ones(out_channels, in_channels, k, k))
        self.register_buffer("area", torch.ones(out_channels, *out_hw))
        bound = 1.0 / math.sqrt(in_channels * k * k)
        with torch.no_grad():
            self.weight.uniform_(-bound, bound, generator=generator)
            self.bias.uniform_(-bound, bound, generator=generator)

    @property
    def in_features(self) -> int:  # the names MaskedLinear uses: units in, units out
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def kernel_size(self) -> int:
        return self.weight.shape[2]

    @property
    def out_hw(self) -> tuple[int, int]:
        return tuple(self.area.shape[1:])

    def conv(self, x: torch.Tensor) -> torch.Tensor:
        """The masked convolution without bias and area mask: (B, in, H, W) -> (B, out, H', W')."""
        return F.conv2d(x, self.weight * self.mask, None, self.stride, self.padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x) + self.bias.view(1, -1, 1, 1)
        return y * self.area if not bool(self.area.all()) else y

    def active_weights(self) -> int:
        """Non-zero kernel weights (the paper's #Param for this layer)."""
        return int(torch.count_nonzero(self.weight.detach() * self.mask))

    def active_connections(self) -> int:
        return int(self.mask.sum())

    def conv_pct(self) -> float:
        """Share of the output area the kernels still compute (paper's Conv%), in percent."""
        return 100.0 * float(self.area.mean())

    def extra_repr(self) -> str:
        return (f"{self.in_features}, {self.out_features}, kernel={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, out={self.out_hw}, active={self.active_connections()}, "
                f"conv={self.conv_pct():.0f}%")
