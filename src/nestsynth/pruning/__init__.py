"""Magnitude-based pruning (paper §3.3, Policy 4): scores first, then selection."""

from .magnitude import lamp_scores, prune_smallest, prune_smallest_global, effective_scores
from .neurons import neurons_to_keep, output_statistics, remove_neurons
from .schedules import constant_rate_removal, cubic_count, cubic_sparsity, erk_allocation, split_removal
from .area import area_scores, depthwise_maps, prune_area
from .feature_maps import FeatureMapStats, feature_map_statistics, maps_to_keep, remove_feature_maps

__all__ = ["lamp_scores", "prune_smallest", "prune_smallest_global", "cubic_count", "split_removal", "erk_allocation", "effective_scores", "neurons_to_keep", "output_statistics", "remove_neurons", "constant_rate_removal",
           "cubic_sparsity", "area_scores", "depthwise_maps", "prune_area", "FeatureMapStats",
           "feature_map_statistics", "maps_to_keep", "remove_feature_maps"]
