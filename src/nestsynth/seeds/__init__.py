"""Seed architectures: the sparse birth point of a synthesis (paper §3.1, §4.1.1)."""

from .mlp import seed_widths, random_connected_mask, make_seed

__all__ = ["seed_widths", "random_connected_mask", "make_seed"]
