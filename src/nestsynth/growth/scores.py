"""One pass over the training data that yields every score growth needs.

For linear layer ``i`` with input x_i (B, in) and output u_i (B, out), the gradient
of the mean loss with respect to the *dense* weight is ``delta_i.T @ x_i / N`` with
``delta_i = dL/du_i`` -- valid at dormant positions too, where a masked weight's
``.grad`` is zero (Policy 1, Eq. 1).  The bridging gradient of hidden layer h
(Algorithm 1) is ``delta_{h+1}.T @ x_h / N``: the gradient of a direct connection
from the neurons feeding layer h to the neurons fed by it.  For a convolution the
dense kernel gradient is ``conv2d_weight(x, W.shape, delta * A)``
(:func:`nestsynth.growth.conv.weight_gradient`); bridging gradients exist only between
linear layers (conv layers grow feature maps instead, Policy 3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class GradientScan:
    grads: list[torch.Tensor]  # dL/dW_i, (out_i, in_i), dense
    bridges: list  # G_h (out_{h+1}, in_h) per hidden layer; None where layer h or h+1 is a convolution
    samples: int


def scan_indices(n: int, max_samples: int, generator: torch.Generator | None) -> torch.Tensor:
    """All indices, or a random subset of ``max_samples`` (0 means all)."""
    if max_samples <= 0 or max_samples >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=generator)[:max_samples].sort().values


def gradient_scan(model, X: torch.Tensor, y: torch.Tensor, batch_size: int = 2048,
                  bridges: bool = True, grads: bool = True) -> GradientScan:
    """Dense weight gradients, bridging gradients and output statistics over (X, y).

    The model is evaluated in eval mode (batch norm uses running statistics), so the
    scores are gradients of the function the model computes at inference.

    Args:
        X: (N, *input_shape) inputs; y: (N,) labels.
        bridges: also compute the bridging gradients (neuron growth).
        grads: compute the dense weight gradients (False: ``grads`` is empty, e.g. when
            connection growth ranks with the memory-bounded :func:`growth.conv.top_dormant`).
    """
    from ..distributed import current
    from .conv import weight_gradient

    was_training = model.training
    model.eval()
    n = len(X)
    dist = current()
    X, y = dist.shard(X, y)  # under torchrun: this rank's part of the sample, summed below
    grads = [torch.zeros_like(layer.weight) for layer in model.layers] if grads else []
    linear = [layer.weight.dim() == 2 for layer in model.layers]
    bridge = [torch.zeros(model.layers[h + 1].out_features, model.layers[h].in_features, device=X.device)
              if linear[h] and linear[h + 1] else None for h in range(model.n_hidden)] if bridges else []
    for start in range(0, len(X), batch_size):
        xb, yb = X[start:start + batch_size], y[start:start + batch_size]
        inputs, outputs = model.trace(xb)
        loss = F.cross_entropy(outputs[-1], yb, reduction="sum") / n
        deltas = torch.autograd.grad(loss, outputs)  # dL/du_i, (B, out_i) or (B, out_i, H, W)
        with torch.no_grad():
            for i, (d, x) in enumerate(zip(deltas[:len(grads)], inputs)):
                grads[i] += d.T @ x if linear[i] else weight_gradient(model.layers[i], x, d)
            for h, g in enumerate(bridge):
                if g is not None:
                    g += deltas[h + 1].T @ inputs[h]
    model.train(was_training)
    dist.all_reduce_sum(grads + [g for g in bridge if g is not None])  # before any top-k
    return GradientScan(grads, bridge, n)
