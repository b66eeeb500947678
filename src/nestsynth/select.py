"""The one top-k selector: every growth, pruning and seed rule that picks "the k best
entries" of a score tensor picks them here, with one tie rule.

Rule: entries rank by score (largest first, or smallest first with ``largest=False``);
among equal scores the lower flat index ranks first; a NaN score ranks last.  So a
selection is a pure function of the scores -- the same on every machine, every device
and every rank of a distributed run -- which ``torch.topk`` alone does not promise for
ties.

This module imports nothing from the package (growth, pruning, seeds and baselines all
use it).
"""

from __future__ import annotations

import torch


def top_k(scores: torch.Tensor, k: int, *, largest: bool = True,
          eligible: torch.Tensor | None = None) -> torch.Tensor:
    """Flat indices of the ``k`` best entries of ``scores``, best first.

    Args:
        scores: any shape (read flattened).
        k: how many to pick (clipped to [0, eligible count]).
        largest: rank the largest scores first (else the smallest).
        eligible: bool tensor of ``scores``' size; only True entries can be picked
            (default: all).

    Returns:
        A 1-d long tensor on ``scores``' device, in rank order (ties: lower index first).

    Example:
        >>> top_k(torch.tensor([1.0, 3.0, 3.0, 2.0]), 2).tolist()
        [1, 2]
        >>> top_k(torch.tensor([1.0, 3.0, 3.0, 2.0]), 2, largest=False, eligible=torch.tensor([0, 1, 1, 1]).bool()).tolist()
        [3, 1]
    """
    key = scores.detach().flatten()
    key = key if largest else -key
    key = torch.where(torch.isnan(key), torch.full_like(key, float("-inf")), key)
    pos = None
    if eligible is not None:
        pos = eligible.flatten().to(key.device).nonzero().squeeze(1)
        key = key[pos]
    n = key.numel()
    k = min(max(int(k), 0), n)
    if k == 0:
        sel = torch.zeros(0, dtype=torch.long, device=key.device)
    elif k == n:
        sel = torch.arange(n, device=key.device)
    else:  # the k-th best value is the threshold; ties at it go by index
        t = torch.topk(key, k).values[-1]
        above = (key > t).nonzero().squeeze(1)
        ties = (key == t).nonzero().squeeze(1)[:k - above.numel()]
        sel = torch.sort(torch.cat([above, ties])).values
    sel = sel[torch.sort(key[sel], descending=True, stable=True).indices]  # rank order, ties by index
    return pos[sel] if pos is not None else sel


def keep_top_masks(scores: list[torch.Tensor], masks: list[torch.Tensor], keep: int, *,
                   largest: bool = True, floors: list[int] | None = None) -> list[torch.Tensor]:
    """Keep the ``keep`` live entries with the best scores over all layers together (one
    global ranking); dormant entries are never revived.

    Args:
        scores: one score tensor per layer (its mask's shape; dtypes may differ).
        masks: the matching 0/1 masks.
        keep: survivors in all (clipped to the live count; at least what ``floors`` keep).
        largest: the largest scores are the best (magnitudes, SNIP); ``False`` keeps the
            smallest (GraSP).
        floors: least live entries each layer keeps (its best ones), so a layer cannot be
            cut off (default 0).

    Returns:
        One new mask per layer (dtype and device of its mask), each a subset of it.

    Example:
        >>> m = keep_top_masks([torch.tensor([[3., 1.]]), torch.tensor([[2.]])],
        ...                    [torch.ones(1, 2), torch.ones(1, 1)], 1, floors=[0, 1])
        >>> [x.tolist() for x in m]
        [[[0.0, 0.0]], [[1.0]]]
    """
    device = masks[0].device if masks else torch.device("cpu")
    live = [m.detach().flatten().to(device) != 0 for m in masks]
    flat = torch.cat([s.detach().flatten().to(device=device, dtype=torch.float64) for s in scores])
    chosen = torch.zeros(flat.numel(), dtype=torch.bool, device=device)
    start = 0
    for i, lv in enumerate(live):
        if floors and floors[i] > 0:
            chosen[start + top_k(flat[start:start + lv.numel()], floors[i], largest=largest, eligible=lv)] = True
        start += lv.numel()
    eligible = torch.cat(live) & ~chosen if live else chosen
    chosen[top_k(flat, keep - int(chosen.sum()), largest=largest, eligible=eligible)] = True
    return [c.view_as(m).to(device=m.device, dtype=m.dtype)
            for c, m in zip(chosen.split([m.numel() for m in masks]), masks)]
