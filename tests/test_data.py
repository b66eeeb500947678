"""Tests for nestsynth.data: IDX/MNIST, digits, npz, validation split, affine augmentation."""

from __future__ import annotations

import gzip
import hashlib
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from nestsynth.data import (
    DATASETS,
    DataBundle,
    Dataset,
    affine_matrix,
    apply_affine,
    load_dataset,
    random_affine,
    read_idx,
    resolve_data_dir,
    split_validation,
)
from nestsynth.data import mnist
from nestsynth.errors import NestError

REAL_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


# ----------------------------------------------------------------------------- helpers


def idx_bytes(arr: np.ndarray) -> bytes:
    """Encode a uint8 or int32 array in IDX format."""
    code = {np.dtype("uint8"): 0x08, np.dtype("int32"): 0x0C}[arr.dtype]
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write_file(path: Path, raw: bytes, compress: bool) -> Path:
    path = path.with_name(path.name + ".gz") if compress else path
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


def tiny_mnist(folder: Path, monkeypatch, compress=True, n_train=12, n_test=5):
    """Write four small MNIST-format files and patch the checksum table to accept them."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {
        mnist.TRAIN_IMAGES: rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        mnist.TRAIN_LABELS: (np.arange(n_train) % 10).astype(np.uint8),
        mnist.TEST_IMAGES: rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        mnist.TEST_LABELS: (np.arange(n_test) % 10).astype(np.uint8),
    }
    raws = {}
    for base, arr in arrays.items():
        raws[base] = idx_bytes(arr)
        write_file(folder / base, raws[base], compress)
        monkeypatch.setitem(mnist.MNIST_MD5, base, hashlib.md5(raws[base]).hexdigest())
    return arrays, raws


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No test may reach the network, and the in-process MNIST cache starts empty."""

    def refuse(url, timeout):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(mnist, "_fetch", refuse)
    monkeypatch.setattr(mnist, "_cache", {})
    monkeypatch.delenv("NESTSYNTH_DATA_DIR", raising=False)


# ----------------------------------------------------------------------------- IDX parsing


@pytest.mark.parametrize("compress", [False, True])
def test_idx_round_trip(tmp_path, compress):
    images = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    labels = np.array([7, 0, 9], dtype=np.uint8)
    wide = np.array([[1, -2], [70000, 3]], dtype=np.int32)
    for name, arr in [("img", images), ("lab", labels), ("wide", wide)]:
        path = write_file(tmp_path / name, idx_bytes(arr), compress)
        back = read_idx(path)
        assert back.dtype == arr.dtype and back.shape == arr.shape
        np.testing.assert_array_equal(back, arr)


def test_idx_gzip_detected_without_suffix(tmp_path):
    arr = np.arange(6, dtype=np.uint8).reshape(2, 3)
    path = tmp_path / "plain"
    path.write_bytes(gzip.compress(idx_bytes(arr)))
    np.testing.assert_array_equal(read_idx(path), arr)


@pytest.mark.parametrize(
    "name, content, problem",
    [
        ("magic", b"\x01\x02\x08\x01" + struct.pack(">I", 1) + b"\x00", "magic"),
        ("dtype", b"\x00\x00\x07\x01" + struct.pack(">I", 1) + b"\x00", "dtype"),
        ("short", b"\x00\x00", "magic"),
        ("header", b"\x00\x00\x08\x03\x00\x00", "header"),
        ("trunc", idx_bytes(np.zeros((4, 5), np.uint8))[:-3], "truncated"),
        ("trail", idx_bytes(np.zeros((4, 5), np.uint8)) + b"\x00", "trailing"),
    ],
)
def test_idx_malformed(tmp_path, name, content, problem):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(NestError, match=problem) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_idx_corrupt_and_truncated_gzip(tmp_path):
    good = gzip.compress(idx_bytes(np.zeros((50, 28, 28), np.uint8)))
    corrupt = tmp_path / "corrupt.gz"
    corrupt.write_bytes(b"\x1f\x8b" + b"garbage" * 20)
    cut = tmp_path / "cut.gz"
    cut.write_bytes(good[: len(good) // 2])
    for path in (corrupt, cut):
        with pytest.raises(NestError, match="gzip") as info:
            read_idx(path)
        assert str(path) in str(info.value)


def test_idx_missing_file(tmp_path):
    with pytest.raises(NestError, match="cannot read"):
        read_idx(tmp_path / "nope")


# ----------------------------------------------------------------------------- MNIST loading


@pytest.mark.parametrize("compress", [False, True])
def test_tiny_mnist_loads(tmp_path, monkeypatch, compress):
    arrays, _ = tiny_mnist(tmp_path, monkeypatch, compress)
    bundle = load_dataset("mnist", str(tmp_path), val_fraction=0.25, download=False)
    assert isinstance(bundle, DataBundle)
    assert bundle.name == "mnist" and bundle.input_shape == (1, 28, 28) and bundle.is_image
    assert bundle.num_classes == 10
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (9, 3, 5)
    X, y = bundle.test.X, bundle.test.y
    assert X.dtype == torch.float32 and y.dtype == torch.int64 and X.shape == (5, 1, 28, 28)
    expected = torch.from_numpy(arrays[mnist.TEST_IMAGES].astype(np.float32) / 255.0)
    torch.testing.assert_close(X[:, 0], expected)
    assert y.tolist() == [0, 1, 2, 3, 4]


def test_mnist_parent_folder_and_env_var(tmp_path, monkeypatch):
    tiny_mnist(tmp_path / "mnist", monkeypatch)
    assert len(load_dataset("mnist", str(tmp_path), download=False).test) == 5
    monkeypatch.setenv("NESTSYNTH_DATA_DIR", str(tmp_path))
    assert len(load_dataset("mnist", download=False, val_fraction=0).train) == 12


def test_resolve_data_dir_order(tmp_path, monkeypatch):
    assert resolve_data_dir("mnist", str(tmp_path)) == [tmp_path, tmp_path / "mnist"]
    monkeypatch.setenv("NESTSYNTH_DATA_DIR", str(tmp_path / "env"))
    assert resolve_data_dir("mnist", None) == [tmp_path / "env", tmp_path / "env" / "mnist"]
    assert resolve_data_dir("mnist", str(tmp_path))[0] == tmp_path
    monkeypatch.delenv("NESTSYNTH_DATA_DIR")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_data_dir("mnist", None) == [tmp_path / ".cache" / "nestsynth" / "mnist"]


def test_mnist_missing_folder(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(NestError) as info:
        load_dataset("mnist", str(missing), download=False)
    msg = str(info.value)
    assert str(missing) in msg and str(missing / "mnist") in msg
    assert "train-images-idx3-ubyte" in msg and "t10k-labels-idx1-ubyte" in msg
    assert not missing.exists()


def test_mnist_download_failure_is_clean(tmp_path):
    target = tmp_path / "dl"
    start = time.perf_counter()
    with pytest.raises(NestError, match="downloading failed") as info:
        load_dataset("mnist", str(target), download=True)
    assert time.perf_counter() - start < 5
    assert str(target) in str(info.value)
    assert list(target.iterdir()) == []  # no partial files left behind


def test_mnist_download_fills_only_missing_files(tmp_path, monkeypatch):
    source = tmp_path / "server"
    _, raws = tiny_mnist(source, monkeypatch, compress=True)
    target = tmp_path / "target"
    target.mkdir()
    kept = target / mnist.TRAIN_LABELS  # the user's own (raw) copy must stay untouched
    kept.write_bytes(raws[mnist.TRAIN_LABELS])
    before = kept.stat().st_mtime_ns
    urls = []

    def fake_fetch(url, timeout):
        urls.append(url)
        return (source / url.rsplit("/", 1)[1]).read_bytes()

    monkeypatch.setattr(mnist, "_fetch", fake_fetch)
    bundle = load_dataset("mnist", str(target), download=True, val_fraction=0)
    assert len(bundle.train) == 12 and len(bundle.test) == 5
    assert len(urls) == 3 and not any(mnist.TRAIN_LABELS in u for u in urls)
    assert kept.stat().st_mtime_ns == before
    assert sorted(p.name for p in target.iterdir()) == sorted(
        [mnist.TRAIN_LABELS] + [f"{b}.gz" for b in mnist.FILES if b != mnist.TRAIN_LABELS]
    )


def test_mnist_download_rejects_bad_checksum(tmp_path, monkeypatch):
    monkeypatch.setattr(mnist, "_fetch", lambda url, timeout: gzip.compress(b"not mnist"))
    with pytest.raises(NestError, match="checksum"):
        load_dataset("mnist", str(tmp_path), download=True)
    assert list(tmp_path.iterdir()) == []


def test_mnist_wrong_checksum(tmp_path, monkeypatch):
    tiny_mnist(tmp_path, monkeypatch)
    monkeypatch.setitem(mnist.MNIST_MD5, mnist.TEST_LABELS, "0" * 32)
    with pytest.raises(NestError, match="MD5") as info:
        load_dataset("mnist", str(tmp_path), download=False)
    assert str(tmp_path / f"{mnist.TEST_LABELS}.gz") in str(info.value)


def test_mnist_corrupt_gzip_not_deleted(tmp_path, monkeypatch):
    tiny_mnist(tmp_path, monkeypatch)
    bad = tmp_path / f"{mnist.TRAIN_IMAGES}.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00broken")
    with pytest.raises(NestError, match="gzip") as info:
        load_dataset("mnist", str(tmp_path), download=True)
    assert str(bad) in str(info.value)
    assert bad.read_bytes() == b"\x1f\x8b\x08\x00broken"


def test_mnist_truncated_file(tmp_path, monkeypatch):
    _, raws = tiny_mnist(tmp_path, monkeypatch, compress=False)
    cut = tmp_path / mnist.TRAIN_IMAGES
    cut.write_bytes(raws[mnist.TRAIN_IMAGES][:-100])
    with pytest.raises(NestError, match="truncated") as info:
        load_dataset("mnist", str(tmp_path), download=False)
    assert str(cut) in str(info.value)


def test_mnist_count_mismatch(tmp_path, monkeypatch):
    tiny_mnist(tmp_path, monkeypatch)
    raw = idx_bytes(np.zeros(4, np.uint8))
    write_file(tmp_path / mnist.TEST_LABELS, raw, True)
    monkeypatch.setitem(mnist.MNIST_MD5, mnist.TEST_LABELS, hashlib.md5(raw).hexdigest())
    with pytest.raises(NestError, match="5 images but .* 4 labels"):
        load_dataset("mnist", str(tmp_path), download=False)


@pytest.mark.skipif(not REAL_MNIST.is_dir(), reason="real MNIST files not available")
def test_real_mnist():
    bundle = load_dataset("mnist", str(REAL_MNIST), val_fraction=1 / 12, download=False)
    assert bundle.input_shape == (1, 28, 28) and bundle.num_classes == 10
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (55000, 5000, 10000)
    assert bundle.train.X.shape == (55000, 1, 28, 28) and bundle.test.X.dtype == torch.float32
    for part in (bundle.train, bundle.val, bundle.test):
        assert float(part.X.min()) == 0.0 and float(part.X.max()) == 1.0
    train_counts = bundle.train.y.bincount(minlength=10) + bundle.val.y.bincount(minlength=10)
    assert int(train_counts.sum()) == 60000
    assert train_counts.tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert bundle.test.y.bincount(minlength=10).tolist() == [
        980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009
    ]


# ----------------------------------------------------------------------------- load_dataset / split


def test_unknown_name_lists_valid():
    with pytest.raises(NestError) as info:
        load_dataset("cifar")
    msg = str(info.value)
    assert "'cifar'" in msg and all(name in msg for name in DATASETS)
    with pytest.raises(NestError):
        load_dataset("npz:")


@pytest.mark.parametrize("fraction", [1.0, -0.1, float("nan"), 2, "0.1", True])
def test_bad_val_fraction(fraction):
    with pytest.raises(NestError, match="val_fraction"):
        load_dataset("digits", val_fraction=fraction)


def test_split_validation():
    data = Dataset(torch.arange(100, dtype=torch.float32)[:, None], torch.arange(100) % 3)
    train, val = split_validation(data, 0.2, seed=5)
    assert (len(train), len(val)) == (80, 20)
    ids = torch.cat([train.X[:, 0], val.X[:, 0]]).long()
    assert sorted(ids.tolist()) == list(range(100))
    assert torch.equal(train.y, train.X[:, 0].long() % 3)
    again, val2 = split_validation(data, 0.2, seed=5)
    assert torch.equal(val.X, val2.X)
    assert not torch.equal(val.X, split_validation(data, 0.2, seed=6)[1].X)
    assert split_validation(data, 0.0, seed=0) == (data, None)
    with pytest.raises(NestError):
        split_validation(data, 1.0, seed=0)


def test_dataset_shape_mismatch():
    with pytest.raises(NestError):
        Dataset(torch.zeros(3, 2), torch.zeros(4, dtype=torch.int64))


# ----------------------------------------------------------------------------- digits


def test_digits():
    a = load_dataset("digits", split_seed=0)
    b = load_dataset("digits", split_seed=1, val_fraction=0.2)
    assert a.name == "digits" and a.input_shape == (1, 8, 8) and a.is_image and a.num_classes == 10
    assert len(a.test) == 360 and len(a.train) + len(a.val) == 1797 - 360
    assert (len(a.val), len(b.val)) == (144, 287)
    assert torch.equal(a.test.X, b.test.X) and torch.equal(a.test.y, b.test.y)
    assert not torch.equal(a.val.X, b.val.X[: len(a.val)])
    assert a.train.X.shape[1:] == (1, 8, 8) and a.train.X.dtype == torch.float32
    assert float(a.train.X.min()) == 0.0 and float(a.train.X.max()) == 1.0
    assert a.train.y.dtype == torch.int64 and set(a.test.y.tolist()) == set(range(10))
    # train+val is the same set of samples whatever the split seed
    key = lambda parts: sorted(map(tuple, torch.cat([p.X.flatten(1) for p in parts]).tolist()))
    assert key([a.train, a.val]) == key([b.train, b.val])


# ----------------------------------------------------------------------------- npz


def test_npz_vectors_without_test(tmp_path):
    path = tmp_path / "vec.npz"
    X = np.random.default_rng(0).normal(size=(40, 6))
    y = np.arange(40) % 4
    np.savez(path, X=X, y=y)
    bundle = load_dataset(f"npz:{path}", val_fraction=0.25, split_seed=3)
    assert bundle.name == f"npz:{path}" and bundle.input_shape == (6,) and not bundle.is_image
    assert bundle.num_classes == 4 and bundle.test is None
    assert (len(bundle.train), len(bundle.val)) == (30, 10)
    assert bundle.train.X.dtype == torch.float32 and bundle.train.y.dtype == torch.int64
    rows = torch.cat([bundle.train.X, bundle.val.X]).double()
    assert torch.allclose(rows.sum(0), torch.from_numpy(X).sum(0), atol=1e-4)


def test_npz_images_with_test(tmp_path):
    path = tmp_path / "img.npz"
    rng = np.random.default_rng(1)
    np.savez_compressed(
        path,
        X=rng.random((20, 1, 4, 4)),
        y=np.arange(20, dtype=np.uint8) % 3,
        X_test=rng.random((7, 1, 4, 4)).astype(np.float32),
        y_test=np.full(7, 2.0),
    )
    bundle = load_dataset(f"npz:{path}", val_fraction=0)
    assert bundle.input_shape == (1, 4, 4) and bundle.is_image and bundle.val is None
    assert bundle.num_classes == 3 and len(bundle.train) == 20 and len(bundle.test) == 7
    assert bundle.test.y.tolist() == [2] * 7


def _bad(**arrays):
    base = {"X": np.zeros((5, 3)), "y": np.zeros(5, dtype=np.int64)}
    base.update(arrays)
    return {k: v for k, v in base.items() if v is not None}


@pytest.mark.parametrize(
    "arrays, problem",
    [
        (_bad(X=None), "lacks array X"),
        (_bad(y=None), "lacks array y"),
        (_bad(y=np.zeros(4, dtype=np.int64)), "5 samples in X but 4 labels"),
        (_bad(X_test=np.zeros((2, 3))), "only one of X_test and y_test"),
        (_bad(y_test=np.zeros(2, dtype=np.int64)), "only one of X_test and y_test"),
        (_bad(X_test=np.zeros((2, 3)), y_test=np.zeros(3, dtype=np.int64)), "X_test but 3 labels"),
        (_bad(X_test=np.zeros((2, 4)), y_test=np.zeros(2, dtype=np.int64)), "shape"),
        (_bad(y=np.array([0, 1, 0.5, 2, 1])), "non-integer"),
        (_bad(y=np.array(["a", "b", "c", "d", "e"])), "non-integer"),
        (_bad(y=np.array([0, 1, -1, 2, 1])), "negative"),
        (_bad(y_test=np.array([0, -3]), X_test=np.zeros((2, 3))), "negative"),
        (_bad(X=np.array([[0.0, np.nan, 1]] * 5)), "NaN or infinite"),
        (_bad(X=np.array([[0.0, np.inf, 1]] * 5)), "NaN or infinite"),
        (_bad(X=np.zeros(5)), "shape"),
        (_bad(X=np.array([["a"]] * 5)), "numeric"),
    ],
)
def test_npz_errors(tmp_path, arrays, problem):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(NestError, match=problem) as info:
        load_dataset(f"npz:{path}")
    assert str(path) in str(info.value)


def test_npz_missing_and_invalid_files(tmp_path):
    with pytest.raises(NestError, match="does not exist"):
        load_dataset(f"npz:{tmp_path / 'missing.npz'}")
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is not a zip archive at all")
    single = tmp_path / "single.npy"
    np.save(single, np.zeros(3))
    objects = tmp_path / "objects.npz"
    np.savez(objects, X=np.array([{"a": 1}] * 3, dtype=object), y=np.zeros(3, dtype=np.int64))
    for path in (garbage, single, objects):
        with pytest.raises(NestError, match="not a valid .npz") as info:
            load_dataset(f"npz:{path}")
        assert str(path) in str(info.value)


# ----------------------------------------------------------------------------- affine augmentation


def test_random_affine_identity():
    x = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    out = random_affine(
        x, torch.Generator().manual_seed(1), rotate=0, shift=0, scale=(1, 1), shear=0
    )
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)


def test_affine_matrix_identity_and_batching():
    torch.testing.assert_close(affine_matrix(0, 0, 0, 1, 0), torch.eye(2, 3))
    batch = affine_matrix(torch.tensor([0.0, 30.0]), 0.1, 0, torch.tensor([1.0, 0.9]), 5)
    assert batch.shape == (2, 2, 3)
    torch.testing.assert_close(batch[0], affine_matrix(0, 0.1, 0, 1.0, 5))


@pytest.mark.parametrize("size", [(28, 28), (10, 16)])
def test_affine_one_pixel_shift(size):
    h, w = size
    x = torch.zeros(1, 1, h, w)
    x[0, 0, 4, 6] = 1.0
    right = apply_affine(x, affine_matrix(0, 1.0 / w, 0, 1.0, 0, size=size))
    down = apply_affine(x, affine_matrix(0, 0, 1.0 / h, 1.0, 0, size=size))
    expected_right = torch.zeros_like(x)
    expected_right[0, 0, 4, 7] = 1.0
    expected_down = torch.zeros_like(x)
    expected_down[0, 0, 5, 6] = 1.0
    torch.testing.assert_close(right, expected_right, atol=1e-5, rtol=0)
    torch.testing.assert_close(down, expected_down, atol=1e-5, rtol=0)


@pytest.mark.parametrize("size", [(7, 7), (6, 10)])
def test_affine_rotation_90_is_rot90(size):
    h, w = size
    left = (w - h) // 2  # non-square: only a centred h x h square, zero elsewhere
    square = torch.rand(2, 3, h, h, generator=torch.Generator().manual_seed(2))
    x = torch.nn.functional.pad(square, (left, w - h - left))
    out = apply_affine(x, affine_matrix(90.0, 0, 0, 1.0, 0, size=size))
    expected = torch.nn.functional.pad(torch.rot90(square, k=-1, dims=(2, 3)), (left, w - h - left))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_affine_scale_and_shear_fix_centre():
    x = torch.zeros(1, 1, 9, 9)
    x[0, 0, 4, 4] = 1.0
    for theta in (affine_matrix(0, 0, 0, 1.0, 20.0, size=(9, 9)), affine_matrix(17, 0, 0, 1.0, 0)):
        out = apply_affine(x, theta)
        assert float(out[0, 0, 4, 4]) == pytest.approx(1.0, abs=1e-5)
    big = apply_affine(x, affine_matrix(0, 0, 0, 3.0, 0, size=(9, 9)))[0, 0]
    # bilinear 3x magnification of one pixel: a tent 1, 2/3, 1/3 on each axis, total mass 9
    assert float(big.sum()) == pytest.approx(9.0, abs=1e-4)
    assert float(big[4, 5]) == pytest.approx(2 / 3, abs=1e-5)
    assert float(big[2, 4]) == pytest.approx(1 / 3, abs=1e-5)


def test_random_affine_reproducible_and_random():
    x = torch.rand(32, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    a = random_affine(x, torch.Generator().manual_seed(7))
    b = random_affine(x, torch.Generator().manual_seed(7))
    c = random_affine(x, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert a.shape == x.shape and a.dtype == torch.float32
    same = random_affine(x[:1].expand(8, -1, -1, -1), torch.Generator().manual_seed(7))
    assert not torch.allclose(same[0], same[1])  # each sample gets its own transform
    double = random_affine(x.double(), torch.Generator().manual_seed(7))
    assert double.dtype == torch.float64
    torch.testing.assert_close(double.float(), a, atol=1e-4, rtol=0)
    assert random_affine(x[:0], torch.Generator()).shape == (0, 1, 28, 28)


def test_random_affine_uses_only_generator():
    x = torch.rand(8, 1, 12, 12)
    torch.manual_seed(0)
    a = random_affine(x, torch.Generator().manual_seed(3))
    torch.manual_seed(99)
    b = random_affine(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rotate": -1},
        {"shift": float("nan")},
        {"shear": "x"},
        {"scale": (1.1, 0.9)},
        {"scale": (0, 1)},
        {"scale": 1.0},
    ],
)
def test_random_affine_bad_arguments(kwargs):
    with pytest.raises(NestError):
        random_affine(torch.zeros(2, 1, 4, 4), torch.Generator(), **kwargs)


def test_random_affine_bad_inputs():
    with pytest.raises(NestError, match="floating-point"):
        random_affine(torch.zeros(2, 4, 4), torch.Generator())
    with pytest.raises(NestError, match="floating-point"):
        random_affine(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.Generator())
    with pytest.raises(NestError, match="Generator"):
        random_affine(torch.zeros(2, 1, 4, 4), None)
