"""CIFAR-10 from the official "python version" batches, unpickled under an allow-list.

The official files (``data_batch_1`` .. ``data_batch_5``, ``test_batch`` and
``batches.meta``, in ``cifar-10-batches-py/`` inside ``cifar-10-python.tar.gz``)
are Python 2 pickles (protocol 2) of dicts::

    {"batch_label": str, "labels": [int] * 10000,
     "data": uint8 ndarray (10000, 3072), "filenames": [str] * 10000}

Each row of ``data`` is one 32x32 colour image: 1024 red values, then 1024 green,
then 1024 blue, each plane row-major, so ``row.reshape(3, 32, 32)`` is ``(C, H, W)``.

Plain :func:`pickle.load` would run any callable a file names, so
:class:`RestrictedUnpickler` resolves only the globals in :data:`ALLOWED_GLOBALS`,
and even those to inert stand-ins: ``numpy.ndarray`` / ``numpy.dtype`` /
``_reconstruct`` rebuild an array from a numeric dtype and a raw byte string only
(numpy's own ``__setstate__`` never sees the file's data), and ``codecs.encode``
only turns a str into bytes with latin-1.  Anything else is refused with a
:class:`~nestsynth.errors.NestError` naming the file.

Per-batch checksums are not published, so the batches are checked by structure
(shapes, dtype, label range); the official archive is checked against its
published MD5 (:data:`ARCHIVE_MD5`).
"""

from __future__ import annotations

import hashlib
import http.client
import io
import pathlib
import pickle
import struct
import tarfile
import urllib.request
import zlib

import numpy as np
import torch

from nestsynth.data.base import Dataset
from nestsynth.data.mnist import _write_atomic
from nestsynth.data.paths import resolve_data_dir
from nestsynth.errors import NestError

TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
META = "batches.meta"
BATCHES = TRAIN_BATCHES + (TEST_BATCH,)
SUBDIR = "cifar-10-batches-py"
ARCHIVE = "cifar-10-python.tar.gz"
#: Published MD5 of the official archive (https://www.cs.toronto.edu/~kriz/cifar.html).
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
DOWNLOAD_TIMEOUT = 10.0

IMAGES_PER_BATCH = 10000
NUM_CLASSES = 10
PIXELS = 3 * 32 * 32
INPUT_SHAPE = (3, 32, 32)
CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip

#: Per-channel (R, G, B) mean and standard deviation of the 50,000 training images
#: after scaling to [0, 1]: the mean and the population std over every pixel of the
#: channel (= [125.307, 122.950, 113.865] / 255 and [62.993, 62.089, 66.705] / 255).
#: (The often-copied std (0.2023, 0.1994, 0.2010) is the mean of per-image stds,
#: not the channel std.)
CIFAR10_MEAN = (0.49139968, 0.48215841, 0.44653091)
CIFAR10_STD = (0.24703223, 0.24348513, 0.26158784)

_NET_ERRORS = (OSError, ValueError, EOFError, http.client.HTTPException)
_ARCHIVE_ERRORS = (OSError, EOFError, zlib.error, tarfile.TarError)
# What a malformed pickle can raise while loading (the stand-ins raise ValueError/TypeError).
_PICKLE_ERRORS = (
    pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
    KeyError, OverflowError, MemoryError, RecursionError, UnicodeError, struct.error,
)  # fmt: skip
_cache: dict = {}  # last validated ((x, y) train, (x, y) test) uint8/int64 arrays


# ----------------------------------------------------------------------------- stand-ins


class _Marker:
    """The inert, non-callable placeholder returned for ``numpy.ndarray``.

    Stand-ins have no ``__dict__`` (``__slots__ = ()``), so a pickle's BUILD opcode
    cannot attach or overwrite attributes on these process-wide singletons.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return "<numpy.ndarray placeholder>"


_NDARRAY = _Marker()
# Plain numeric dtypes only: no object, structured or sub-array dtypes.
_DTYPE_CODES = frozenset({"b1", "i1", "u1", "i2", "u2", "i4", "u4", "i8", "u8", "f4", "f8"})


class _DtypeStub:
    """Stand-in for ``numpy.dtype(code, align, copy)`` plus its ``__setstate__``."""

    __slots__ = ("dtype",)

    def __init__(self, code: object, align: object = False, copy: object = False) -> None:
        code = code.decode("latin-1") if isinstance(code, bytes) else code
        if not isinstance(code, str) or code not in _DTYPE_CODES:
            raise ValueError(f"dtype {code!r} is not a plain numeric dtype")
        self.dtype = np.dtype(code)

    def __setstate__(self, state: object) -> None:
        # (version, byteorder, subarray, names, fields, elsize, alignment, flags[, metadata])
        if not isinstance(state, tuple) or len(state) < 2:
            raise ValueError("malformed dtype state")
        order = state[1].decode("latin-1") if isinstance(state[1], bytes) else state[1]
        if order not in ("<", ">", "|", "=") or any(v is not None for v in state[2:5]):
            raise ValueError("dtype state is not a plain numeric dtype")
        if order in ("<", ">") and self.dtype.itemsize > 1:
            self.dtype = self.dtype.newbyteorder(order)


class _ArrayStub:
    """Stand-in for an ndarray under construction; ``__setstate__`` builds ``array``."""

    __slots__ = ("array",)

    def __init__(self) -> None:
        self.array: np.ndarray | None = None

    def __setstate__(self, state: object) -> None:
        # version 1: (1, shape, dtype, is_fortran, rawdata); version 0 lacks the 1
        if isinstance(state, tuple) and len(state) == 5 and state[0] == 1:
            state = state[1:]
        if not isinstance(state, tuple) or len(state) != 4:
            raise ValueError("malformed ndarray state")
        shape, dtype, fortran, raw = state
        if not isinstance(dtype, _DtypeStub) or not isinstance(shape, tuple):
            raise ValueError("malformed ndarray state")
        if not all(type(d) is int and d >= 0 for d in shape):
            raise ValueError(f"bad ndarray shape {shape!r}")
        raw = raw.encode("latin-1") if isinstance(raw, str) else raw  # Python 2 str
        if not isinstance(raw, bytes):
            raise ValueError("ndarray data is not a byte string")
        size = dtype.dtype.itemsize
        for d in shape:
            size *= d
        if size != len(raw):  # checked before any allocation
            raise ValueError(f"ndarray of shape {shape} needs {size} bytes, {len(raw)} given")
        order = "F" if fortran else "C"
        self.array = np.frombuffer(raw, dtype=dtype.dtype).reshape(shape, order=order)


class _Reconstruct:
    """Stand-in for ``numpy.core.multiarray._reconstruct(ndarray, (0,), b'b')``."""

    __slots__ = ()

    def __call__(self, subtype: object, shape: object, code: object) -> _ArrayStub:
        if subtype is not _NDARRAY or shape != (0,) or code not in ("b", b"b"):
            raise ValueError("_reconstruct called with arguments numpy never writes")
        return _ArrayStub()


class _Encode:
    """Stand-in for ``codecs.encode(text, 'latin1')``, how protocol 2 stores bytes."""

    __slots__ = ()

    def __call__(self, text: object, encoding: object = "utf-8", errors: object = None) -> bytes:
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
            raise ValueError("codecs.encode is allowed only as str -> latin-1 bytes")
        return text.encode("latin-1")


_RECONSTRUCT = _Reconstruct()
_ENCODE = _Encode()

#: The only globals a CIFAR-10 pickle may name, each mapped to its inert stand-in.
ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,  # numpy 1.x files
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,  # numpy 2.x files
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _DtypeStub,
    ("_codecs", "encode"): _ENCODE,  # how Python 3 writes bytes at protocol 2
    ("codecs", "encode"): _ENCODE,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only :data:`ALLOWED_GLOBALS` (to inert stand-ins).

    Args:
        file: binary file object to read from.
        source: file name used in error messages.
    """

    def __init__(self, file: io.BufferedIOBase, source: str) -> None:
        # latin-1 maps Python 2 str (keys, raw array bytes) one byte to one char, losslessly
        super().__init__(file, encoding="latin1")
        self.source = source

    def find_class(self, module: str, name: str) -> object:
        """Return the stand-in for ``module.name`` or raise NestError."""
        found = ALLOWED_GLOBALS.get((module, name))
        if found is None:
            raise NestError(
                f"data file {self.source} asks to load {module}.{name}, which no CIFAR-10 "
                f"batch contains, so it was refused as unsafe; replace it with an intact copy."
            )
        return found

    def persistent_load(self, pid: object) -> object:
        """Refuse persistent ids, which CIFAR-10 batches never use."""
        raise pickle.UnpicklingError("persistent ids are not allowed")


def _resolve(value: object) -> object:
    """Replace array stand-ins at the top of a batch dict by their arrays."""
    if isinstance(value, _ArrayStub):
        if value.array is None:
            raise ValueError("an ndarray was never given its data")
        return value.array
    if isinstance(value, (_DtypeStub, _Marker, _Reconstruct, _Encode)):
        raise ValueError("a bare numpy dtype or function where data was expected")
    return value


def restricted_loads(buf: bytes, source: str) -> dict[str, object]:
    """Unpickle a CIFAR-10 batch dict from ``buf`` under the allow-list.

    Args:
        buf: the pickle bytes.
        source: file name used in error messages.

    Returns:
        The dict with str keys (bytes keys decoded as latin-1) and ndarray values.

    Raises:
        NestError: if the pickle names a global outside :data:`ALLOWED_GLOBALS`, is
            truncated or corrupt, has trailing bytes or is not a dict.
    """
    stream = io.BytesIO(buf)
    try:
        obj = RestrictedUnpickler(stream, source).load()
        if not isinstance(obj, dict):
            raise ValueError(f"it holds a {type(obj).__name__}, not a dict")
        if stream.tell() != len(buf):
            raise ValueError(f"{len(buf) - stream.tell()} trailing bytes follow the pickle")
        return {
            (k.decode("latin-1") if isinstance(k, bytes) else k): _resolve(v)
            for k, v in obj.items()
        }
    except NestError:
        raise
    except _PICKLE_ERRORS as exc:
        raise NestError(
            f"data file {source} is not a valid CIFAR-10 pickle, it is truncated or corrupt "
            f"({type(exc).__name__}: {exc}); replace it with an intact copy."
        ) from None


# ----------------------------------------------------------------------------- validation


def parse_batch(buf: bytes, source: str) -> tuple[np.ndarray, np.ndarray]:
    """Unpickle and validate one batch.

    Args:
        buf: contents of ``data_batch_N`` or ``test_batch``.
        source: file name used in error messages.

    Returns:
        ``(data, labels)``: uint8 ``(IMAGES_PER_BATCH, 3072)`` and int64 ``(IMAGES_PER_BATCH,)``.

    Raises:
        NestError: on an unsafe or corrupt pickle, missing keys, wrong shapes or dtype,
            or labels outside 0..9.
    """
    batch = restricted_loads(buf, source)
    if "data" not in batch or "labels" not in batch:
        raise NestError(
            f"data file {source} lacks the 'data' and 'labels' entries of a CIFAR-10 batch "
            f"(it has {sorted(map(str, batch))}); replace it with an intact copy."
        )
    data, labels = batch["data"], _labels(batch["labels"], source)
    want = (IMAGES_PER_BATCH, PIXELS)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.shape != want:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise NestError(
            f"data file {source} holds 'data' as {got} but a CIFAR-10 batch needs uint8 "
            f"{want}; replace it with an intact copy."
        )
    if labels.shape != (IMAGES_PER_BATCH,):
        raise NestError(
            f"data file {source} holds {labels.shape[0]} labels but a CIFAR-10 batch has "
            f"{IMAGES_PER_BATCH}; replace it with an intact copy."
        )
    return data, labels


def _labels(value: object, source: str) -> np.ndarray:
    """Validate the ``labels`` entry (a list of ints, or an integer array) as int64."""
    if isinstance(value, np.ndarray):
        ok = value.ndim == 1 and value.dtype.kind in "iu"
        items = value.tolist() if ok else []
    else:
        ok = isinstance(value, list) and all(type(v) is int for v in value)
        items = value if ok else []
    if not ok or any(not 0 <= v < NUM_CLASSES for v in items):
        raise NestError(
            f"data file {source} holds 'labels' that are not a list of integers in 0..9; "
            f"replace it with an intact copy."
        )
    return np.asarray(items, dtype=np.int64).reshape(-1)


def check_meta(buf: bytes, source: str) -> None:
    """Validate ``batches.meta`` (a dict whose ``label_names`` lists 10 names).

    Raises:
        NestError: on an unsafe or corrupt pickle or a wrong number of label names.
    """
    names = restricted_loads(buf, source).get("label_names")
    if not isinstance(names, list) or len(names) != NUM_CLASSES:
        raise NestError(
            f"data file {source} does not list the {NUM_CLASSES} CIFAR-10 label_names; "
            f"replace it with an intact copy."
        )


# ----------------------------------------------------------------------------- finding files


def _batch_folder(folder: pathlib.Path) -> pathlib.Path | None:
    """Return ``folder/cifar-10-batches-py`` or ``folder`` if it holds all six batches."""
    for candidate in (folder / SUBDIR, folder):
        if all((candidate / name).is_file() for name in BATCHES):
            return candidate
    return None


def find_source(folders: list[pathlib.Path]) -> pathlib.Path | None:
    """Return the first folder of extracted batches or archive in ``folders``, or None.

    Extracted batches win over an archive in the same folder.
    """
    for folder in folders:
        found = _batch_folder(folder)
        if found is not None:
            return found
        if (folder / ARCHIVE).is_file():
            return folder / ARCHIVE
    return None


def _fetch(url: str, timeout: float) -> bytes:
    """Download ``url`` (tests replace this to stay offline)."""
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310
        return response.read()


def download_cifar10(folder: pathlib.Path) -> str | None:
    """Download the official archive into ``folder`` and check its MD5.

    Returns:
        None on success, else a short description of the failure (nothing is written).
    """
    try:
        data = _fetch(URL, DOWNLOAD_TIMEOUT)
    except _NET_ERRORS as exc:
        return f"{URL}: {exc}"
    actual = hashlib.md5(data, usedforsecurity=False).hexdigest()
    if ARCHIVE_MD5 is not None and actual != ARCHIVE_MD5:
        return f"{URL}: checksum mismatch"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _write_atomic(folder / ARCHIVE, data)
    except OSError as exc:
        return f"cannot write to {folder}: {exc.strerror or exc}"
    return None


def _locate(data_dir: str | None, download: bool) -> pathlib.Path:
    """Find the batches or the archive, downloading the archive when allowed."""
    folders = resolve_data_dir("cifar10", data_dir)
    found = find_source(folders)
    if found is not None:
        return found
    reason = "download=False forbids fetching them"
    if download:
        error = download_cifar10(folders[0])
        found = find_source(folders[:1])
        if error is None and found is not None:
            return found
        reason = f"downloading failed ({error})"
    searched = ", ".join(str(f) for f in folders)
    raise NestError(
        f"CIFAR-10 files were not found in {searched} and {reason}; put "
        f"{', '.join(BATCHES)} (directly or in {SUBDIR}/), or {ARCHIVE}, in one of those "
        f"folders or pass data_dir."
    )


# ----------------------------------------------------------------------------- reading


def _read(path: pathlib.Path) -> bytes:
    """Return the bytes of ``path`` or raise NestError."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise NestError(f"cannot read data file {path}: {exc.strerror or exc}.") from None


def _read_folder(folder: pathlib.Path) -> dict[str, tuple[bytes, str]]:
    """Return ``{name: (bytes, source)}`` for the batches (and meta, if present)."""
    names = BATCHES + ((META,) if (folder / META).is_file() else ())
    return {name: (_read(folder / name), str(folder / name)) for name in names}


def _read_archive(path: pathlib.Path) -> dict[str, tuple[bytes, str]]:
    """Check the archive's MD5 and return its batches (and meta) without extracting."""
    data = _read(path)
    actual = hashlib.md5(data, usedforsecurity=False).hexdigest()
    if ARCHIVE_MD5 is not None and actual != ARCHIVE_MD5:
        raise NestError(
            f"archive {path} has MD5 {actual} but the official {ARCHIVE} has {ARCHIVE_MD5}; "
            f"replace it with an intact copy."
        )
    out = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            members = {m.name: m for m in tar.getmembers() if m.isfile()}
            for name in BATCHES + (META,):
                member = members.get(f"{SUBDIR}/{name}")
                if member is None and name == META:
                    continue
                if member is None:
                    raise NestError(
                        f"archive {path} lacks {SUBDIR}/{name}; replace it with an intact copy."
                    )
                out[name] = (tar.extractfile(member).read(), f"{path}:{SUBDIR}/{name}")
    except _ARCHIVE_ERRORS as exc:
        raise NestError(
            f"archive {path} is not a readable .tar.gz ({exc}); replace it with an intact copy."
        ) from None
    return out


def _load_arrays(source: pathlib.Path) -> tuple[tuple, tuple]:
    """Read and validate all batches: ``((x_train, y_train), (x_test, y_test))``."""
    files = _read_archive(source) if source.is_file() else _read_folder(source)
    if META in files:
        check_meta(*files[META])
    train = [parse_batch(*files[name]) for name in TRAIN_BATCHES]
    x_test, y_test = parse_batch(*files[TEST_BATCH])
    x_train = np.concatenate([x for x, _ in train])
    y_train = np.concatenate([y for _, y in train])
    return (x_train, y_train), (np.array(x_test), y_test)  # writable, for torch.from_numpy


def to_dataset(x: np.ndarray, y: np.ndarray) -> Dataset:
    """Convert uint8 rows ``(N, 3072)`` and labels to normalized float32 images.

    Each row is 1024 red, 1024 green, 1024 blue values (row-major 32x32), so it
    reshapes to ``(3, 32, 32)`` directly; pixels are scaled to ``[0, 1]`` and then
    normalized per channel with :data:`CIFAR10_MEAN` and :data:`CIFAR10_STD`.

    Returns:
        A Dataset with X float32 ``(N, 3, 32, 32)`` and y int64 ``(N,)``.
    """
    n = x.shape[0]
    X = torch.from_numpy(x).reshape(n, *INPUT_SHAPE).to(torch.float32)
    mean = torch.tensor(CIFAR10_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD, dtype=torch.float32).view(1, 3, 1, 1)
    X.div_(255.0).sub_(mean).div_(std)
    return Dataset(X, torch.from_numpy(np.array(y, dtype=np.int64)))


def _cache_key(source: pathlib.Path) -> tuple:
    """Identify the source files by path, size, mtime and expected checksum."""
    paths = [source] if source.is_file() else [source / n for n in BATCHES + (META,)]
    stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns)
             for p in paths if p.exists()]
    return (tuple(stats), ARCHIVE_MD5, IMAGES_PER_BATCH)


def load_cifar10(data_dir: str | None = None, download: bool = True) -> tuple[Dataset, Dataset]:
    """Load CIFAR-10 train (50000) and test (10000) images and labels.

    Args:
        data_dir: folder holding the batches (directly or in ``cifar-10-batches-py/``)
            or ``cifar-10-python.tar.gz``, or such a folder's parent via a
            ``cifar10/`` subfolder; None uses ``NESTSYNTH_DATA_DIR`` or
            ``~/.cache/nestsynth/cifar10``.
        download: fetch the official archive when no files are found.

    Returns:
        ``(train, test)`` with images float32 ``(N, 3, 32, 32)``, scaled to ``[0, 1]``
        then normalized with :data:`CIFAR10_MEAN` / :data:`CIFAR10_STD`, and int64 labels.

    Raises:
        NestError: if the files are missing, unsafe, corrupt or malformed.
    """
    source = _locate(data_dir, download)
    key = _cache_key(source)
    if key not in _cache:
        arrays = _load_arrays(source)
        _cache.clear()
        _cache[key] = arrays
    train, test = _cache[key]
    return to_dataset(*train), to_dataset(*test)
