"""Policy 4 on connections: remove the smallest effective weights of a layer."""

from __future__ import annotations

import torch


def effective_scores(model, i: int) -> torch.Tensor:
    """|W*| of layer i (Eq. 9): the weight magnitude, divided by the BN scale if any."""
    return model.effective_weight(i).abs()


def prune_smallest(scores: torch.Tensor, mask: torch.Tensor, n_remove: int) -> torch.Tensor:
    """Switch off the ``n_remove`` live connections with the smallest scores.

    Dormant connections are never revived.  Ties are broken by position (topk order).

    Args:
        scores: (out, in) magnitudes.
        mask: (out, in) current 0/1 mask.
        n_remove: how many live connections to remove (clipped to the live count).

    Returns:
        The new mask, a subset of ``mask``.
    """
    live = mask.bool().flatten()
    n_remove = min(max(n_remove, 0), int(live.sum()))
    new = mask.clone()
    if n_remove > 0:
        ranked = scores.flatten().masked_fill(~live, float("inf"))
        new.view(-1)[torch.topk(ranked, n_remove, largest=False).indices] = 0
    return new
