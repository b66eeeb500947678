"""scikit-learn's bundled 8x8 handwritten digits, with a fixed test split."""

from __future__ import annotations

import math

import numpy as np
import torch

from nestsynth.data.base import Dataset, permutation
from nestsynth.errors import NestError

TEST_FRACTION = 0.2
TEST_SEED = 0  # fixed: the test split never depends on the user's split seed
NUM_CLASSES = 10


def load_digits() -> tuple[Dataset, Dataset]:
    """Load the 1797 digits as images and split off a fixed 20% test part.

    The test part holds ``ceil(0.2 * 1797) = 360`` samples chosen by a
    permutation seeded with 0 (the convention of scikit-learn's
    ``train_test_split``), so it is identical in every run.

    Returns:
        ``(train, test)`` with images float32 ``(N, 1, 8, 8)`` in ``[0, 1]``
        (pixel values 0..16 divided by 16) and int64 labels.

    Raises:
        NestError: if scikit-learn is not installed.
    """
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError:
        raise NestError(
            "the digits dataset needs scikit-learn; install it with pip install scikit-learn."
        ) from None
    bunch = sk_load_digits()
    X = torch.from_numpy(np.asarray(bunch.data, dtype=np.float32).reshape(-1, 1, 8, 8) / 16.0)
    y = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    data = Dataset(X, y)
    n_test = math.ceil(TEST_FRACTION * len(data))
    perm = permutation(len(data), TEST_SEED)
    test_idx, _ = torch.sort(perm[:n_test])
    train_idx, _ = torch.sort(perm[n_test:])
    return data.subset(train_idx), data.subset(test_idx)
