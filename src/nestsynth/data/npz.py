"""User data from a NumPy ``.npz`` archive.

The archive must hold ``X`` (samples along the first axis) and ``y`` (integer
labels); ``X_test`` and ``y_test`` are optional but come together.
"""

from __future__ import annotations

import math
import pathlib
import zipfile
import zlib

import numpy as np
import torch

from nestsynth.data.base import Dataset, check_features, check_fits, check_labels, count_classes
from nestsynth.errors import NestError

KEYS = ("X", "y", "X_test", "y_test")
_LOAD_ERRORS = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error)


def _read_arrays(path: pathlib.Path) -> dict[str, np.ndarray]:
    """Return the arrays among :data:`KEYS` stored in the archive at ``path``."""
    if not path.is_file():
        raise NestError(
            f"npz file {path} does not exist; give npz:PATH with an existing .npz file."
        )
    try:
        archive = np.load(path, allow_pickle=False)
        if not hasattr(archive, "files"):
            raise ValueError("a single .npy array, not an archive")
        _check_sizes(path)
        with archive:
            return {key: np.asarray(archive[key]) for key in KEYS if key in archive.files}
    except _LOAD_ERRORS as exc:
        raise NestError(
            f"{path} is not a valid .npz archive of numeric arrays ({exc}); "
            "save one with numpy.savez."
        ) from None


def _check_sizes(path: pathlib.Path) -> None:
    """Refuse arrays that cannot fit in memory, from their .npy headers (nothing is read).

    A compressed archive can hold an array of zeros far larger than the file; it needs
    its own bytes plus a float32 copy.
    """
    need, largest = 0, ("X", 0)
    with zipfile.ZipFile(path) as zf:
        for key in KEYS:
            if f"{key}.npy" not in zf.namelist():
                continue
            with zf.open(f"{key}.npy") as fh:
                version = np.lib.format.read_magic(fh)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                shape, _, dtype = read(fh, max_header_size=100_000) if version != (1, 0) else read(fh)
            count = math.prod(shape)
            need += count * (dtype.itemsize + 4)
            largest = max(largest, (key, count), key=lambda kv: kv[1])
    check_fits(need, f"{path} (array {largest[0]} holds {largest[1]:,} values)",
               "use a smaller data set or split it")


def _features(X: np.ndarray, key: str, path: pathlib.Path) -> torch.Tensor:
    """Validate and convert an input array to float32."""
    if X.dtype.kind not in "biuf":
        raise NestError(f"array {key} in {path} has dtype {X.dtype}; it must be numeric.")
    return check_features(torch.from_numpy(X.astype(np.float32)), f"array {key} in {path}")


def _labels(y: np.ndarray, key: str, path: pathlib.Path) -> torch.Tensor:
    """Validate and convert a label array to int64."""
    what = f"array {key} in {path}"
    if y.dtype.kind not in "biuf":
        raise NestError(f"{what} holds non-integer labels; labels must be integers >= 0.")
    return check_labels(torch.from_numpy(y.astype(np.float64 if y.dtype.kind in "uf" else np.int64)), what)


def _pair(arrays: dict, xk: str, yk: str, path: pathlib.Path) -> Dataset:
    """Build one Dataset from the arrays named ``xk`` and ``yk``."""
    X, y = _features(arrays[xk], xk, path), _labels(arrays[yk], yk, path)
    if X.shape[0] != y.shape[0]:
        raise NestError(
            f"{path} has {X.shape[0]} samples in {xk} but {y.shape[0]} labels in {yk}; "
            "they must match."
        )
    return Dataset(X, y)


def load_npz(path: str) -> tuple[Dataset, Dataset | None, tuple[int, ...], int]:
    """Load a labelled dataset from an ``.npz`` archive.

    Args:
        path: the archive (``~`` is expanded).

    Returns:
        ``(train, test, input_shape, num_classes)``: ``test`` is None without
        ``X_test``/``y_test``; ``input_shape`` is ``X.shape[1:]``; ``num_classes``
        is the largest label over train and test plus one.

    Raises:
        NestError: if the file is missing or not an npz archive, ``X`` or ``y`` is
            missing, only one of ``X_test``/``y_test`` is given, lengths or feature
            shapes disagree, labels are not integers >= 0, or ``X`` is not finite.
    """
    file = pathlib.Path(path).expanduser()
    arrays = _read_arrays(file)
    missing = [key for key in ("X", "y") if key not in arrays]
    if missing:
        raise NestError(f"{file} lacks array {' and '.join(missing)}; it must hold X and y.")
    if ("X_test" in arrays) != ("y_test" in arrays):
        raise NestError(f"{file} holds only one of X_test and y_test; give both or neither.")
    train = _pair(arrays, "X", "y", file)
    test = _pair(arrays, "X_test", "y_test", file) if "X_test" in arrays else None
    shape = tuple(int(d) for d in train.X.shape[1:])
    if test is not None and tuple(test.X.shape[1:]) != shape:
        raise NestError(
            f"{file} has samples of shape {tuple(test.X.shape[1:])} in X_test but {shape} in X; "
            "they must match."
        )
    return train, test, shape, count_classes(train, [test], str(file))
