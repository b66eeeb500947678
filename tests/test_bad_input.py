"""Every bad input, by category: one sentence, exit status 2, no traceback, nothing on disk lost
(the command line); the package's NestError (the Python API)."""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import TINY, call, one_error_line, snapshot

import nestsynth
from nestsynth import checkpoint as ckpt
from nestsynth.api import bundle_from
from nestsynth.config import Config
from nestsynth.errors import NestError


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished digits run (64-16-10) and its exported safetensors model."""
    run = tmp_path_factory.mktemp("bad") / "run"
    rc, _, err = call(["synthesize", *TINY, "--quiet", "--out", run])
    assert rc == 0, err
    rc, _, err = call(["export", run, "--format", "safetensors", "--sparse", "dense"])
    assert rc == 0, err
    return run


def _refused(argv, *needles) -> str:
    rc, out, err = call(argv)
    assert rc == 2, (out, err)
    line = one_error_line(err)
    for needle in needles:
        assert needle in line, line
    return line


def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


# ----------------------------------------------------------------------------- output paths


def test_out_paths_that_cannot_be_written(tmp_path, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    # a run directory under a file: refused before the data is even loaded
    _refused(["synthesize", *TINY, "--out", afile / "run"], "is a file, not a directory")
    _refused(["synthesize", *TINY, "--out", afile], "is a file")
    # export --out under a file or in a folder that cannot be written: refused before any work
    _refused(["export", tmp_path / "no-such-run", "--out", afile / "compact.pt"], "is a file, not a directory")
    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != locked and real(p, mode, **kw))
    _refused(["synthesize", *TINY, "--out", locked / "run"], "may not write in", str(locked))
    _refused(["export", tmp_path / "no-such-run", "--out", locked / "sub" / "compact.pt"], "may not write in")
    _refused(["bench-infer", tmp_path / "a.pt", "--out", locked / "inference.json"], "may not write in")
    assert afile.read_text() == "keep me" and list(locked.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "locked"]


def test_out_that_cannot_be_created_even_by_root(tmp_path):
    # /proc takes no new directories whoever asks; the data is loaded, then the run refused
    _refused(["synthesize", *TINY, "--out", "/proc/nestsynth-test-run"], "/proc/nestsynth-test-run")


# ----------------------------------------------------------------------------- labels and classes


X60 = np.random.default_rng(0).random((60, 5)).astype(np.float32)


@pytest.mark.parametrize("y, needle", [
    (np.r_[np.zeros(30), np.ones(29), [-1]], "negative labels"),
    (np.r_[np.zeros(30), np.ones(29), [0.5]], "non-integer labels"),
    (np.r_[np.zeros(30), np.ones(29), [np.nan]], "non-integer labels"),
    (np.r_[np.zeros(59, dtype=np.int64), [10**12]], "1,000,000,000,000"),    # the output layer would need TBs
    (np.r_[np.zeros(59, dtype=np.int64), [10**9]], "1,000,000,001 outputs"),
    (np.tile([0, 1000, 2000], 20), "2,001 outputs"),                          # sparse label ids
    (np.zeros(60, dtype=np.int64), "single class"),
])
def test_labels_and_classes_refused(tmp_path, y, needle):
    data = _npz(tmp_path / "d.npz", X=X60, y=y)
    _refused(["synthesize", *TINY, "--dataset", f"npz:{data}", "--model", "mlp:5-8-3", "--out", tmp_path / "r"],
             needle, str(data))
    assert not (tmp_path / "r").exists()


def test_fewer_training_samples_than_classes(tmp_path):
    data = _npz(tmp_path / "d.npz", X=X60[:3], y=np.array([0, 1, 2]))
    _refused(["synthesize", *TINY, "--dataset", f"npz:{data}", "--model", "mlp:5-8-3", "--out", tmp_path / "r"],
             "holds 2 samples after the validation split but there are 3 classes")
    assert not (tmp_path / "r").exists()


def test_evaluation_set_with_more_classes_than_outputs(tiny_run, tmp_path):
    artifact = tiny_run / "export" / "compact.safetensors"
    data = _npz(tmp_path / "d.npz", X=np.zeros((48, 64)), y=np.arange(48) % 12,
                X_test=np.zeros((20, 64)), y_test=np.arange(20) % 4 + 8)   # labels 8..11, the model has 10
    before = snapshot(tiny_run)
    _refused(["evaluate", artifact, "--dataset", f"npz:{data}"], "labels up to 11", "10 outputs")
    _refused(["export", tiny_run, "--dataset", f"npz:{data}", "--out", tmp_path / "c.pt"], "10 outputs")
    assert snapshot(tiny_run) == before and not (tmp_path / "c.pt").exists()


# ----------------------------------------------------------------------------- sizes


def test_widths_that_cannot_fit_in_memory(tmp_path):
    line = _refused(["synthesize", *TINY, "--model", "mlp:64-100000000000-10", "--out", tmp_path / "r"],
                    "needs about", "of memory but only", "smaller widths")
    assert "7,400,000,000,000 weights" in line  # 64 x 1e11 + 1e11 x 10
    assert not (tmp_path / "r").exists()


def test_npz_arrays_that_cannot_fit_in_memory_are_refused_from_their_headers(tmp_path):
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False,
                                                  "shape": (10**7, 10**6)})  # 80 TB, stored in 1 KB
    labels = io.BytesIO()
    np.save(labels, np.arange(10) % 2)
    path = tmp_path / "huge.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("X.npy", header.getvalue() + bytes(1000))
        zf.writestr("y.npy", labels.getvalue())
    _refused(["synthesize", *TINY, "--dataset", f"npz:{path}", "--out", tmp_path / "r"],
             "10,000,000,000,000 values", "TB of memory")


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize("setting, needle", [
    ("growth.alpha=inf", "'growth.alpha' must be a finite number, got inf"),
    ("pruning.tolerance=inf", "'pruning.tolerance' must be a finite number, got inf"),
    ("train.weight_decay=inf", "'train.weight_decay' must be a finite number, got inf"),
    ("train.lr=nan", "'train.lr' must be a finite number, got nan"),
    ("growth.alpha=1e400", "must be a finite number"),
    ("seed=18446744073709551616", "'seed' must fit in 64 bits"),
    ("data.split_seed=-9223372036854775809", "must fit in 64 bits"),
])
def test_values_out_of_range(tmp_path, setting, needle):
    _refused(["synthesize", *TINY, "--set", setting, "--out", tmp_path / "r"], needle)
    assert not (tmp_path / "r").exists()


def test_nan_inputs_have_their_own_sentence(tmp_path):
    data = _npz(tmp_path / "d.npz", X=np.where(X60 > 0.9, np.nan, X60), y=np.arange(60) % 3)
    _refused(["synthesize", *TINY, "--dataset", f"npz:{data}", "--model", "mlp:5-8-3", "--out", tmp_path / "r"],
             "holds NaN or infinite values")


# ----------------------------------------------------------------------------- damaged files


def _copy(run: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(run, dest)
    return dest


def test_report_of_a_damaged_run_prints_nothing_but_one_line(tiny_run, tmp_path):
    garbage = _copy(tiny_run, tmp_path / "garbage")
    lines = ckpt.metrics_path(garbage).read_text().splitlines()
    lines[1] = "{not json"
    ckpt.metrics_path(garbage).write_text("\n".join(lines) + "\n")
    rc, out, err = call(["report", garbage])
    assert (rc, out) == (2, "")
    assert "line 2 of" in one_error_line(err) and "metrics.jsonl" in err

    lacking = _copy(tiny_run, tmp_path / "lacking")
    report = json.loads(ckpt.report_path(lacking).read_text())
    del report["flops"]
    ckpt.report_path(lacking).write_text(json.dumps(report))
    before = snapshot(lacking)
    rc, out, err = call(["report", lacking])
    assert (rc, out) == (2, "")
    assert "lacks the field 'flops'" in one_error_line(err)
    assert snapshot(lacking) == before


def test_bit_flipped_checkpoint_and_model_are_refused(tiny_run, tmp_path):
    run = _copy(tiny_run, tmp_path / "run")
    for path in (ckpt.checkpoint_path(run), ckpt.model_path(run)):
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x10
        path.write_bytes(bytes(data))
    before = snapshot(run)
    _refused(["synthesize", "--out", run, "--resume", "--quiet"], "last.pt", "damaged")
    _refused(["export", run, "--out", tmp_path / "c.pt"], "model.pt", "damaged")
    assert snapshot(run) == before and not (tmp_path / "c.pt").exists()


def test_shortened_safetensors_sidecar_is_refused(tiny_run, tmp_path):
    import shutil

    artifact = tmp_path / "compact.safetensors"
    shutil.copy(tiny_run / "export" / "compact.safetensors", artifact)
    side = json.loads((tiny_run / "export" / "compact.json").read_text())
    assert len(side["arch"]["layers"]) >= 2
    side["arch"]["layers"] = side["arch"]["layers"][:1]
    (tmp_path / "compact.json").write_text(json.dumps(side))
    _refused(["evaluate", artifact], "compact.json", "does not describe")
    # without the sidecar the file's own copy of the architecture is used
    (tmp_path / "compact.json").unlink()
    rc, out, err = call(["evaluate", artifact])
    assert rc == 0, err


# ----------------------------------------------------------------------------- the Python API


X30 = torch.rand(30, 4)


@pytest.mark.parametrize("data, needle", [
    ((X30, torch.tensor([-1] + [0, 1, 2] * 9 + [1, 2])), "negative labels"),
    ((X30, torch.tensor([0.5] + [0.0, 1.0, 2.0] * 9 + [1.0, 2.0])), "non-integer labels"),
    ((torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)), "holds no labels"),
    ((torch.where(X30 > 0.9, float("nan"), X30), torch.arange(30) % 3), "NaN or infinite"),
    ((X30, torch.tensor([0, 1000, 2000] * 10)), "2,001 outputs"),
    ((X30, torch.zeros(30, dtype=torch.long)), "single class"),
    ((X30[:3], torch.tensor([0, 1, 2])), "2 samples after the validation split"),
    ((X30, torch.arange(29)), "30 inputs but 29 labels"),
])
def test_api_checks_data_as_strictly_as_the_npz_loader(data, needle):
    with pytest.raises(NestError, match=needle):
        bundle_from(data, None, None, Config())
    with pytest.raises(NestError, match=needle):
        nestsynth.synthesize("mlp:4-8-3", data, config={"device": "cpu"})


def test_api_checks_validation_and_test_data_too():
    good = (X30, torch.arange(30) % 3)
    with pytest.raises(NestError, match="the validation data"):
        bundle_from(good, (X30[:5], torch.tensor([0, 1, -2, 0, 1])), None, Config())
    with pytest.raises(NestError, match="the test data"):
        bundle_from(good, None, (torch.full((5, 4), float("inf")), torch.zeros(5, dtype=torch.long)), Config())
    with pytest.raises(NestError, match="no training sample"):  # a test-only class would be an untrained output
        bundle_from(good, None, (X30[:5], torch.tensor([0, 1, 2, 3, 3])), Config())
    bundle = bundle_from(torch.utils.data.TensorDataset(*good), None, None, Config())
    assert bundle.num_classes == 3 and len(bundle.train) + len(bundle.val) == 30
