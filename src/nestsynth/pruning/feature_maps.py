"""Policy 4 on feature maps (paper §3.3): remove weak or disconnected feature maps of
conv layers (and neurons of hidden linear layers) and fold what they contributed on
average into the next layer's bias.

Statistics (:func:`feature_map_statistics`) are taken on **what the next layer sees**:
after batch norm, activation and pooling (dropout is the identity in eval mode).  This
is the quantity the bias folding needs (the next layer never sees the un-pooled map),
and for the weak-map criterion it measures a map by its influence downstream.  Per
conv channel we keep the mean |x| and mean x over images *and* positions, plus the full
per-position mean map (C, H', W'); for linear layers the per-neuron means (as
:func:`~nestsynth.pruning.neurons.output_statistics`).

Folding (:func:`remove_feature_maps`).  A removed unit is replaced by its mean output,
which is exact for a constant unit and the least-squares choice otherwise:

* next layer linear after the flatten: ``bias += W[:, cols of map c] @ mean_map[c]``
  (the per-position mean, so it is exact for any map that is constant over the data);
* next layer a conv: the mean map is convolved with the removed input channels' masked
  kernels (same stride and zero padding as the layer), giving the exact mean
  contribution at every output position, (out, P, Q); a bias is one number per kernel,
  so we add the average of that contribution over the kernel's *computed* positions
  (its area mask; all positions when the area is full).  This is exact when the
  contribution does not vary with position, e.g. a constant map with no zero padding;
  with padding the border positions see fewer map values and the fold is the best
  constant fit, not exact;
* next layer after a hidden linear layer: ``bias += W[:, removed] @ mean[removed]``
  (identical to :func:`~nestsynth.pruning.neurons.remove_neurons`).

The fold goes into the bias before the next layer's batch norm, like any other input,
so the running statistics stay consistent.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..distributed import current
from ..sparse.conv import MaskedConv2d
from .neurons import neurons_to_keep


class FeatureMapStats(NamedTuple):
    """Per hidden layer h: ``abs_means[h]``, ``means[h]`` (width_h,) per channel/neuron
    (over images and positions), and ``mean_maps[h]``: (C, H', W') per-position means of
    a conv layer's pooled output, or (width_h,) (= ``means[h]``) for a linear layer."""

    abs_means: list[torch.Tensor]
    means: list[torch.Tensor]
    mean_maps: list[torch.Tensor]


def _as_maps(model, h: int, act: torch.Tensor) -> torch.Tensor:
    """Hidden layer h's output as the next layer sees it, in (B, C, H', W') for conv layers
    (un-flattening the last conv stage) and (B, width) for linear ones."""
    if isinstance(model.layers[h], MaskedConv2d) and act.dim() == 2:
        return act.view(len(act), model.layers[h].out_features, *model.flat_hw)
    return act


@torch.no_grad()
def feature_map_statistics(model, X: torch.Tensor, batch_size: int = 256) -> FeatureMapStats:
    """Mean |x|, mean x and per-position mean of every hidden layer's output over X (eval mode).

    The output is taken after batch norm, activation and pooling (what the next layer sees).

    Args:
        model: a SparseCNN or SparseMLP.
        X: the data.
        batch_size: inputs per forward pass.

    Returns:
        :class:`FeatureMapStats`.
    """
    was_training = model.training
    model.eval()
    n = max(len(X), 1)
    (X,), stand_in = current().shard_or_stand_in(X)  # under torchrun: this rank's images, sums summed below
    abs_sums, sums = None, None
    for start in range(0, len(X), batch_size):
        hidden = model.layer_outputs(X[start:start + batch_size])[:-1]
        hidden = [_as_maps(model, h, a) for h, a in enumerate(hidden)]  # (B, C, H', W') or (B, width)
        if abs_sums is None:
            abs_sums = [torch.zeros_like(a[0]) for a in hidden]
            sums = [torch.zeros_like(a[0]) for a in hidden]
        for h, a in enumerate(hidden):
            abs_sums[h] += a.abs().sum(0)
            sums[h] += a.sum(0)
    model.train(was_training)
    if abs_sums is None:  # no data (on every rank: a rank with an empty part has a stand-in row)
        return FeatureMapStats(*([torch.zeros(l.out_features) for l in model.layers[:-1]] for _ in range(3)))
    current().all_reduce_sum(abs_sums + sums, stand_in)  # a rank without images adds zeros
    abs_maps = [t / n for t in abs_sums]
    mean_maps = [t / n for t in sums]
    per_unit = lambda t: t.flatten(1).mean(1) if t.dim() == 3 else t  # (C, H', W') -> (C,)
    return FeatureMapStats([per_unit(t) for t in abs_maps], [per_unit(t) for t in mean_maps], mean_maps)


def maps_to_keep(out_abs: torch.Tensor, in_mask: torch.Tensor, out_mask: torch.Tensor, threshold: float,
                 area: torch.Tensor | None = None) -> torch.Tensor:
    """Which feature maps of a conv layer survive (``neurons_to_keep`` for conv layers).

    A map is removed when it has no active incoming kernel weight (or, with ``area``, no
    computed output position: its output is then a constant), when no next-layer weight
    reads it, or when its mean |output| is below ``threshold`` x the layer's mean.  The
    strongest map always survives.

    Args:
        out_abs: (C,) mean |output| of each map (:func:`feature_map_statistics`).
        in_mask: (C, C_in, kh, kw) mask of the conv layer.
        out_mask: (out, C, kh, kw) mask of a next conv layer, or (out, C * flat_size) of
            the linear layer after the flatten (channel-major columns).
        threshold: relative threshold, >= 0.
        area: optional (C, H, W) area mask of the conv layer.

    Returns:
        (C,) bool, True = keep.
    """
    n = len(out_abs)
    has_in = in_mask.flatten(1).bool().any(1)  # (C,)
    if area is not None:
        has_in &= area.flatten(1).bool().any(1)
    if out_mask.dim() == 4:
        has_out = out_mask.bool().any(dim=(0, 2, 3))  # (C,)
    else:
        has_out = out_mask.view(out_mask.shape[0], n, -1).bool().any(dim=(0, 2))  # (C,)
    return neurons_to_keep(out_abs, has_in.float().unsqueeze(1), has_out.float().unsqueeze(0), threshold)


def _bias_shift(model, h: int, removed: torch.Tensor, stats: FeatureMapStats) -> torch.Tensor:
    """(out_{h+1},) mean contribution of hidden layer h's removed units to layer h+1."""
    src, nxt = model.layers[h], model.layers[h + 1]
    w = (nxt.weight * nxt.mask).detach()
    mean_map = stats.mean_maps[h].to(w.device)
    if not isinstance(src, MaskedConv2d):
        return w[:, removed] @ mean_map[removed]  # (out,)
    mean_map = mean_map[removed]  # (R, H', W')
    if not isinstance(nxt, MaskedConv2d):  # the linear layer after the flatten: columns c * flat + p
        return w.view(w.shape[0], len(removed), -1)[:, removed].flatten(1) @ mean_map.flatten()
    return mean_input_shift(nxt, removed, mean_map)


def mean_input_shift(layer, cols: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """(out,) bias change of ``layer`` that stands for its inputs ``cols`` held at their means.

    Args:
        layer: the reading layer (MaskedLinear or MaskedConv2d).
        cols: its input indices (columns of a Linear, input channels of a convolution;
            int64 or a bool mask).
        mean: the inputs' means over the data: (len(cols),) for a Linear, (len(cols), H, W)
            per-position maps for a convolution.

    A Linear gets ``W[:, cols] @ mean`` (exact for constant inputs); a convolution the mean
    maps convolved with the masked kernels (its stride, padding and dilation), averaged over
    the output positions each kernel computes (its area mask; all when none is left), which
    is exact when that contribution does not vary with position (see the module docstring).
    """
    w = (layer.weight * layer.mask).detach()
    if not isinstance(layer, MaskedConv2d):
        return w[:, cols] @ mean.to(w)
    contrib = F.conv2d(mean.to(w).unsqueeze(0), w[:, cols], None, layer.stride, layer.padding,
                       getattr(layer, "dilation", 1))[0]  # (out, P, Q)
    area = layer.area  # (out, P, Q)
    live = area.flatten(1).sum(1)  # (out,)
    on_area = (contrib * area).flatten(1).sum(1) / live.clamp(min=1)
    return torch.where(live > 0, on_area, contrib.flatten(1).mean(1))


def remove_feature_maps(model, h: int, keep: torch.Tensor, stats: FeatureMapStats, optimizer=None) -> int:
    """Remove the feature maps (or neurons) of hidden layer h where ``keep`` is False.

    Each removed unit's mean contribution is folded into layer h+1's bias (see the module
    docstring), then the units are cut with :func:`~nestsynth.sparse.keep_units`
    (weights, masks, area, batch norm, next layer's inputs, optimizer state).

    Args:
        model: a SparseCNN (or SparseMLP).
        h: hidden layer index.
        keep: (width_h,) bool.
        stats: :func:`feature_map_statistics` of the current model.
        optimizer: optimizer whose state is cut along.

    Returns:
        How many units were removed.
    """
    from ..sparse import keep_units

    keep = keep.to(torch.bool).to(model.layers[h].weight.device)
    removed = ~keep
    if not removed.any():
        return 0
    with torch.no_grad():
        model.layers[h + 1].bias += _bias_shift(model, h, removed, stats)
    keep_units(model, h, keep.nonzero().flatten(), optimizer)
    return int(removed.sum())
