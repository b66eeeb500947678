"""What every network of masked weight layers shares (sizes, effective weights, BN folding),
and the forward pass of the sparse MLP and CNN chains.

:class:`MaskedLayers` is the part that only needs ``layers`` (masked weight layers in
order), :meth:`~MaskedLayers.trace` and :meth:`~MaskedLayers.norm_entries` (the batch norm
that normalizes a layer's outputs): the chains below and the graph networks of
:mod:`nestsynth.graph` both provide them.  :class:`MaskedNetwork` is the chain: a
subclass provides ``layers``, ``norms`` (one batch norm per hidden layer, or empty),
:meth:`~MaskedNetwork.hidden_post` and :meth:`~MaskedNetwork.prepare_input`.
"""

from __future__ import annotations

import torch
from torch import nn


def _per_unit(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """View a per-output-unit vector so it broadcasts over a weight of ``like``'s shape."""
    return t.view(-1, *([1] * (like.dim() - 1)))


def _entries(t: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """``t`` at ``index`` (all of it when None)."""
    return t if index is None else t.index_select(0, index.to(t.device))


class MaskedLayers(nn.Module):
    """A network whose weight layers are MaskedLinear / MaskedConv2d (see the module docstring).

    A subclass provides ``layers``, :meth:`trace` and :meth:`norm_entries`.
    """

    def trace(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:  # pragma: no cover
        raise NotImplementedError

    def norm_entries(self, i: int) -> tuple[nn.Module, torch.Tensor | None, bool] | None:  # pragma: no cover
        """The batch norm that normalizes layer i's output units, or None.

        Returns:
            ``(bn, index, own)``: the batch norm, the int64 entries of it that layer i's
            units 0.. feed (None: all of them, in order), and whether it normalizes layer
            i's output alone (True) or a sum of several layers' outputs (a residual
            stream); only an own batch norm can be folded into the layer.
        """
        raise NotImplementedError

    def layer_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """What each following layer sees (for a chain: after BN, activation, pooling), then
        the last layer's output: the input of ``layers[1]``, ``layers[2]``, ...."""
        inputs, outputs = self.trace(x)
        return inputs[1:] + [outputs[-1]]

    # ---- sizes and effective weights -----------------------------------------
    def active_weights(self) -> int:
        return sum(layer.active_weights() for layer in self.layers)

    def active_per_layer(self) -> list[int]:
        return [layer.active_weights() for layer in self.layers]

    def effective_weight(self, i: int) -> torch.Tensor:
        """W* of Eq. 9: the masked weight divided per output unit by the BN scale sqrt(var + eps)
        of the batch norm that normalizes layer i's outputs (:meth:`norm_entries`)."""
        w = self.layers[i].weight.detach() * self.layers[i].mask
        found = self.norm_entries(i)
        if found is None:
            return w
        bn, index, _ = found
        return w / _per_unit(torch.sqrt(_entries(bn.running_var, index) + bn.eps), w)

    def folded_layer(self, i: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(W, b) of layer i for inference: mask applied, its own batch norm (affine included)
        folded in (a batch norm of a residual sum is left where it is).

        Args:
            dtype: computation dtype (export folds in float64).
        """
        w = (self.layers[i].weight.detach() * self.layers[i].mask).to(dtype)
        b = self.layers[i].bias.detach().to(dtype)
        found = self.norm_entries(i)
        if found is not None and found[2]:
            bn, index, _ = found
            gamma = torch.ones_like(b) if bn.weight is None else _entries(bn.weight.detach(), index).to(dtype)
            beta = torch.zeros_like(b) if bn.bias is None else _entries(bn.bias.detach(), index).to(dtype)
            scale = gamma / torch.sqrt(_entries(bn.running_var, index).to(dtype) + bn.eps)
            w = w * _per_unit(scale, w)
            b = (b - _entries(bn.running_mean, index).to(dtype)) * scale + beta
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


class MaskedNetwork(MaskedLayers):
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

    def norm_entries(self, i: int) -> tuple[nn.Module, None, bool] | None:
        """``norms[i]`` (all its entries, layer i's own) for a hidden layer of a network with
        batch norm; None otherwise."""
        return (self.norms[i], None, True) if self.norms and i < self.n_hidden else None
