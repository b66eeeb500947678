"""Partial-area convolution (paper §3.3.2, Algorithm 2): prune the output positions
of each kernel whose response to the data is insignificant.

Reading of Algorithm 2.  For one input with ``M`` channels ("M input images") and
``N`` kernels, the algorithm convolves every input channel ``m`` with its kernel slice
``K[m, n]`` separately, giving the *depthwise* feature-map tensor
``C in R^{M x N x P x Q}``; the layer's output is ``F = sum_m C[m] * Msk[m]``.  The
threshold ``thres`` is the ``(100 gamma)``-th percentile of **all** elements of
``|C|`` in the layer (one threshold per layer, not per kernel), and every element below
it is masked.  The paper states the algorithm for one input; a mask used at inference
cannot depend on the image, so we aggregate over the data and threshold the **mean over
images** of ``|C|`` (the aggregate, not per image).

Granularity.  :class:`~nestsynth.sparse.MaskedConv2d` stores one area mask per output
position of each kernel, ``area`` (out, H_out, W_out), i.e. a kernel ``n`` either
computes position ``(p, q)`` or not.  The score of ``(n, p, q)`` is therefore the mean
over images of ``|layer.conv(x)[n, p, q]|`` (the masked convolution without bias, the
sum over input channels of the depthwise maps), see :func:`area_scores`.  For a layer
with one input channel (the first layer of LeNet-5 on MNIST, the paper's Fig. 5 and its
2.09x FLOPs reduction) this *is* Algorithm 2's ``C``; for ``M > 1`` it is a deviation:
Algorithm 2 would mask single (input channel, kernel, position) connections, which the
layer cannot express.  :func:`depthwise_maps` returns Algorithm 2's full ``C`` (mean
``|C|``, shape (in, out, H_out, W_out)) for analysis and tests.

Pruning step (:func:`prune_area`).  Only live positions compete (the threshold is the
percentile of the live positions' scores; positions already switched off are never
revived): exactly ``round(rate * live)`` live positions with the smallest scores are
switched off, at least one when ``rate > 0``; ties go to the lower flat index
(``(n, p, q)`` row-major).  ``min_positions`` optionally keeps a floor of live positions
per kernel (the paper has none; default 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..distributed import current
from ..select import top_k
from ..sparse.conv import MaskedConv2d


def _layer_inputs(model, i: int, X: torch.Tensor, batch_size: int):
    """Yield layer i's input (B, C_in, H, W) for consecutive batches of X (eval mode, no grad)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(X), batch_size):
                inputs, _ = model.trace(X[start:start + batch_size])
                yield inputs[i]
    finally:
        model.train(was_training)


def _conv_layer(model, i: int) -> MaskedConv2d:
    layer = model.layers[i]
    if not isinstance(layer, MaskedConv2d):
        raise TypeError(f"layer {i} is a {type(layer).__name__}, not a MaskedConv2d.")
    return layer


def area_scores(model, i: int, X: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Mean over the data of ``|C[m, n, p, q]|``, the output of kernel n on image m.

    ``C = layer.conv(x)``: the masked convolution of layer i's input, without bias and
    without the area mask (eval mode, so batch norm and dropout of earlier layers use
    their inference behaviour).

    Args:
        model: a SparseCNN.
        i: index of a conv layer.
        X: (N, C, H, W) data (or anything the model reshapes to its input shape).
        batch_size: images per forward pass.

    Returns:
        (out, H_out, W_out) mean absolute responses.
    """
    layer = _conv_layer(model, i)
    n = max(len(X), 1)
    X = current().shard(X)[0]  # under torchrun: this rank's images, the sums summed across ranks
    total = torch.zeros(layer.out_features, *layer.out_hw, device=layer.weight.device)  # (N_k, P, Q)
    for x in _layer_inputs(model, i, X, batch_size):
        total += layer.conv(x).abs().sum(0)  # (B, N_k, P, Q) -> (N_k, P, Q)
    return current().all_reduce_sum([total])[0] / n


def depthwise_maps(model, i: int, X: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Algorithm 2's depthwise feature maps, averaged: mean over data of ``|C[m, n, p, q]|``
    with ``C[m, n] = convolve(input channel m, masked kernel slice W[n, m])``.

    Returns:
        (in, out, H_out, W_out); summing the signed maps over ``in`` gives ``layer.conv``.
    """
    layer = _conv_layer(model, i)
    w = (layer.weight * layer.mask).detach()  # (N_k, M, kh, kw)
    n_out, n_in = w.shape[:2]
    # grouped conv: group m convolves input channel m with every kernel slice W[:, m]
    w_dw = w.transpose(0, 1).reshape(n_in * n_out, 1, *w.shape[2:])  # (M * N_k, 1, kh, kw), row m * N_k + n
    total = torch.zeros(n_in * n_out, *layer.out_hw, device=w.device)
    for x in _layer_inputs(model, i, X, batch_size):
        c = F.conv2d(x, w_dw, None, layer.stride, layer.padding, groups=n_in)  # (B, M * N_k, P, Q)
        total += c.abs().sum(0)
    return (total / max(len(X), 1)).view(n_in, n_out, *layer.out_hw)


def prune_area(scores: torch.Tensor, area: torch.Tensor, rate: float, min_positions: int = 0) -> torch.Tensor:
    """One iteration of Algorithm 2 on the area mask: switch off the weakest live positions.

    Args:
        scores: (out, H, W) scores (:func:`area_scores`).
        area: (out, H, W) current 0/1 area mask.
        rate: pruning ratio gamma in [0, 1]; ``round(rate * live)`` positions go (at
            least 1 when ``rate > 0`` and a removable position remains).
        min_positions: live positions every kernel keeps at least (its strongest ones).

    Returns:
        The new area mask, a subset of ``area`` (same dtype).
    """
    live = area.bool().flatten()  # (out*H*W,)
    per_kernel = area[0].numel()
    n_live = int(live.sum())
    new = area.clone()
    if rate <= 0 or n_live == 0:
        return new
    n_remove = min(max(1, round(rate * n_live)), n_live)
    cand = top_k(scores, n_live, largest=False, eligible=live)  # live positions, weakest first (the selector's ties)
    if min_positions > 0:
        kernel = cand // per_kernel  # (n_live,)
        live_k = area.flatten(1).bool().sum(1)  # (out,)
        # rank of each candidate among its kernel's candidates, in removal order
        onehot = F.one_hot(kernel, num_classes=area.shape[0])  # (n_live, out)
        rank = (onehot.cumsum(0) * onehot).sum(1) - 1
        cand = cand[rank < (live_k[kernel] - min_positions)]
    new.view(-1)[cand[:n_remove]] = 0
    return new
