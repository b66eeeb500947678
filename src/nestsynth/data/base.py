"""In-memory datasets, bundles of train/val/test parts, and the validation split."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from nestsynth.errors import NestError


@dataclass
class Dataset:
    """Labelled samples held in memory.

    Attributes:
        X: float32 inputs of shape ``(N, *input_shape)``; images are ``(N, C, H, W)``
            scaled to ``[0, 1]``.
        y: int64 labels of shape ``(N,)`` with values in ``[0, num_classes)``.
    """

    X: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if self.X.ndim < 1 or self.y.ndim != 1 or self.X.shape[0] != self.y.shape[0]:
            raise NestError(
                f"a dataset needs inputs X of shape (N, ...) and labels y of shape (N,), "
                f"got X {tuple(self.X.shape)} and y {tuple(self.y.shape)}."
            )

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, index: torch.Tensor) -> "Dataset":
        """Return the samples at ``index`` (a 1-D int64 tensor) as a new Dataset.

        Args:
            index: positions of the samples to keep.

        Returns:
            A Dataset holding ``X[index]`` and ``y[index]``.
        """
        return Dataset(self.X.index_select(0, index), self.y.index_select(0, index))


@dataclass
class DataBundle:
    """A named dataset split into train, optional validation and optional test parts.

    Attributes:
        name: dataset name as given to :func:`load_dataset` (e.g. ``"mnist"``).
        train: the training part, after the validation part was carved out.
        val: the validation part, or None when ``val_fraction`` was 0.
        test: the test part, or None when the source has none.
        input_shape: shape of one sample, e.g. ``(1, 28, 28)``.
        num_classes: number of label values.
    """

    name: str
    train: Dataset
    val: Dataset | None
    test: Dataset | None
    input_shape: tuple[int, ...]
    num_classes: int

    @property
    def is_image(self) -> bool:
        """True when the samples are images of shape ``(C, H, W)``."""
        return len(self.input_shape) == 3


def check_fraction(fraction: object) -> float:
    """Validate a validation fraction.

    Args:
        fraction: the value to check.

    Returns:
        The fraction as a float.

    Raises:
        NestError: if it is not a number in ``[0, 1)``.
    """
    ok = isinstance(fraction, numbers.Real) and not isinstance(fraction, bool)
    if not ok or not math.isfinite(float(fraction)) or not 0.0 <= float(fraction) < 1.0:
        raise NestError(f"val_fraction must be a number in [0, 1), got {fraction!r}.")
    return float(fraction)


def permutation(n: int, seed: int) -> torch.Tensor:
    """Return a random permutation of ``range(n)`` determined by ``seed`` only."""
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n, generator=generator)


def split_validation(data: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset | None]:
    """Carve a random validation part out of ``data``.

    ``round(fraction * N)`` samples (at least 1 and at most N - 1 when
    ``fraction > 0`` and N >= 2) go to validation, chosen by a permutation
    seeded with ``seed``; both parts keep the original sample order.

    Args:
        data: the dataset to split.
        fraction: share of samples for validation, in ``[0, 1)``.
        seed: seed of the permutation.

    Returns:
        ``(train, val)``; ``val`` is None when ``fraction == 0`` or ``data`` has
        fewer than two samples.

    Raises:
        NestError: if ``fraction`` is not in ``[0, 1)``.
    """
    fraction = check_fraction(fraction)
    n = len(data)
    if fraction == 0.0 or n < 2:
        return data, None
    n_val = min(max(int(round(fraction * n)), 1), n - 1)
    perm = permutation(n, seed)
    val_idx, _ = torch.sort(perm[:n_val])
    train_idx, _ = torch.sort(perm[n_val:])
    return data.subset(train_idx), data.subset(val_idx)
