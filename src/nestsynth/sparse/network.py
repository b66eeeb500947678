"""What the sparse MLP and CNN share: forward, trace, sizes, effective weights, BN folding.

A subclass provides ``layers`` (masked weight layers in order), ``norms`` (one batch norm
per hidden layer, or empty), :meth:`hidden_post` and :meth:`prepare_input`.
"""

from __future__ import annotations

import torch
from torch import nn


def _per_unit(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """View a per-output-unit vector so it broadcasts over a weight of ``like``'s shape."""
    return t.view(-1, *([1] * (like.dim() - 1)))


class MaskedNetwork(nn.Module):
    """Base of :class:`SparseMLP` and :class:`SparseCNN` (see the module docstring)."""

    @property
    def n_hidden(self) -> int:
        return len(self.layers) - 1

    @property
    def batch_norm(self) -> bool:
        return len(self.norms) > 0

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def hidden_post(self, h: int, u: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    # ---- forward -----------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, *input_shape) -> (B, classes)
        x = self.prepare_input(x)
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < self.n_hidden:
                x = self.hidden_post(i, x)
        return x

    def trace(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Forward pass that returns every weight layer's input and output.

        Returns:
            (inputs, outputs): ``inputs[i]`` feeds ``layers[i]`` ((B, in) for linear layers,
            (B, C, H, W) for conv layers); ``outputs[i]`` is its pre-normalisation output u
            (logits last).
        """
        inputs, outputs = [], []
        x = self.prepare_input(x)
        for i, layer in enumerate(self.layers):
            inputs.append(x)
            u = layer(x)
            outputs.append(u)
            x = self.hidden_post(i, u) if i < self.n_hidden else u
        return inputs, outputs

    def layer_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """What each following layer sees (after BN, activation, pooling), then the logits."""
        inputs, outputs = self.trace(x)
        return inputs[1:] + [outputs[-1]]

    # ---- sizes and effective weights -----------------------------------------
    def active_weights(self) -> int:
        return sum(layer.active_weights() for layer in self.layers)

    def active_per_layer(self) -> list[int]:
        return [layer.active_weights() for layer in self.layers]

    def _norm(self, i: int):
        return self.norms[i] if self.norms and i < self.n_hidden else None

    def effective_weight(self, i: int) -> torch.Tensor:
        """W* of Eq. 9: the masked weight divided per output unit by the BN scale sqrt(var + eps)."""
        w = self.layers[i].weight.detach() * self.layers[i].mask
        bn = self._norm(i)
        return w if bn is None else w / _per_unit(torch.sqrt(bn.running_var + bn.eps), w)

    def folded_layer(self, i: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(W, b) of layer i for inference: mask applied, batch norm (affine included) folded in.

        Args:
            dtype: computation dtype (export folds in float64).
        """
        w = (self.layers[i].weight.detach() * self.layers[i].mask).to(dtype)
        b = self.layers[i].bias.detach().to(dtype)
        bn = self._norm(i)
        if bn is not None:
            scale = bn.weight.detach().to(dtype) / torch.sqrt(bn.running_var.to(dtype) + bn.eps)
            w = w * _per_unit(scale, w)
            b = (b - bn.running_mean.to(dtype)) * scale + bn.bias.detach().to(dtype)
        return w, b

    def effective_bias(self, i: int) -> torch.Tensor:
        """The bias after folding BN (affine included) into layer i, for inference."""
        return self.folded_layer(i)[1]

    def nonzero_biases(self, i: int) -> int:
        return int(torch.count_nonzero(self.effective_bias(i)))

    def zero_dormant(self) -> None:
        """Force weights at masked positions to exactly zero."""
        with torch.no_grad():
            for layer in self.layers:
                layer.weight.mul_(layer.mask)
