"""MNIST from the four canonical IDX files (raw or gzip), with checksums and download.

:func:`read_idx` parses any IDX file and knows nothing of checksums, so it can be
used on small hand-made files; :func:`load_mnist` finds the four MNIST files,
verifies their MD5 (of the uncompressed bytes, against :data:`MNIST_MD5`) and
returns train and test :class:`~nestsynth.data.base.Dataset` objects.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import pathlib
import struct
import urllib.request
import zlib

import numpy as np
import torch

from nestsynth.data.base import Dataset
from nestsynth.data.paths import resolve_data_dir
from nestsynth.errors import NestError

TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"
FILES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)

#: Published MD5 checksums of the uncompressed files.
MNIST_MD5 = {
    TRAIN_IMAGES: "6bbc9ace898e44ae57da46a324031adb",
    TRAIN_LABELS: "a25bea736e30d166cdddb491f175f624",
    TEST_IMAGES: "2646ac647ad5339dbf082846283269ea",
    TEST_LABELS: "27ae3e4e09519cfbb04c329615203637",
}
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
DOWNLOAD_TIMEOUT = 10.0
NUM_CLASSES = 10

_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_GZIP_MAGIC = b"\x1f\x8b"
_GZIP_ERRORS = (OSError, EOFError, zlib.error)
_NET_ERRORS = (OSError, ValueError, EOFError, zlib.error, http.client.HTTPException)
_cache: dict = {}  # last verified (uint8 images, labels) pairs, keyed by file identity


def read_bytes(path: str | os.PathLike) -> bytes:
    """Return the contents of ``path``, decompressed when it is gzip.

    Args:
        path: an IDX file, raw or gzip (by ``.gz`` suffix or gzip magic bytes).

    Returns:
        The uncompressed bytes.

    Raises:
        NestError: if the file cannot be read or is not valid gzip.
    """
    path = pathlib.Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise NestError(f"cannot read data file {path}: {exc.strerror or exc}.") from None
    if path.suffix != ".gz" and not data.startswith(_GZIP_MAGIC):
        return data
    try:
        return gzip.decompress(data)
    except _GZIP_ERRORS as exc:
        raise NestError(
            f"data file {path} is not a valid gzip file ({exc}); replace it with an intact copy."
        ) from None


def parse_idx(buf: bytes, source: str = "<bytes>") -> np.ndarray:
    """Parse the bytes of an IDX file.

    Layout: two zero bytes, a dtype code (0x08 uint8, 0x09 int8, 0x0B int16,
    0x0C int32, 0x0D float32, 0x0E float64), the number of dimensions, one
    big-endian uint32 per dimension, then the big-endian data.

    Args:
        buf: uncompressed file contents.
        source: file name used in error messages.

    Returns:
        An array of the stored shape in native byte order (read-only for uint8).

    Raises:
        NestError: on a bad magic number, unknown dtype code or a data length that
            does not match the dimensions.
    """
    if len(buf) < 4 or buf[0] != 0 or buf[1] != 0:
        raise NestError(f"data file {source} is not an IDX file (bad magic number).")
    code, ndim = buf[2], buf[3]
    if code not in _IDX_DTYPES:
        raise NestError(f"data file {source} has unknown IDX dtype code 0x{code:02X}.")
    header = 4 + 4 * ndim
    if ndim == 0 or len(buf) < header:
        raise NestError(f"data file {source} is truncated inside its IDX header.")
    dims = struct.unpack(f">{ndim}I", buf[4:header])
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    actual = len(buf) - header
    if actual != expected:
        problem = "is truncated" if actual < expected else "has trailing bytes"
        raise NestError(
            f"data file {source} {problem}: its IDX header {list(dims)} needs "
            f"{expected} data bytes but {actual} follow."
        )
    arr = np.frombuffer(buf, dtype=dtype, offset=header).reshape(dims)
    return arr if dtype.isnative else arr.astype(dtype.newbyteorder("="))


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (raw or gzip) without any checksum check.

    Args:
        path: the file to read.

    Returns:
        The stored array (see :func:`parse_idx`).

    Raises:
        NestError: if the file is unreadable, bad gzip or not a well-formed IDX file.
    """
    return parse_idx(read_bytes(path), str(path))


def verify_md5(buf: bytes, source: str, expected: str | None) -> None:
    """Check the MD5 of ``buf`` against ``expected`` (skipped when None).

    Raises:
        NestError: on a mismatch, naming ``source``.
    """
    if expected is None:
        return
    actual = hashlib.md5(buf, usedforsecurity=False).hexdigest()
    if actual != expected:
        raise NestError(
            f"data file {source} has MD5 {actual} but the published MNIST file has "
            f"{expected}; replace it with an intact copy."
        )


def _file_in(folder: pathlib.Path, base: str) -> pathlib.Path | None:
    """Return ``folder/base`` or ``folder/base.gz`` (raw preferred), or None."""
    for candidate in (folder / base, folder / f"{base}.gz"):
        if candidate.is_file():
            return candidate
    return None


def find_files(folders: list[pathlib.Path]) -> dict[str, pathlib.Path] | None:
    """Return the four MNIST file paths from the first folder holding all four, or None."""
    for folder in folders:
        found = {base: _file_in(folder, base) for base in FILES}
        if all(found.values()):
            return found  # type: ignore[return-value]
    return None


def _fetch(url: str, timeout: float) -> bytes:
    """Download ``url`` (tests replace this to stay offline)."""
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310
        return response.read()


def _write_atomic(target: pathlib.Path, data: bytes) -> None:
    """Write ``data`` to ``target`` via a temporary file and ``os.replace`` (user's umask)."""
    from nestsynth.checkpoint import atomic_write_bytes

    atomic_write_bytes(target, data)


def _download_one(folder: pathlib.Path, base: str) -> str | None:
    """Fetch ``base.gz`` from the mirrors into ``folder``; return None or the last error."""
    error = "no mirror configured"
    for mirror in MIRRORS:
        url = f"{mirror}{base}.gz"
        try:
            data = _fetch(url, DOWNLOAD_TIMEOUT)
            raw = gzip.decompress(data)
        except _NET_ERRORS as exc:
            error = f"{url}: {exc}"
            continue
        expected = MNIST_MD5.get(base)
        if expected is not None and hashlib.md5(raw, usedforsecurity=False).hexdigest() != expected:
            error = f"{url}: checksum mismatch"
            continue
        _write_atomic(folder / f"{base}.gz", data)
        return None
    return error


def download_mnist(folder: pathlib.Path) -> str | None:
    """Download the MNIST files missing from ``folder``; existing files are never touched.

    Args:
        folder: where to put the files (created if needed).

    Returns:
        None on success, else a short description of the first failure.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for base in FILES:
            if _file_in(folder, base) is None:
                error = _download_one(folder, base)
                if error is not None:
                    return error
    except OSError as exc:
        return f"cannot write to {folder}: {exc.strerror or exc}"
    return None


def _locate(data_dir: str | None, download: bool) -> dict[str, pathlib.Path]:
    """Find the four files, downloading them when allowed, or raise NestError."""
    folders = resolve_data_dir("mnist", data_dir)
    found = find_files(folders)
    if found is not None:
        return found
    searched = ", ".join(str(f) for f in folders)
    wanted = ", ".join(FILES)
    reason = "download=False forbids fetching them"
    if download:
        error = download_mnist(folders[0])
        found = find_files(folders[:1])
        if found is not None:
            return found
        reason = f"downloading failed ({error})"
    raise NestError(
        f"MNIST files were not found in {searched} and {reason}; put {wanted} "
        f"(raw or .gz) in one of those folders or pass data_dir."
    )


def _load_checked(path: pathlib.Path, base: str, ndim: int) -> np.ndarray:
    """Read, checksum and parse one MNIST file, checking it is ``ndim``-D uint8."""
    buf = read_bytes(path)
    arr = parse_idx(buf, str(path))
    verify_md5(buf, str(path), MNIST_MD5.get(base))
    if arr.dtype != np.uint8 or arr.ndim != ndim:
        raise NestError(
            f"data file {path} holds a {arr.ndim}-D {arr.dtype} array but MNIST needs "
            f"{ndim}-D uint8."
        )
    return arr


def _pair(
    images_path: pathlib.Path, labels_path: pathlib.Path, images: str, labels: str
) -> tuple[np.ndarray, np.ndarray]:
    """Read and validate one images/labels file pair as uint8 arrays."""
    x = _load_checked(images_path, images, 3)
    y = _load_checked(labels_path, labels, 1)
    if x.shape[0] != y.shape[0]:
        raise NestError(
            f"MNIST file {images_path} holds {x.shape[0]} images but {labels_path} holds "
            f"{y.shape[0]} labels; they must match."
        )
    if y.size and int(y.max()) >= NUM_CLASSES:
        top = int(y.max())
        raise NestError(f"MNIST file {labels_path} holds label {top}; labels must be 0..9.")
    return np.array(x), y  # writable copy, so torch.from_numpy can share it


def _to_dataset(x: np.ndarray, y: np.ndarray) -> Dataset:
    """Convert uint8 images (N, H, W) and labels (N,) to a float32/int64 Dataset."""
    n, h, w = x.shape
    X = torch.from_numpy(x).reshape(n, 1, h, w).to(torch.float32).div_(255.0)
    return Dataset(X, torch.from_numpy(y.astype(np.int64)))


def _cache_key(found: dict[str, pathlib.Path]) -> tuple:
    """Identify the files by path, size, mtime and expected checksum."""
    key = []
    for base, path in found.items():
        st = path.stat()
        key.append((str(path.resolve()), st.st_size, st.st_mtime_ns, MNIST_MD5.get(base)))
    return tuple(key)


def load_mnist(data_dir: str | None = None, download: bool = True) -> tuple[Dataset, Dataset]:
    """Load MNIST train (60000) and test (10000) images and labels.

    Args:
        data_dir: folder with the files or with a ``mnist/`` subfolder; None uses
            ``NESTSYNTH_DATA_DIR`` or ``~/.cache/nestsynth/mnist``.
        download: fetch missing files from the public mirrors.

    Returns:
        ``(train, test)`` with images float32 ``(N, 1, 28, 28)`` in ``[0, 1]`` and
        int64 labels.

    Raises:
        NestError: if the files are missing, corrupt or fail their checksum.
    """
    found = _locate(data_dir, download)
    key = _cache_key(found)
    if key not in _cache:
        train = _pair(found[TRAIN_IMAGES], found[TRAIN_LABELS], TRAIN_IMAGES, TRAIN_LABELS)
        test = _pair(found[TEST_IMAGES], found[TEST_LABELS], TEST_IMAGES, TEST_LABELS)
        _cache.clear()
        _cache[key] = (train, test)
    train, test = _cache[key]
    return _to_dataset(*train), _to_dataset(*test)
