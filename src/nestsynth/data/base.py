"""In-memory datasets, bundles of train/val/test parts, and the validation split."""

from __future__ import annotations

import itertools
import math
import numbers
import os
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


# ----------------------------------------------------------------------------- checks of user data

#: Label ids at or above this are refused before any conversion (an output layer that
#: large never fits in memory, and float labels beyond it are not exact integers).
MAX_LABEL = 2**31


def check_features(X: torch.Tensor, what: str) -> torch.Tensor:
    """Validate inputs ``(N, features...)`` and return them as float32.

    Args:
        X: the inputs.
        what: the data's name in messages, e.g. ``"array X in data.npz"``.

    Raises:
        NestError: non-numeric, fewer than two dimensions, no samples, NaN or infinite values.
    """
    if X.dtype.is_complex or not (X.dtype.is_floating_point or X.dtype in _INTEGER_DTYPES):
        raise NestError(f"{what} has dtype {X.dtype}; it must be numeric.")
    if X.ndim < 2 or X.shape[0] == 0:
        raise NestError(f"{what} has shape {tuple(X.shape)}; it must be (N, features...) with N >= 1.")
    X = X.to(torch.float32)
    if not bool(torch.isfinite(X).all()):
        raise NestError(f"{what} holds NaN or infinite values; all must be finite.")
    return X


_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool)


def check_labels(y: torch.Tensor, what: str) -> torch.Tensor:
    """Validate class labels (1-D, integers >= 0, possibly stored as floats) and return int64.

    Raises:
        NestError: not 1-D, empty, fractional or non-finite, negative, or an id so large
            that no output layer could have it.
    """
    if y.ndim != 1:
        raise NestError(f"{what} has shape {tuple(y.shape)}; labels must be 1-D.")
    if y.numel() == 0:
        raise NestError(f"{what} holds no labels; give at least one sample per class.")
    if y.dtype.is_floating_point:
        if not bool(torch.isfinite(y).all()) or not bool((y == torch.round(y)).all()):
            raise NestError(f"{what} holds non-integer labels; labels must be integers >= 0.")
    elif y.dtype.is_complex or y.dtype not in _INTEGER_DTYPES:
        raise NestError(f"{what} holds non-integer labels; labels must be integers >= 0.")
    if bool((y < 0).any()):
        raise NestError(f"{what} holds negative labels; labels must be integers >= 0.")
    top = y.max().item()
    if top >= MAX_LABEL:
        raise NestError(f"{what} holds the label {top:,.0f}; an output layer that wide cannot be built: "
                        "number the classes 0..K-1.")
    return y.to(torch.int64)


def count_classes(train: Dataset, others: list[Dataset | None], what: str) -> int:
    """The number of classes, after checking that the labels number them 0..K-1.

    Every id from 0 to the largest label of any part must occur in ``train`` (each
    class an output neuron that can be trained), and there must be at least two.

    Raises:
        NestError: a single class, or ids without a training sample (sparse or huge ids).
    """
    top = max(int(part.y.max()) for part in [train, *others] if part is not None and len(part))
    present = torch.unique(train.y)
    classes = top + 1
    if classes < 2 or len(present) < 2:
        raise NestError(f"{what} holds a single class (label {int(present[0])}); classification needs at least "
                        "two classes.")
    if len(present) < classes:
        seen = set(present.tolist())
        gaps = list(itertools.islice((str(i) for i in range(classes) if i not in seen), 3))
        raise NestError(f"the labels of {what} must number the classes 0..K-1, but the largest label {top:,} "
                        f"would need {classes:,} outputs and {classes - len(present):,} of those ids have no "
                        f"training sample (e.g. {', '.join(gaps)}); renumber the {len(present)} classes "
                        f"0..{len(present) - 1}.")
    return classes


def check_training_size(train: Dataset, classes: int, what: str) -> None:
    """Refuse a training part with fewer samples than classes.

    Raises:
        NestError: ``len(train) < classes``.
    """
    if len(train) < classes:
        raise NestError(f"the training part of {what} holds {len(train)} samples after the validation split "
                        f"but there are {classes} classes; give at least one training sample per class (more "
                        "data or a smaller data.val_fraction).")


def available_memory() -> int | None:
    """Bytes of memory this process could still allocate (Linux MemAvailable), or None if unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(nbytes: int, what: str, advice: str, available: int | None = None) -> None:
    """Refuse, before allocating, something that needs more memory than is available.

    Args:
        nbytes: the estimated need.
        what: what needs it, e.g. ``"array X in data.npz (float32)"``.
        advice: how to need less, completing the sentence.
        available: bytes available (default :func:`available_memory`).

    Raises:
        NestError: ``nbytes`` exceeds the available memory.
    """
    available = available_memory() if available is None else available
    if available is not None and nbytes > available:
        raise NestError(f"{what} needs about {_size(nbytes)} of memory but only {_size(available)} is "
                        f"available; {advice}.")


def _size(nbytes: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB", "PB"):
        if nbytes < 1024 or unit == "PB":
            return f"{nbytes:,.0f} {unit}" if unit == "bytes" else f"{nbytes:,.1f} {unit}"
        nbytes /= 1024
    return ""  # unreachable
