"""Convolutional NeST end to end: growth of connections and feature maps, pruning with
partial-area convolution, exact resume, reports and the command line."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from nestsynth import checkpoint as ckpt
from nestsynth import config as C
from nestsynth.api import resolve_reference
from nestsynth.baselines.runner import run_method
from nestsynth.metrics import conv_flops
from nestsynth.sparse import SparseCNN
from test_cli import ROOT, _call
from test_synthesis import _same_model, _strip_times

CNN_QUICK = ROOT / "configs" / "digits-cnn-quick.toml"


def small_cnn_cfg(**sections):
    raw = {"model": "tiny-cnn", "seed": 0, "device": "cpu",
           "data": {"dataset": "digits", "val_fraction": 0.2},
           "seed_net": {"ratio": 0.5, "density": 0.3}, "train": {"lr": 0.01, "batch_size": 64},
           "dense": {"epochs": 2},
           "growth": {"target": "0.0", "max_iterations": 3, "epochs_per_iteration": 2, "neurons_per_step": 2,
                      "feature_maps_per_step": 1, "map_candidates": 3, "score_samples": 400},
           "pruning": {"rate": 0.1, "retrain_epochs": 1, "max_iterations": 3, "tolerance": 0.5,
                       "area_rate": 0.05}}
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    return C.from_dict(raw)


def _run(cfg, digits, out=None, **kw):
    return run_method(cfg, digits, resolve_reference(cfg.model, digits), out, **kw)


@pytest.fixture(scope="module")
def cnn_run(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("cnn") / "run"
    model, report = _run(small_cnn_cfg(), digits, out)
    return out, model, report


def test_growth_adds_feature_maps_connections_and_neurons(cnn_run):
    out, model, report = cnn_run
    rows = ckpt.read_jsonl(out / "metrics.jsonl")
    growth = [r for r in rows if r["phase"] == "growth" and "grown_maps" in r]
    assert len(growth) == 2  # the last growth iteration stops before growing
    seed_widths = report["widths"]["seed"]
    assert seed_widths == [1, 4, 8, 16, 10]
    # one new map per conv layer and two neurons in the hidden linear layer per step
    assert report["widths"]["post_growth"] == [1, 4 + 2, 8 + 2, 16 + 2 * 2, 10]
    assert all(r["grown_maps"] == [1, 1] and r["grown_connections"] > 0 for r in growth)
    # the chosen candidate is never worse than the mean candidate (it is the best one)
    for r in growth:
        assert all(b >= m for b, m in zip(r["map_best_reduction"], r["map_random_reduction"]))


def test_pruning_shrinks_the_area_of_conv_layers(cnn_run):
    out, model, report = cnn_run
    rows = [r for r in ckpt.read_jsonl(out / "metrics.jsonl") if r["phase"] == "pruning"]
    accepted = [r for r in rows if r["accepted"]]
    assert accepted and all(r["pruned_area"] > 0 for r in rows)
    convs = [layer for layer in model.layers[:model.n_conv]]
    assert all(0 < layer.conv_pct() < 100 for layer in convs)
    # the area masks only shrink: every accepted step removed 5% of the live positions of each layer
    n_pos = [layer.area[0].numel() for layer in convs]
    assert [r["conv_pct"] for r in report["layers"][:2]] == [pytest.approx(layer.conv_pct()) for layer in convs]
    assert all(layer.area.sum() < layer.out_features * n for layer, n in zip(convs, n_pos))


def test_report_counts_match_the_model(cnn_run):
    out, model, report = cnn_run
    assert [r["name"] for r in report["layers"]] == ["conv1", "conv2", "fc1", "fc2"]
    assert report["weights"]["final"] == model.active_weights() == sum(r["weights"] for r in report["layers"])
    assert report["layers"][0]["flops"] == conv_flops(model.layers[0])
    assert report["dense_reference"]["flops"] == 50816 and report["dense_reference"]["weights"] == 3592
    assert report["layers"][2]["conv_pct"] is None and report["layers"][0]["kernel"] == 3
    # the Seed / Post-Growth / Post-Pruning columns of the paper's Tables 5 and 6
    assert sum(r["weights_seed"] for r in report["layers"]) == report["weights"]["seed"]
    assert sum(r["weights_post_growth"] for r in report["layers"]) == report["weights"]["post_growth"]
    from nestsynth.report import format_layer_table
    header = format_layer_table(report).splitlines()[0].split()
    assert header[:6] == ["Layer", "In", "Out", "Seed", "Growth", "#Weights"] and "Conv%" in header
    reloaded = json.loads((out / "report.json").read_text())
    assert reloaded["layers"] == json.loads(json.dumps(report["layers"]))
    assert (out / "plots" / "area_of_interest.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cnn_resume_after_interrupt_equals_uninterrupted(digits, tmp_path, cnn_run):
    _, model_a, report_a = cnn_run
    calls = []

    def interrupt(state):
        calls.append(state.phase)
        if len(calls) == 5:  # inside the growth phase, after feature maps were added
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(small_cnn_cfg(), digits, tmp_path / "B", on_iteration=interrupt)
    model_b, report_b = _run(small_cnn_cfg(), digits, tmp_path / "B", resume=True)
    _same_model(model_a, model_b)
    assert _strip_times(report_a) == _strip_times(report_b)


def test_user_sequential_cnn_with_batch_norm(digits):
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Flatten(), nn.Linear(6 * 4 * 4, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 10))
    cfg = small_cnn_cfg(growth={"max_iterations": 2}, pruning={"max_iterations": 2})
    model, report = run_method(cfg, digits, resolve_reference(seq, digits), None)
    assert isinstance(model, SparseCNN) and model.batch_norm and report["model"] == "custom"
    assert report["dense_reference"]["weights"] == 6 * 9 + 96 * 12 + 12 * 10


def test_cli_cnn_quick_start_end_to_end(tmp_path):
    """The shipped CNN quick start, shortened, from the command line (well under two minutes)."""
    run = tmp_path / "cnn"
    rc, out, err = _call(["synthesize", "--config", CNN_QUICK, "--out", run, "--device", "cpu", "--quiet",
                          "--set", "growth.max_iterations=2", "--set", "pruning.max_iterations=3"])
    assert rc == 0, err
    assert "Conv%" in out and "conv1" in out and "fc2" in out
    report = json.loads((run / "report.json").read_text())
    assert report["model"] == "tiny-cnn" and report["test_error"] is not None
    rc, out, _ = _call(["report", run])
    assert rc == 0 and "Conv%" in out and "area_of_interest.png" in out
