"""Datasets for nestsynth: MNIST, scikit-learn digits and user ``.npz`` files.

Everything is loaded into memory as :class:`Dataset` tensors and grouped in a
:class:`DataBundle` (train / validation / test).  :func:`random_affine` gives the
affine-distorted training images used by the NeST paper.
"""

from nestsynth.data.augment import affine_matrix, apply_affine, random_affine
from nestsynth.data.base import DataBundle, Dataset, split_validation
from nestsynth.data.loader import DATASETS, load_dataset
from nestsynth.data.mnist import read_idx
from nestsynth.data.paths import resolve_data_dir

__all__ = [
    "DATASETS",
    "DataBundle",
    "Dataset",
    "affine_matrix",
    "apply_affine",
    "load_dataset",
    "random_affine",
    "read_idx",
    "resolve_data_dir",
    "split_validation",
]
