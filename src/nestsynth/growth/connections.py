"""Connection growth, Policy 1: wake the dormant connections with the largest |dL/dw|."""

from __future__ import annotations

import torch

from ..select import top_k


def connections_to_grow(in_f: int, out_f: int, fraction: float) -> int:
    """Connections to add to a layer in one step: ``fraction`` of its possible ones."""
    return int(round(fraction * in_f * out_f))


def grow_connections(scores: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """Activate the ``k`` dormant connections with the largest score.

    Only dormant positions with a positive score are candidates (a zero gradient
    cannot reduce the loss, e.g. from an input pixel that is always 0).  Live
    connections are never removed.

    Args:
        scores: (out, in) growth scores, e.g. |dL/dW|.
        mask: (out, in) current 0/1 mask.
        k: how many to add (fewer when fewer candidates exist).

    Returns:
        The new mask, a superset of ``mask``.
    """
    candidates = scores.masked_fill(mask.bool(), 0.0).flatten()
    k = min(k, int((candidates > 0).sum()))
    new = mask.clone()
    if k > 0:
        new.view(-1)[top_k(candidates, k)] = 1
    return new


def grow_connections_global(scores: list[torch.Tensor], masks: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Activate the ``k`` dormant connections with the largest score across all layers.

    The paper ranks dormant connections by |dL/dw| without a per-layer quota; this is
    that ranking over the whole network (small layers with large gradients, such as
    the output layer, fill first).

    Returns:
        One new mask per layer, each a superset of the old one.
    """
    flat = torch.cat([s.masked_fill(m.bool(), 0.0).flatten() for s, m in zip(scores, masks)])
    k = min(k, int((flat > 0).sum()))
    chosen = torch.zeros_like(flat, dtype=torch.bool)
    if k > 0:
        chosen[top_k(flat, k)] = True
    out, start = [], 0
    for m in masks:
        n = m.numel()
        out.append(torch.maximum(m, chosen[start:start + n].view_as(m).to(m.dtype)))
        start += n
    return out
