"""The CIFAR-10-sized VGG-16 seed runs the whole loop from the CLI on a small data set
written in the official python-pickle batch format (no CIFAR-10 copy is on this machine)."""

from __future__ import annotations

import json

import pytest
from test_cifar10 import N, make_batches, write_batches
from test_cli import _call

from nestsynth.data import cifar10


@pytest.fixture
def small_cifar(tmp_path, monkeypatch):
    monkeypatch.setattr(cifar10, "_fetch", lambda url, timeout: (_ for _ in ()).throw(OSError("offline")))
    monkeypatch.setattr(cifar10, "_cache", {})
    monkeypatch.setattr(cifar10, "IMAGES_PER_BATCH", N)
    monkeypatch.delenv("NESTSYNTH_DATA_DIR", raising=False)
    return write_batches(tmp_path / "cifar", make_batches(seed=4))


def test_vgg16_cifar_seed_grows_and_prunes_end_to_end(small_cifar, tmp_path):
    run = tmp_path / "run"
    sets = ["data.dataset=cifar10", "data.val_fraction=0.2", "data.augment=false", "dense.train=false",
            "train.batch_size=20", "train.min_steps_per_epoch=0", "growth.target=0.0", "growth.max_iterations=2", "growth.epochs_per_iteration=1",
            "growth.score_samples=40", "growth.map_candidates=2", "growth.feature_maps_per_step=1",
            "growth.neurons_per_step=4", "pruning.max_iterations=1", "pruning.retrain_epochs=1",
            "pruning.recover_epochs=0", "pruning.tolerance=1.0", "pruning.rate=0.1", "pruning.area_rate=0.05"]
    rc, out, err = _call(["synthesize", "--model", "vgg-16-cifar", "--data-dir", small_cifar, "--out", run,
                          "--device", "cpu", "--quiet"] + [f"--set={s}" for s in sets])
    assert rc == 0, err
    report = json.loads((run / "report.json").read_text())
    assert report["model"] == "vgg-16-cifar" and report["dataset"] == "cifar10"
    assert report["input_shape"] == [3, 32, 32]
    seed = [48, 48, 96, 96, 192, 192, 192, 384, 384, 384, 384, 384, 384, 400, 200]  # r = 0.75, fc 400-200
    assert report["widths"]["seed"] == [3] + seed + [10]
    # one growth step: one feature map per conv layer, 4 neurons per hidden fc layer
    assert report["widths"]["post_growth"] == [3] + [w + 1 for w in seed[:13]] + [404, 204, 10]
    assert report["weights"]["post_growth"] > report["weights"]["seed"] > report["weights"]["final"]
    convs = [layer for layer in report["layers"] if layer.get("conv_pct") is not None]
    assert len(convs) == 13 and all(layer["conv_pct"] < 100 for layer in convs)  # one area-pruning step
    assert 0.0 <= report["test_error"] <= 1.0
