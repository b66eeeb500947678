"""nestsynth.export for CNNs: CompactCNN against the masked SparseCNN, artifacts, export/evaluate/bench-infer.

Oracles: the masked SparseCNN's own forward (eval mode) on random inputs, hand-counted
widths and removed maps, batch norm of a zero output computed by hand from the BN
parameters, hand-counted dense FLOPs of tiny-cnn, and the masked model's test error.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_export import _call, _Exploit, _one_error_line, _randomize_bn

from nestsynth import config as C
from nestsynth.api import resolve_reference
from nestsynth.baselines.runner import run_method
from nestsynth.errors import NestError
from nestsynth.export import CompactCNN, compact_from_sparse, load_artifact, save_artifact
from nestsynth.export.compact import FORMAT, max_abs_difference
from nestsynth.export.pipeline import Source, bench_inference, evaluate_artifact, export_run, reference_cnn
from nestsynth.report.summary import load_model
from nestsynth.sparse import SparseCNN

CONV = [{"out": 5, "kernel": 3, "padding": 1, "pool": "max:2:2", "act": "tanh"},
        {"out": 4, "kernel": 3, "padding": 1, "pool": "max:2:2"}]
FC = [{"out": 6}, {"out": 3}]


def _rand_masks(model: SparseCNN, g: torch.Generator, density: float = 0.6, area: float = 0.7) -> None:
    with torch.no_grad():
        for layer in model.layers:
            layer.mask.copy_((torch.rand(layer.mask.shape, generator=g) < density).float())
        for layer in model.layers[:model.n_conv]:
            layer.area.copy_((torch.rand(layer.area.shape, generator=g) < area).float())


def pruned_cnn(batch_norm: bool = True) -> SparseCNN:
    """(2, 8, 8) -> conv 5 maps (pad 1, pool 2) -> conv 4 maps (pad 1, pool 2) -> fc 6 -> fc 3.

    Both conv layers have partial area masks.  conv1: map 1 has no kernel weight
    (constant, folded into conv2 through its padding: an offset map), maps 2 and 4 are
    not read by conv2 (dead; map 4 has no weights either).  conv2: map 0 has an all-zero
    area (constant although its kernels are live, folded into fc1's bias), map 3 is not
    read by fc1 (dead).  fc1: neuron 5 has no inputs (constant, into fc2's bias).
    fc2 is fully dense.
    """
    g = torch.Generator().manual_seed(7)
    model = SparseCNN((2, 8, 8), CONV, FC, batch_norm, generator=g)
    _rand_masks(model, g)
    c1, c2, f1, f2 = model.layers
    with torch.no_grad():
        for layer in model.layers:  # larger weights: outputs that clearly depend on the input
            layer.weight.mul_(4)
        c1.mask[1] = 0
        c1.mask[4] = 0
        c2.mask[:, 2] = 0
        c2.mask[:, 4] = 0
        c2.area[0] = 0
        f1.mask[:, 12:16] = 0  # channel 3 of conv2 (2x2 positions each)
        f1.mask[5] = 0
        f2.mask.fill_(1)
        model.zero_dormant()
    _randomize_bn(model, g, 0.5)
    return model.eval()


def _inputs(n: int, shape=(2, 8, 8), seed: int = 0) -> torch.Tensor:
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed)) * 2


def _bn_of_zero(model: SparseCNN, i: int) -> torch.Tensor:
    bn = model.norms[i]
    return bn.bias - bn.weight * bn.running_mean / torch.sqrt(bn.running_var + bn.eps)


# ----------------------------------------------------------------------------- compact model


@pytest.mark.parametrize("storage", ["dense", "csr", "auto"])
@pytest.mark.parametrize("batch_norm", [True, False])
def test_compact_cnn_equals_masked_model(storage, batch_norm):
    model = pruned_cnn(batch_norm)
    compact, info = compact_from_sparse(model, storage, batch_size=4)
    assert isinstance(compact, CompactCNN)
    assert info["widths_compact"] == compact.widths == [2, 2, 2, 5, 3]
    assert info["removed_neurons"] == {"constant_folded": [1, 1, 1], "dead": [2, 1, 0]}
    assert info["inputs_read"] == 2 and not info["input_gather"] and info["placeholder_maps"] == [0, 0]
    assert info["area_masks"] == [True, True]
    # conv1 needs an offset only for BN of the masked positions; conv2 always (folded constant map)
    assert info["offset_maps"] == [batch_norm, True]
    x = _inputs(200)
    with torch.inference_mode():
        ref, got = model(x), compact(x)
        one = torch.cat([compact(x[i:i + 1]) for i in range(4)])
    assert (ref - got).abs().max() < 1e-5 and (ref[:4] - one).abs().max() < 1e-5
    assert ref.std(0).min() > 1e-3  # outputs vary with the input: not a vacuous comparison
    conv1, conv2 = compact.layers[:2]
    assert torch.equal(conv1.area, model.layers[0].area[[0, 3]])
    if batch_norm:  # masked positions output batch norm of zero: beta - gamma * mean / sqrt(var + eps)
        c = _bn_of_zero(model, 0).detach()[[0, 3]]
        torch.testing.assert_close(conv1.offset, c[:, None, None] * (1 - conv1.area), atol=1e-6, rtol=0)
    else:  # conv1 map 1 (weights 0) outputs b * A; through tanh, pooling and conv2's padding into conv2
        m1, m2 = model.layers[:2]
        p = F.max_pool2d(torch.tanh(m1.bias[1] * m1.area[1:2]), 2)                       # (1, 4, 4)
        k = F.conv2d(p[None], (m2.weight * m2.mask)[:, 1:2], None, 1, 1)[0]              # (4 maps, 4, 4)
        expected = (k * m2.area)[[1, 2]].detach()
        torch.testing.assert_close(conv2.offset, expected, atol=1e-6, rtol=0)
        assert float(expected[0][m2.area[1] != 0].std()) > 1e-3  # position-dependent (padded border)
    assert compact.layers[-1].nnz == 15 and info["layers"][-1]["density"] == 1.0  # fc2 stays fully dense
    if storage == "auto":
        assert compact.storages()[-1] == "dense"
    else:
        assert compact.storages() == ["dense", "dense", storage, storage]


def test_every_map_of_a_layer_constant_folds_through_padding():
    g = torch.Generator().manual_seed(1)
    model = SparseCNN((2, 8, 8), CONV, FC, True, generator=g)
    _rand_masks(model, g, density=0.8, area=0.8)
    with torch.no_grad():
        model.layers[1].weight.mul_(4)
        model.layers[0].mask.zero_()  # every conv1 map is a constant map
        model.zero_dormant()
    _randomize_bn(model, g, 0.5)
    model.eval()
    compact, info = compact_from_sparse(model, "dense")
    # conv2 reads only conv1: its maps become constant as well, and so do fc1's neurons
    assert info["removed_neurons"]["constant_folded"] == [5, 4, 6] and info["placeholder_maps"] == [1, 1]
    assert compact.widths == [2, 1, 1, 0, 3] and compact.nnz() == 0 and info["inputs_read"] == 0
    x = _inputs(50)
    assert max_abs_difference(model, compact, x) < 1e-5
    with torch.inference_mode():
        assert float(model(x).std(0).max()) < 1e-5  # the whole network is constant, and so is the compact one


def test_unread_input_channels_are_gathered_and_a_dense_model_is_kept_whole():
    g = torch.Generator().manual_seed(2)
    model = SparseCNN((4, 8, 8), CONV, FC, True, generator=g)
    _randomize_bn(model, g, 0.5)
    model.eval()
    compact, info = compact_from_sparse(model, "dense")  # every mask full: nothing removed
    assert compact.widths == model.widths and info["area_masks"] == [False, False]
    assert info["offset_maps"] == [False, False] and compact.input_index is None
    assert compact.nnz() == sum(layer.weight.numel() for layer in model.layers)
    x = _inputs(40, (4, 8, 8))
    assert max_abs_difference(model, compact, x) < 1e-5
    with torch.no_grad():
        model.layers[0].mask[:, 1:] = 0  # only channel 0 is read: 3 of 4 dropped
        model.zero_dormant()
    compact, info = compact_from_sparse(model, "dense")
    assert info["input_gather"] and torch.equal(compact.input_index, torch.tensor([0]))
    assert compact.widths == [1, 5, 4, 6, 3]
    assert max_abs_difference(model, compact, x) < 1e-5


# ----------------------------------------------------------------------------- artifacts


@pytest.mark.parametrize("fmt,suffix", [("pytorch", ".pt"), ("safetensors", ".safetensors")])
def test_cnn_artifact_round_trip_is_exact(tmp_path, fmt, suffix):
    model = pruned_cnn()
    compact, _ = compact_from_sparse(model, "dense", meta={"dataset": "digits"})
    compact.layers[2] = compact_from_sparse(model, "csr")[0].layers[2]  # fc1 as CSR
    path = tmp_path / f"m{suffix}"
    save_artifact(compact, path, fmt)
    loaded = load_artifact(path)
    assert isinstance(loaded, CompactCNN) and loaded.storages() == ["dense", "dense", "csr", "dense"]
    assert loaded.arch() == compact.arch() and loaded.meta["dataset"] == "digits"
    x = _inputs(30)
    with torch.inference_mode():
        assert torch.equal(loaded(x), compact(x))
    if fmt == "pytorch":
        blob = torch.load(path, weights_only=True)
        assert blob["format"] == FORMAT and blob["arch"]["kind"] == "cnn"
        assert all(isinstance(t, torch.Tensor) and t.layout == torch.strided for t in blob["tensors"].values())
        assert {"layers.0.area", "layers.1.offset"} <= set(blob["tensors"])
    else:
        assert json.loads(path.with_suffix(".json").read_text())["arch"]["layers"][0]["type"] == "conv2d"
        path.with_suffix(".json").unlink()  # the copy in the safetensors metadata is enough
        assert load_artifact(path).arch() == compact.arch()


def test_cnn_onnx_matches_pytorch_and_masked():
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from nestsynth.export.formats import OnnxModel, onnx_bytes

    model = pruned_cnn()
    compact, _ = compact_from_sparse(model, "csr")  # CSR is densified for ONNX
    runner = OnnxModel(onnx_bytes(compact), threads=1)
    assert runner.input_shape == [2, 8, 8] and runner.arch["kind"] == "cnn"
    for batch in (1, 9):  # dynamic batch axis
        x = _inputs(batch, seed=batch)
        with torch.inference_mode():
            assert (runner(x) - compact(x)).abs().max() < 1e-5
            assert (runner(x) - model(x)).abs().max() < 1e-5


def test_crafted_pickle_and_tampered_cnn_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "version": 1, "arch": {"kind": "cnn"}, "tensors": {},
                "payload": _Exploit(marker)}, evil)
    with pytest.raises(NestError, match="refused or corrupt"):
        load_artifact(evil)
    rc, _, err = _call(["evaluate", evil, "--dataset", "digits"])
    assert rc == 2 and "plain tensors only" in _one_error_line(err)
    assert not marker.exists()
    compact, _ = compact_from_sparse(pruned_cnn(), "dense")
    path = tmp_path / "m.pt"
    save_artifact(compact, path, "pytorch")
    blob = torch.load(path, weights_only=True)
    blob["tensors"]["layers.0.area"] = blob["tensors"]["layers.0.area"][:, :4]  # wrong shape
    torch.save(blob, path)
    with pytest.raises(NestError, match="do not match its architecture"):
        load_artifact(path)
    blob["arch"]["layers"] = blob["arch"]["layers"][2:] + blob["arch"]["layers"][:2]  # linear before conv
    torch.save(blob, path)
    with pytest.raises(NestError, match="do not match its architecture"):
        load_artifact(path)


# ----------------------------------------------------------------------------- a finished CNN run


@pytest.fixture(scope="module")
def cnn_run(digits, tmp_path_factory):
    """A tiny finished tiny-cnn run (a few epochs: the weights barely learn, which is fine here)."""
    cfg = C.from_dict({"model": "tiny-cnn", "seed": 0, "device": "cpu",
                       "data": {"dataset": "digits", "val_fraction": 0.2},
                       "seed_net": {"ratio": 0.5, "density": 0.3}, "train": {"lr": 0.01, "batch_size": 64},
                       "dense": {"epochs": 1},
                       "growth": {"target": "0.0", "max_iterations": 1, "epochs_per_iteration": 1,
                                  "neurons_per_step": 2, "feature_maps_per_step": 1, "map_candidates": 2,
                                  "score_samples": 200},
                       "pruning": {"rate": 0.1, "retrain_epochs": 1, "max_iterations": 1, "tolerance": 0.5,
                                   "area_rate": 0.05}})
    out = tmp_path_factory.mktemp("cnn_export") / "run"
    run_method(cfg, digits, resolve_reference(cfg.model, digits), out)
    model = load_model(out / "model.pt").eval()
    with torch.inference_mode():
        wrong = int((model(digits.test.X).argmax(1) != digits.test.y).sum())
    return out, model, wrong / len(digits.test.y)


def test_export_evaluate_a_cnn_run(cnn_run):
    run, model, error = cnn_run
    assert any(0 < layer.conv_pct() < 100 for layer in model.layers[:model.n_conv])  # partial areas exported
    rc, out, err = _call(["export", run, "--format", "pytorch", "--json"])
    assert rc == 0, err
    result = json.loads(out)
    assert result["check_passed"] and result["max_abs_diff"] < 1e-5 and result["check_samples"] == 360
    assert result["test_error_compact"] == result["test_error_masked"] == error
    path = run / "export" / "compact.pt"
    assert Path(result["artifact"]) == path and path.is_file()
    assert result["widths_masked"] == model.widths and result["layers"][0]["name"] == "conv1"
    if result["widths_compact"] == model.widths:  # nothing removed: the report's count (metrics.conv_macs)
        report = json.loads((run / "report.json").read_text())
        assert result["nnz_flops"] == report["flops"]["final"]
    assert isinstance(load_artifact(path), CompactCNN)
    assert evaluate_artifact(path)["test_error"] == error
    rc, out, err = _call(["export", run, "--format", "safetensors", "--sparse", "csr", "--check", "random"])
    assert rc == 0 and "partial-area masks" in out, err
    assert evaluate_artifact(run / "export" / "compact.safetensors")["test_error"] == error


def test_onnx_export_and_bench_infer_of_a_cnn_run(cnn_run, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    run, model, error = cnn_run
    result = export_run(run, "onnx", check="test")
    assert result["max_abs_diff_onnx_vs_pytorch"] < 1e-5 and result["max_abs_diff_onnx_vs_masked"] < 1e-5
    assert evaluate_artifact(run / "export" / "compact.onnx")["test_error"] == error
    export_run(run, "pytorch", sparse="dense", check="random")
    bench = bench_inference(run / "export" / "compact.pt", batch_sizes=(1, 3), repeats=3, warmup=1,
                            out=tmp_path / "inference.json")
    report = json.loads((run / "report.json").read_text())
    # tiny-cnn dense reference, 2 x MACs: 8*1*9*8*8 + 16*8*9*4*4 + 64*32 + 32*10 = 25,408 MACs
    assert bench["flops"]["dense_reference"] == report["dense_reference"]["flops"] == 2 * 25_408
    names = [v["name"] for v in bench["variants"]]
    assert names[:3] == ["dense reference", "masked", "compact (PyTorch)"] and names[-1] == "ONNX (onnxruntime)"
    ref_row = bench["variants"][0]
    assert ref_row["widths"] == [1, 8, 16, 32, 10] and ref_row["executed_flops"] == 2 * 25_408
    assert ref_row["flop_ratio"] == 1.0 and ref_row["latency"]["1"]["speedup"] == 1.0
    for v in bench["variants"][1:]:
        assert v["max_abs_diff_vs_masked"] < 1e-5 and set(v["latency"]) == {"1", "3"}
        assert v["flop_ratio"] == pytest.approx(2 * 25_408 / v["executed_flops"])
    assert json.loads((tmp_path / "inference.json").read_text())["variants"][1]["name"] == "masked"


def test_reference_cnn_of_an_unregistered_model_uses_the_final_layout(cnn_run):
    run, model, _ = cnn_run
    src = Source(model, run / "model.pt", run, name="custom",
                 report={"model": "custom", "dense_reference": {"widths": [1, 6, 7, 9, 10]}})
    ref = reference_cnn(src)
    assert ref.widths == [1, 6, 7, 9, 10] and ref.conv_specs == [dict(c, out=w) for c, w in
                                                                 zip(model.conv_specs, (6, 7))]
