"""Tests for nestsynth.data.cifar10: official batch format, restricted unpickling, errors."""

from __future__ import annotations

import builtins
import hashlib
import io
import os
import pickle
import struct
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from nestsynth.data import load_dataset
from nestsynth.data import cifar10
from nestsynth.errors import NestError

N = 20  # images per fake batch
# Independent copies of the documented constants (oracle, not read from the module).
MEAN = (0.49139968, 0.48215841, 0.44653091)
STD = (0.24703223, 0.24348513, 0.26158784)
NAMES = cifar10.TRAIN_BATCHES + (cifar10.TEST_BATCH,)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No network, empty cache, no env data dir, and 20-image batches."""

    def refuse(url, timeout):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(cifar10, "_fetch", refuse)
    monkeypatch.setattr(cifar10, "_cache", {})
    monkeypatch.setattr(cifar10, "IMAGES_PER_BATCH", N)
    monkeypatch.delenv("NESTSYNTH_DATA_DIR", raising=False)


# ----------------------------------------------------------------------------- fake batches


def make_batches(seed: int = 0) -> dict[str, dict[bytes, object]]:
    """Six batch dicts shaped like the official ones (bytes keys, uint8 (N, 3072))."""
    rng = np.random.default_rng(seed)
    out = {}
    for i, name in enumerate(NAMES):
        out[name] = {
            b"batch_label": f"fake {name}".encode(),
            b"labels": [int(v) for v in (np.arange(N) + i) % 10],
            b"data": rng.integers(0, 256, (N, 3072), dtype=np.uint8),
            b"filenames": [f"img_{i}_{j}.png".encode() for j in range(N)],
        }
    return out


def py3_pickle(batch: dict) -> bytes:
    """How Python 3 writes a batch at protocol 2: bytes via _codecs.encode, numpy._core."""
    return pickle.dumps(batch, protocol=2)


# A byte-exact Python 2 cPickle (protocol 2) writer, as the official files were made:
# str as SHORT_BINSTRING/BINSTRING, arrays via numpy.core.multiarray._reconstruct.
def _py2_str(b: bytes) -> bytes:
    return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<I", len(b)) + b


def _py2_int(v: int) -> bytes:
    return b"K" + bytes([v]) if 0 <= v < 256 else b"J" + struct.pack("<i", v)


def _py2_array(arr: np.ndarray) -> bytes:
    assert arr.dtype == np.uint8 and arr.ndim == 2
    shape = _py2_int(arr.shape[0]) + _py2_int(arr.shape[1]) + b"\x86"  # TUPLE2
    dtype = (
        b"cnumpy\ndtype\n" + _py2_str(b"u1") + b"K\x00K\x01\x87R"  # dtype('u1', 0, 1)
        + b"(K\x03" + _py2_str(b"|") + b"NNN" + b"J\xff\xff\xff\xff" * 2 + b"K\x00tb"
    )  # fmt: skip
    return (
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n"
        + b"K\x00\x85" + _py2_str(b"b") + b"\x87R"  # _reconstruct(ndarray, (0,), 'b')
        + b"(K\x01" + shape + dtype + b"\x89" + _py2_str(arr.tobytes()) + b"tb"
    )  # fmt: skip


def _py2_value(v: object) -> bytes:
    if isinstance(v, np.ndarray):
        return _py2_array(v)
    if isinstance(v, bytes):
        return _py2_str(v)
    if isinstance(v, list):
        return b"](" + b"".join(_py2_value(x) for x in v) + b"e"
    return _py2_int(v)


def py2_pickle(batch: dict) -> bytes:
    items = b"".join(_py2_str(k) + _py2_value(v) for k, v in batch.items())
    return b"\x80\x02}(" + items + b"u."


META = {b"num_cases_per_batch": N, b"label_names": [n.encode() for n in cifar10.CLASSES],
        b"num_vis": 3072}  # fmt: skip


def write_batches(folder: Path, batches: dict, dump=py3_pickle, meta: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, batch in batches.items():
        (folder / name).write_bytes(dump(batch))
    if meta:
        (folder / cifar10.META).write_bytes(dump(META))
    return folder


def make_archive(path: Path, batches: dict) -> bytes:
    """Write a .tar.gz laid out like the official archive (py2 pickles); return its bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, batch in list(batches.items()) + [(cifar10.META, META)]:
            raw = py2_pickle(batch)
            info = tarfile.TarInfo(f"{cifar10.SUBDIR}/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def expected(batches: dict, names) -> tuple[np.ndarray, np.ndarray]:
    x = np.concatenate([batches[n][b"data"] for n in names])
    y = np.concatenate([np.array(batches[n][b"labels"]) for n in names])
    return x, y


def denormalize(X: torch.Tensor) -> np.ndarray:
    """Invert the documented normalization back to uint8 rows (N, 3072)."""
    mean = torch.tensor(MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=torch.float64).view(1, 3, 1, 1)
    pixels = ((X.double() * std + mean) * 255).round()
    return pixels.reshape(len(X), -1).numpy().astype(np.uint8)


# ----------------------------------------------------------------------------- loading


def test_load_shapes_labels_and_split(tmp_path):
    batches = make_batches()
    write_batches(tmp_path / cifar10.SUBDIR, batches)
    bundle = load_dataset("cifar10", str(tmp_path), val_fraction=0.25, split_seed=3, download=False)
    assert bundle.name == "cifar10" and bundle.input_shape == (3, 32, 32)
    assert bundle.num_classes == 10 and bundle.is_image
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (75, 25, N)
    for part in (bundle.train, bundle.val, bundle.test):
        assert part.X.dtype == torch.float32 and part.X.shape[1:] == (3, 32, 32)
        assert part.y.dtype == torch.int64
    x_test, y_test = expected(batches, [cifar10.TEST_BATCH])
    assert bundle.test.y.tolist() == y_test.tolist()
    x_train, y_train = expected(batches, cifar10.TRAIN_BATCHES)
    # train + val is exactly the five training batches, in any split
    rows = np.concatenate([denormalize(bundle.train.X), denormalize(bundle.val.X)])
    labels = torch.cat([bundle.train.y, bundle.val.y]).numpy()
    got = sorted(zip(map(bytes, rows), labels.tolist()))
    assert got == sorted(zip(map(bytes, x_train), y_train.tolist()))
    other = load_dataset("cifar10", str(tmp_path), val_fraction=0.25, split_seed=4, download=False)
    assert len(other.val) == 25 and not torch.equal(other.val.y, bundle.val.y)


def test_pixels_round_trip_and_channel_layout(tmp_path):
    batches = make_batches()
    data = batches[cifar10.TRAIN_BATCHES[0]][b"data"]
    # row = 1024 R, 1024 G, 1024 B values, each plane row-major 32x32
    data[0, 0 * 1024 + 5 * 32 + 7] = 200  # R at (5, 7)
    data[0, 1 * 1024 + 5 * 32 + 7] = 17  # G at (5, 7)
    data[0, 2 * 1024 + 31 * 32 + 0] = 255  # B at (31, 0)
    data[0, 2 * 1024 + 0] = 0  # B at (0, 0)
    write_batches(tmp_path, batches)  # files directly in the data dir this time
    bundle = load_dataset("cifar10", str(tmp_path), val_fraction=0, download=False)
    X = bundle.train.X
    by_hand = {
        (0, 5, 7): (200 / 255 - 0.49139968) / 0.24703223,
        (1, 5, 7): (17 / 255 - 0.48215841) / 0.24348513,
        (2, 31, 0): (255 / 255 - 0.44653091) / 0.26158784,
        (2, 0, 0): (0 - 0.44653091) / 0.26158784,
    }
    for (c, r, col), value in by_hand.items():
        assert float(X[0, c, r, col]) == pytest.approx(value, abs=1e-6)
    x_train, y_train = expected(batches, cifar10.TRAIN_BATCHES)
    assert np.array_equal(denormalize(X), x_train)  # every pixel, exactly
    assert bundle.train.y.tolist() == y_train.tolist()
    x_test, _ = expected(batches, [cifar10.TEST_BATCH])
    assert np.array_equal(denormalize(bundle.test.X), x_test)


def test_python2_batches_and_archive(tmp_path, monkeypatch):
    batches = make_batches(seed=1)
    raw = py2_pickle(batches[cifar10.TEST_BATCH])
    with warnings.catch_warnings():  # our writer is trusted: check it with the real unpickler
        warnings.simplefilter("ignore", DeprecationWarning)
        real = pickle.loads(raw, encoding="latin1")
    assert np.array_equal(real["data"], batches[cifar10.TEST_BATCH][b"data"])
    assert real["labels"] == batches[cifar10.TEST_BATCH][b"labels"]

    write_batches(tmp_path / "loose", batches, dump=py2_pickle)
    loose = load_dataset("cifar10", str(tmp_path / "loose"), val_fraction=0, download=False)
    x_train, y_train = expected(batches, cifar10.TRAIN_BATCHES)
    assert np.array_equal(denormalize(loose.train.X), x_train)
    assert loose.train.y.tolist() == y_train.tolist()

    archive = make_archive(tmp_path / "tar" / cifar10.ARCHIVE, batches)
    monkeypatch.setattr(cifar10, "ARCHIVE_MD5", hashlib.md5(archive).hexdigest())
    packed = load_dataset("cifar10", str(tmp_path / "tar"), val_fraction=0, download=False)
    assert torch.equal(packed.train.X, loose.train.X) and torch.equal(packed.test.y, loose.test.y)
    assert [p.name for p in (tmp_path / "tar").iterdir()] == [cifar10.ARCHIVE]  # not extracted

    monkeypatch.setattr(cifar10, "ARCHIVE_MD5", "c58f30108f718f92721af3b95e74349a")
    monkeypatch.setattr(cifar10, "_cache", {})
    with pytest.raises(NestError, match="MD5 .* c58f30108f718f92721af3b95e74349a"):
        load_dataset("cifar10", str(tmp_path / "tar"), download=False)


def test_official_archive_md5_constant():
    assert cifar10.ARCHIVE_MD5 == "c58f30108f718f92721af3b95e74349a"
    assert cifar10.CIFAR10_MEAN == MEAN and cifar10.CIFAR10_STD == STD


# ----------------------------------------------------------------------------- unsafe pickles


class _Payload:
    """Pickles as a call of ``func(arg)``: what a malicious batch file would hold."""

    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


def _payloads(marker: Path) -> dict[str, object]:
    return {
        "os.system": _Payload(os.system, f"touch {marker}"),
        "builtins.eval": _Payload(builtins.eval, f"open({str(marker)!r}, 'w').close()"),
        "builtins.exec": _Payload(builtins.exec, f"open({str(marker)!r}, 'w').close()"),
    }


@pytest.mark.parametrize("kind", ["os.system", "builtins.eval", "builtins.exec"])
@pytest.mark.parametrize("where", ["data", "labels", "meta"])
def test_malicious_pickle_refused(tmp_path, kind, where):
    marker = tmp_path / "pwned"
    batches = make_batches()
    write_batches(tmp_path, batches)
    payload = _payloads(marker)[kind]
    if where == "meta":
        target = tmp_path / cifar10.META
        target.write_bytes(pickle.dumps({b"label_names": payload}, protocol=2))
    else:
        target = tmp_path / cifar10.TRAIN_BATCHES[2]
        batches[cifar10.TRAIN_BATCHES[2]][b"data" if where == "data" else b"labels"] = payload
        target.write_bytes(pickle.dumps(batches[cifar10.TRAIN_BATCHES[2]], protocol=2))
    with pytest.raises(NestError) as info:
        load_dataset("cifar10", str(tmp_path), download=False)
    msg = str(info.value)
    assert str(target) in msg and "refused as unsafe" in msg and msg.count(". ") == 0
    assert not marker.exists()
    # positive control: the same bytes under plain pickle really do create the marker
    if kind != "os.system":
        pickle.loads(target.read_bytes())
        assert marker.exists()


@pytest.mark.parametrize(
    "value",
    [
        np.array([1, "x"], dtype=object),  # object arrays unpickle arbitrary objects
        np.zeros(4, dtype=[("a", "u1"), ("b", "f4")]),  # structured dtype
        np.zeros((N, 3072), dtype="<U1"),  # not a numeric dtype
    ],
    ids=["object", "structured", "unicode"],
)
def test_non_numeric_arrays_refused(tmp_path, value):
    batches = make_batches()
    batches[cifar10.TEST_BATCH][b"data"] = value
    write_batches(tmp_path, batches)
    with pytest.raises(NestError, match="test_batch is not a valid CIFAR-10 pickle"):
        load_dataset("cifar10", str(tmp_path), download=False)


def test_unsafe_global_in_protocol4(tmp_path):
    batches = make_batches()
    write_batches(tmp_path, batches)
    target = tmp_path / cifar10.TEST_BATCH
    target.write_bytes(pickle.dumps({b"data": _Payload(print, "hi")}, protocol=4))
    with pytest.raises(NestError, match=r"builtins\.print, which no CIFAR-10 batch contains"):
        load_dataset("cifar10", str(tmp_path), download=False)


# ----------------------------------------------------------------------------- corrupt files


def _corrupt(batch: dict, how: str) -> bytes:
    if how == "truncated":
        return py3_pickle(batch)[:-100]
    if how == "trailing":
        return py3_pickle(batch) + b"junk"
    if how == "garbage":
        return b"\x00not a pickle at all"
    batch = dict(batch)
    if how == "short_rows":
        batch[b"data"] = batch[b"data"][:, :3071].copy()
    elif how == "too_few_images":
        batch[b"data"], batch[b"labels"] = batch[b"data"][:-1].copy(), batch[b"labels"][:-1]
    elif how == "int16_data":
        batch[b"data"] = batch[b"data"].astype(np.int16)
    elif how == "label_10":
        batch[b"labels"] = [10] + batch[b"labels"][1:]
    elif how == "no_labels":
        del batch[b"labels"]
    elif how == "not_a_dict":
        return py3_pickle([1, 2, 3])
    return py3_pickle(batch)


CORRUPTIONS = [
    ("truncated", "truncated or corrupt"),
    ("trailing", "trailing bytes"),
    ("garbage", "truncated or corrupt"),
    ("short_rows", r"uint8 \(20, 3071\) but a CIFAR-10 batch needs uint8 \(20, 3072\)"),
    ("too_few_images", r"\(19, 3072\)"),
    ("int16_data", "int16"),
    ("label_10", "integers in 0..9"),
    ("no_labels", "lacks the 'data' and 'labels'"),
    ("not_a_dict", "not a dict"),
]


@pytest.mark.parametrize("how, pattern", CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
def test_corrupt_batch(tmp_path, how, pattern):
    batches = make_batches()
    write_batches(tmp_path, batches)
    bad = tmp_path / cifar10.TRAIN_BATCHES[4]
    bad.write_bytes(_corrupt(batches[cifar10.TRAIN_BATCHES[4]], how))
    with pytest.raises(NestError, match=pattern) as info:
        load_dataset("cifar10", str(tmp_path), download=False)
    assert str(bad) in str(info.value)


def test_corrupt_archive(tmp_path, monkeypatch):
    path = tmp_path / cifar10.ARCHIVE
    path.write_bytes(b"\x1f\x8b\x08\x00broken")
    monkeypatch.setattr(cifar10, "ARCHIVE_MD5", hashlib.md5(path.read_bytes()).hexdigest())
    with pytest.raises(NestError, match="not a readable .tar.gz") as info:
        load_dataset("cifar10", str(tmp_path), download=False)
    assert str(path) in str(info.value)


# ----------------------------------------------------------------------------- missing / download


def test_missing_dir_fails_clearly(tmp_path):
    missing = tmp_path / "nowhere"
    for download, reason in ((True, "downloading failed"), (False, "download=False")):
        with pytest.raises(NestError, match=reason) as info:
            load_dataset("cifar10", str(missing), download=download)
        msg = str(info.value)
        assert str(missing) in msg and str(missing / "cifar10") in msg
        assert "data_batch_1" in msg and "test_batch" in msg and cifar10.ARCHIVE in msg
    assert not missing.exists()


def test_partial_batches_are_missing(tmp_path):
    batches = make_batches()
    write_batches(tmp_path, batches)
    (tmp_path / cifar10.TRAIN_BATCHES[3]).unlink()
    with pytest.raises(NestError, match="not found"):
        load_dataset("cifar10", str(tmp_path), download=False)


def test_download_checks_md5_and_writes_archive(tmp_path, monkeypatch):
    server = tmp_path / "server.tar.gz"
    archive = make_archive(server, make_batches())
    urls = []

    def fake_fetch(url, timeout):
        urls.append(url)
        return archive

    monkeypatch.setattr(cifar10, "_fetch", fake_fetch)
    target = tmp_path / "target"
    with pytest.raises(NestError, match="checksum mismatch"):  # official MD5 expected
        load_dataset("cifar10", str(target), download=True)
    assert not (target / cifar10.ARCHIVE).exists()
    monkeypatch.setattr(cifar10, "ARCHIVE_MD5", hashlib.md5(archive).hexdigest())
    bundle = load_dataset("cifar10", str(target), download=True, val_fraction=0)
    assert urls == [cifar10.URL] * 2
    assert (target / cifar10.ARCHIVE).read_bytes() == archive
    assert (len(bundle.train), len(bundle.test)) == (5 * N, N)
