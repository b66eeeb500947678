"""Deep Compression stages 2-3 (Han, Mao, Dally 2016) for pruned nestsynth models.

Weight sharing by per-layer k-means with retrained centroids (:mod:`.sharing`),
canonical Huffman coding (:mod:`.huffman`), the storage size of every form
(:mod:`.storage`) and the run-directory driver :func:`compress_run`.
"""

from .huffman import HuffmanCode, build_code, entropy_bits, huffman_lengths
from .pipeline import compress_run
from .sharing import CentroidModel, SharedLayer, apply_sharing, finetune_centroids, kmeans_1d, share_weights
from .storage import relative_entries, storage_report

__all__ = ["CentroidModel", "HuffmanCode", "SharedLayer", "apply_sharing", "build_code", "compress_run",
           "entropy_bits", "finetune_centroids", "huffman_lengths", "kmeans_1d", "relative_entries", "share_weights",
           "storage_report"]
