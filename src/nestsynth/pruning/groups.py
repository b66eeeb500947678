"""Policy 4 on units of a :class:`~nestsynth.graph.SparseGraph`: remove dead or weak units of a
coupled group (:mod:`nestsynth.graph.units`) and fold what they fed into the consumers' biases.

A chain removes unit c of hidden layer h when it has no live incoming connection (its
output is a constant), when layer h + 1 has no live connection from it, or when its mean
|output| as layer h + 1 sees it (after batch norm, activation, pooling) is below
``threshold`` x the layer's mean (:func:`~nestsynth.pruning.feature_maps.maps_to_keep`).
For a group -- several members summed into one stream, read by several consumers -- the
rule (:func:`group_units_to_keep`) is the conservative generalization, each criterion
asked where it is defined:

* **unread**: no consumer has a live connection from c (the unit affects nothing; removing
  it is exact); or
* **dead in every member**: no member has a live incoming connection to c (or, for a
  convolution, a computed output position), so every member's contribution is its bias
  and c is the same at every reader whatever the input; or
* **weak at every reader**: at every consumer read, c's mean |input| (over the data and
  positions) is below ``threshold`` x that read's mean over the group's units (a unit
  still strong somewhere in the stream is kept).

The strongest unit (largest summed reader strength) always survives.  A removed unit is
replaced at every reader by its mean input over the data (a per-position map for a
convolution, :func:`~nestsynth.pruning.feature_maps.mean_input_shift`), folded into the
reader's bias before its batch norm -- exact for a constant unit read by Linear layers or
by convolutions without zero padding, the least-squares constant otherwise -- and the
unit is cut from every member, batch norm and reader with
:meth:`~nestsynth.graph.SparseGraph.remove_units` (optimizer state included).
For a one-member, one-consumer group the rule and the fold are the chain's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import distributed
from ..graph.units import current, fed_in, group_reads, member_indices, reads_unit
from .feature_maps import mean_input_shift


@dataclass
class ReadStats:
    """What one consumer read of a group sees, averaged over the data.

    Attributes:
        mean: per input index: (units * expansion,) for a Linear reader, (units, H, W) for
            a convolution.
        abs_mean: (units,) mean |input| per unit over the data and its positions.
    """

    mean: torch.Tensor
    abs_mean: torch.Tensor


def _group_key(group) -> tuple[str, ...]:
    return group.members


@torch.no_grad()
def group_statistics(model, X: torch.Tensor, batch_size: int = 256) -> dict[tuple[str, ...], list[ReadStats]]:
    """Per resizable group (keyed by its members) and per read (``group.reads`` order), the
    reader's input at the group's units over X (eval mode)."""
    groups = [g for g in model.groups() if g.resizable]
    sums: dict = {}
    n = max(len(X), 1)
    (X,), stand_in = distributed.current().shard_or_stand_in(X)  # under torchrun: this rank's part, summed below
    was = model.training
    model.eval()
    try:
        for start in range(0, len(X), batch_size):
            inputs, _ = model.trace(X[start:start + batch_size])
            for g in groups:
                acc = sums.setdefault(_group_key(g), [[None, None] for _ in g.reads])
                for k, (i, s) in enumerate(group_reads(model, g)):
                    x = inputs[i].index_select(1, s.indices().to(inputs[i].device))  # (B, units*exp[, H, W])
                    per_unit = x.reshape(len(x), s.units, -1).abs().mean(2).sum(0)  # (units,)
                    total = x.sum(0)
                    acc[k][0] = total if acc[k][0] is None else acc[k][0] + total
                    acc[k][1] = per_unit if acc[k][1] is None else acc[k][1] + per_unit
    finally:
        model.train(was)
    distributed.current().all_reduce_sum([t for acc in sums.values() for pair in acc for t in pair], stand_in)
    return {key: [ReadStats(m / n, a / n) for m, a in acc] for key, acc in sums.items()}


def group_units_to_keep(model, group, stats: list[ReadStats], threshold: float) -> torch.Tensor:
    """Which units of the group survive (the rule of the module docstring).

    Returns:
        (units,) bool, True = keep.
    """
    members = member_indices(model, group)
    dead = torch.stack([~fed_in(model.layers[j]) for j in members]).all(0)
    unread = ~reads_unit(model, group)
    strength = torch.stack([st.abs_mean.cpu() for st in stats]) if stats else torch.zeros(1, group.units)
    if threshold > 0 and stats:
        weak = torch.stack([(a < threshold * a.mean()) | (a <= 0) for a in strength]).all(0)
    else:
        weak = torch.zeros(group.units, dtype=torch.bool)
    keep = ~(dead | unread | weak)
    if not keep.any():
        keep[int(torch.argmax(strength.sum(0)))] = True
    return keep


@torch.no_grad()
def remove_group_units(model, group, keep: torch.Tensor, stats: list[ReadStats], optimizer=None) -> int:
    """Fold the removed units' mean inputs into every reader's bias, then cut them.

    Args:
        model: a SparseGraph (changed in place).
        group: a resizable group whose units are those ``stats`` were taken on.
        keep: (units,) bool.
        stats: its reads' statistics (:func:`group_statistics`).
        optimizer: its state is cut along.

    Returns:
        Units removed.
    """
    group = current(model, group)
    keep = torch.as_tensor(keep, dtype=torch.bool).cpu()
    removed = (~keep).nonzero().flatten()
    if len(removed) == 0:
        return 0
    for (i, s), st in zip(group_reads(model, group), stats):
        layer = model.layers[i]
        mean = st.mean.view(s.units, *((s.expansion,) if st.mean.dim() == 1 else st.mean.shape[1:]))
        mean = mean.index_select(0, removed.to(mean.device)).flatten(0, 1) if st.mean.dim() == 1 else \
            mean.index_select(0, removed.to(mean.device))
        layer.bias += mean_input_shift(layer, s.indices(removed).to(layer.weight.device), mean)
    model.remove_units(group, keep, optimizer)
    return len(removed)


def prune_group_units(model, X: torch.Tensor, threshold: float, batch_size: int = 256, optimizer=None,
                      skip=()) -> list[int]:
    """Remove dead and weak units from every resizable group (statistics taken once, before
    any removal, as a chain's pruning step does).

    Args:
        skip: member names of groups left alone (e.g. groups of frozen layers).

    Returns:
        Units removed per group, in :meth:`~nestsynth.graph.SparseGraph.groups` order of the
        resizable groups.
    """
    stats = group_statistics(model, X, batch_size)
    removed = []
    for group in [g for g in model.groups() if g.resizable]:
        if any(m in skip for m in group.members):
            removed.append(0)
            continue
        group = current(model, group)
        st = stats[_group_key(group)]
        keep = group_units_to_keep(model, group, st, threshold)
        removed.append(remove_group_units(model, group, keep, st, optimizer))
    return removed
