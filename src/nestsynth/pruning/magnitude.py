"""Policy 4 on connections: remove the smallest effective weights of a layer."""

from __future__ import annotations

import torch

from ..select import keep_top_masks


def effective_scores(model, i: int) -> torch.Tensor:
    """|W*| of layer i (Eq. 9): the weight magnitude, divided by the BN scale if any."""
    return model.effective_weight(i).abs()


def prune_smallest(scores: torch.Tensor, mask: torch.Tensor, n_remove: int) -> torch.Tensor:
    """Switch off the ``n_remove`` live connections with the smallest scores.

    Dormant connections are never revived.  Ties are broken by position (topk order).
    This is :func:`prune_smallest_global` for one layer.

    Args:
        scores: (out, in) magnitudes.
        mask: (out, in) current 0/1 mask.
        n_remove: how many live connections to remove (clipped to the live count).

    Returns:
        The new mask, a subset of ``mask``.
    """
    return prune_smallest_global([scores], [mask], n_remove)[0]


def prune_smallest_global(scores: list[torch.Tensor], masks: list[torch.Tensor], n_remove: int,
                          floors: list[int] | None = None) -> list[torch.Tensor]:
    """Switch off the ``n_remove`` live connections with the smallest scores over all layers.

    One ranking over the whole network (the "global" scope): a layer whose connections
    matter little loses more of them than one whose connections are large.  Each layer
    keeps at least ``floors[i]`` of its live connections (its largest-scoring ones), so
    no layer is cut off.  Dormant connections are never revived.  Ties: the one selector's
    rule (:func:`nestsynth.select.top_k`: among equal scores the lower position is kept).

    Args:
        scores: one score tensor per layer (its weight shape), e.g. |W*|.
        masks: the matching 0/1 masks.
        n_remove: connections to remove in all (clipped to what the floors allow).
        floors: least live connections kept per layer (default 0).

    Returns:
        One new mask per layer, each a subset of its old mask.

    Example:
        >>> m = prune_smallest_global([torch.tensor([[3., 1.]]), torch.tensor([[2.]])],
        ...                           [torch.ones(1, 2), torch.ones(1, 1)], 2)
        >>> [x.tolist() for x in m]
        [[[1.0, 0.0]], [[0.0]]]
    """
    live = sum(int(m.count_nonzero()) for m in masks)
    return keep_top_masks(scores, masks, live - max(n_remove, 0), floors=floors)


def lamp_scores(scores: torch.Tensor) -> torch.Tensor:
    """LAMP scores of one layer (Lee et al., ICLR 2021): ``s_u^2 / sum_{v: s_v >= s_u} s_v^2``.

    A layer-normalized magnitude: the largest weight of every layer scores 1, so a global
    ranking of LAMP scores cannot starve a layer whose weights are small in absolute terms
    (e.g. the output layer, whose |w| falls behind the first layer's in long training).
    Ties in ``scores`` get the scores of their sorted positions (by index).

    Args:
        scores: a layer's magnitudes, any shape (dormant entries 0).

    Returns:
        Scores of the same shape in [0, 1].

    Example:
        >>> lamp_scores(torch.tensor([1.0, 2.0, 2.0])).tolist()  # 1/9, 4/8, 4/4
        [0.1111111119389534, 0.5, 1.0]
    """
    flat = scores.flatten().to(torch.float64)
    order = torch.argsort(flat, stable=True)
    sq = flat[order] ** 2
    suffix = torch.flip(torch.cumsum(torch.flip(sq, [0]), 0), [0])  # sum of this and every larger square
    out = torch.empty_like(flat)
    out[order] = torch.where(suffix > 0, sq / suffix.clamp_min(1e-300), torch.zeros_like(sq))
    return out.view_as(scores).to(scores.dtype)
