"""``load_dataset``: one entry point for every supported dataset."""

from __future__ import annotations

from nestsynth.data.base import DataBundle, Dataset, check_fraction, check_training_size, split_validation
from nestsynth.data.cifar10 import load_cifar10
from nestsynth.data.digits import load_digits
from nestsynth.data.mnist import load_mnist
from nestsynth.data.npz import load_npz
from nestsynth.errors import NestError

DATASETS: tuple[str, ...] = ("mnist", "cifar10", "digits", "npz:PATH")


def _image_shape(data: Dataset) -> tuple[int, ...]:
    """Return the per-sample shape of ``data``."""
    return tuple(int(d) for d in data.X.shape[1:])


def load_dataset(
    name: str,
    data_dir: str | None = None,
    *,
    val_fraction: float = 0.1,
    split_seed: int = 0,
    download: bool = True,
) -> DataBundle:
    """Load a dataset by name and carve a validation part out of its training part.

    Args:
        name: ``"mnist"``, ``"cifar10"``, ``"digits"`` or ``"npz:PATH"`` (case-insensitive names).
        data_dir: MNIST or CIFAR-10 folder (or its parent); None uses ``NESTSYNTH_DATA_DIR``
            or ``~/.cache/nestsynth/<name>``.  Ignored by the other datasets.
        val_fraction: share of the training part used for validation, in ``[0, 1)``.
        split_seed: seed of the validation split (the test part never depends on it).
        download: let MNIST / CIFAR-10 fetch missing files from the public mirrors.

    Returns:
        The :class:`DataBundle`.

    Raises:
        NestError: for an unknown name, a bad ``val_fraction`` or any data problem.
    """
    fraction = check_fraction(val_fraction)
    if not isinstance(name, str):
        raise NestError(
            f"dataset name must be a string, got {name!r}; valid names are {', '.join(DATASETS)}."
        )
    key = name.strip()
    if key.lower() == "mnist":
        train, test = load_mnist(data_dir, download)
        key, shape, classes = "mnist", _image_shape(train), 10
    elif key.lower() == "cifar10":
        train, test = load_cifar10(data_dir, download)
        key, shape, classes = "cifar10", _image_shape(train), 10
    elif key.lower() == "digits":
        train, test = load_digits()
        key, shape, classes = "digits", _image_shape(train), 10
    elif key[:4].lower() == "npz:" and key[4:].strip():
        key = "npz:" + key[4:].strip()
        train, test, shape, classes = load_npz(key[4:])
    else:
        raise NestError(f"unknown dataset {name!r}; valid names are {', '.join(DATASETS)}.")
    train, val = split_validation(train, fraction, split_seed)
    if key.startswith("npz:"):  # the built-in sets are checked by their loaders
        check_training_size(train, classes, key)
    return DataBundle(key, train, val, test, shape, classes)
