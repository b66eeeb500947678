"""Pruning schedules: pure functions of an explicit step.

``constant``: each iteration removes ``rate`` of the connections still alive in a
layer (the paper's "top 1%" per iteration).  ``cubic``: the live connections of the whole
network fall on Zhu & Gupta's cubic (2017) from their count when pruning starts to a
target (:func:`cubic_count`), shared among layers in proportion (:func:`split_removal`)
or removed by one global ranking.
"""

from __future__ import annotations


def constant_rate_removal(active: int, rate: float, floor: int = 1) -> int:
    """Connections to remove from a layer with ``active`` live ones; never below ``floor``."""
    return max(0, min(max(1, round(rate * active)), active - floor))


def cubic_sparsity(t: int, final: float, steps: int, initial: float = 0.0) -> float:
    """Target sparsity s(t) at iteration t (0-based) of a cubic schedule."""
    frac = min(max(t, 0), steps) / steps
    return final + (initial - final) * (1.0 - frac) ** 3


def cubic_count(t: int, start: int, target: int, steps: int) -> int:
    """Live connections wanted after pruning step t (0-based) of a cubic size schedule.

    ``w(t) = target + (start - target) * (1 - (t + 1) / steps)^3``, rounded: the size falls
    steeply while the network is large and slowly as it nears ``target`` (Zhu & Gupta's
    cubic, written in weights rather than sparsity), and stays at ``target`` from step
    ``steps - 1`` on.

    Args:
        t: the pruning step (0-based).
        start: live connections when the schedule starts.
        target: live connections at its end.
        steps: pruning steps over which the size falls (>= 1).

    Example:
        >>> cubic_count(0, 1000, 100, 2), cubic_count(1, 1000, 100, 2)
        (212, 100)
    """
    frac = min(max(t + 1, 0), steps) / max(steps, 1)
    return int(round(target + (start - target) * (1.0 - frac) ** 3))


def split_removal(total: int, active: list[int], floors: list[int]) -> list[int]:
    """Share ``total`` removals among layers in proportion to their live connections.

    Per-layer ("layer" scope) form of a whole-network count: every layer loses the same
    share, as in Policy 4, and none goes below its floor.

    Args:
        total: connections to remove from the whole network.
        active: live connections per layer (layers not pruned: give their floor = active).
        floors: the least each layer keeps.

    Returns:
        Removals per layer; their sum is ``min(total, sum of what the floors allow)``
        whenever the proportional shares fit under the floors.

    Example:
        >>> split_removal(30, [100, 200], [1, 1])
        [10, 20]
    """
    live = sum(active)
    if live <= 0 or total <= 0:
        return [0] * len(active)
    return [max(0, min(int(round(total * a / live)), a - f)) for a, f in zip(active, floors)]


def erk_allocation(total: int, shapes: list[tuple[int, ...]]) -> list[int]:
    """Share ``total`` connections among layers by the Erdős–Rényi(-kernel) rule.

    Layer i gets a density proportional to ``sum(shape_i) / prod(shape_i)`` (Mocanu et al.
    2018; Evci et al. 2020, "RigL"), i.e. a count proportional to the sum of its dimensions
    (fan-out + fan-in for a Linear, plus the kernel height and width for a Conv2d): small
    layers -- the output layer above all -- stay denser than under one global ranking.  A
    layer whose share exceeds its possible connections is filled and the rest is shared
    again among the others.

    Args:
        total: connections of the whole network.
        shapes: each layer's weight shape, (out, in) or (out, in, kh, kw).

    Returns:
        Connections per layer, summing to ``min(total, all possible)``.

    Example:
        >>> erk_allocation(300, [(10, 100), (10, 10)])
        [254, 46]
    """
    caps = [_prod(s) for s in shapes]
    alloc = [0] * len(shapes)
    left, open_ = min(total, sum(caps)), set(range(len(shapes)))
    while left > 0 and open_:
        weight = sum(sum(shapes[i]) for i in open_)
        share = {i: left * sum(shapes[i]) / weight for i in open_}
        full = [i for i in open_ if share[i] >= caps[i]]
        if not full:
            ordered = sorted(open_)
            parts = [int(share[i]) for i in ordered]
            rest = left - sum(parts)  # largest remainders get the leftover units
            for j in sorted(range(len(ordered)), key=lambda j: (-(share[ordered[j]] - parts[j]), j))[:rest]:
                parts[j] += 1
            for i, n in zip(ordered, parts):
                alloc[i] = n
            break
        for i in full:
            alloc[i], left = caps[i], left - caps[i]
            open_.discard(i)
    return alloc


def _prod(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
