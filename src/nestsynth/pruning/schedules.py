"""Pruning schedules: pure functions of an explicit step.

``constant``: each iteration removes ``rate`` of the connections still alive in a
layer (the paper's "top 1%" per iteration).  ``cubic``: the sparsity relative to the
post-growth layer follows s(t) = s_f + (s_i - s_f)(1 - t/n)^3 (Zhu & Gupta 2017),
with s_i = 0, reaching s_f after n iterations.
"""

from __future__ import annotations


def constant_rate_removal(active: int, rate: float, floor: int = 1) -> int:
    """Connections to remove from a layer with ``active`` live ones; never below ``floor``."""
    return max(0, min(max(1, round(rate * active)), active - floor))


def cubic_sparsity(t: int, final: float, steps: int, initial: float = 0.0) -> float:
    """Target sparsity s(t) at iteration t (0-based) of a cubic schedule."""
    frac = min(max(t, 0), steps) / steps
    return final + (initial - final) * (1.0 - frac) ** 3


def cubic_removal(t: int, active: int, start: int, final: float, steps: int, floor: int = 1) -> int:
    """Connections to remove at iteration t so a layer that had ``start`` weights after
    growth reaches sparsity s(t + 1); never below ``floor``."""
    target = round(start * (1.0 - cubic_sparsity(t + 1, final, steps)))
    return max(0, min(active - max(target, floor), active - floor))
