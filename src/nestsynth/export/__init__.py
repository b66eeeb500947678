"""Compact inference artifacts of a synthesized model: export, sparse inference, measured speed.

* :mod:`.compact` -- :class:`CompactMLP`: pruned neurons physically removed, batch norm
  folded, each layer dense or CSR (:func:`compact_from_sparse`).
* :mod:`.compact_cnn` -- :class:`CompactCNN`: the same for a SparseCNN (plain conv stages
  with area masks, removed feature maps, then the linear head as in CompactMLP).
* :mod:`.choose` -- per-layer dense-vs-CSR decision by a timing at the batch size.
* :mod:`.formats` -- pytorch (``weights_only``), safetensors + JSON, ONNX (dense).
* :mod:`.bench` -- latency measurement; :mod:`.pipeline` -- export / evaluate / bench-infer.
"""

from .compact import CompactLinear, CompactMLP, compact_from_sparse, max_abs_difference
from .compact_cnn import CompactCNN, CompactConv2d
from .formats import FORMATS, OnnxModel, load_artifact, save_artifact

__all__ = ["CompactLinear", "CompactMLP", "CompactCNN", "CompactConv2d", "compact_from_sparse",
           "max_abs_difference", "FORMATS", "OnnxModel", "load_artifact", "save_artifact"]
