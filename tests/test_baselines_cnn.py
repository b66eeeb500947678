"""Baselines and Deep Compression on CNN references (tiny-cnn on the 8x8 digits).

Oracles: hand counts of tiny-cnn's weights/FLOPs and of each rule's kept counts, the
same dense network retrained from the same seed (Han, oneshot), autograd on the mask
(SNIP), the model's own forward (L0 gates), hand-counted storage bits.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from nest_helpers import mlp_context
from nestsynth import config as C
from nestsynth.api import resolve_reference
from nestsynth.baselines.magnitude import run_han, run_oneshot
from nestsynth.baselines.registry import get_method
from nestsynth.pruning.gates import L0Gates, gated_layer
from nestsynth.baselines.runner import run_method
from nestsynth.baselines.saliency import snip_scores
from nestsynth.compress import compress_run, share_weights, storage_report
from nestsynth.errors import NestError
from nestsynth.report.summary import load_model
from nestsynth.run_context import RunContext
from nestsynth.sparse import MaskedConv2d, SparseCNN
from test_cli import _call, _one_error_line

ROOT = Path(__file__).resolve().parents[1]
# tiny-cnn on 1x8x8: conv 8@3x3 pad 1 (8x8 out, pool -> 4x4), conv 16@3x3 pad 1 (4x4, pool -> 2x2), fc 64-32, fc 32-10
LAYER_WEIGHTS = [8 * 1 * 9, 16 * 8 * 9, 16 * 2 * 2 * 32, 32 * 10]  # 72, 1152, 2048, 320
DENSE_WEIGHTS = 3592
DENSE_FLOPS = 2 * (72 * 8 * 8 + 1152 * 4 * 4 + 2048 + 320)  # 2 x MACs = 50816
UNSUPPORTED = ["radix"]  # n2ps prunes feature maps too (tests/test_n2ps_graph.py)


def test_hand_counts_match_the_spec():
    from nestsynth.registry import get_model
    spec = get_model("tiny-cnn")
    assert sum(LAYER_WEIGHTS) == DENSE_WEIGHTS == spec.dense_weights()
    assert DENSE_FLOPS == 50816 == spec.dense_flops()


@pytest.fixture(scope="module")
def tiny(digits):
    return resolve_reference("tiny-cnn", digits)


def _cfg(method: str, **mcfg):
    """One pass per epoch (train.min_steps_per_epoch = 0): these short runs at lr 0.01 check
    mechanics; 150 steps at that rate close every L0 gate of a layer."""
    return C.from_dict({"method": method, "device": "cpu",
                        "train": {"batch_size": 64, "lr": 0.01, "min_steps_per_epoch": 0},
                        "methods": {method: mcfg}})


def _ctx(method, digits, tiny, **mcfg):
    cfg = _cfg(method, **mcfg)
    ctx = RunContext(cfg, digits, tiny, device=torch.device("cpu"))
    return ctx, getattr(cfg.methods, method)


def _run(method, digits, tiny, **mcfg):
    """Run ``method`` on tiny-cnn; checks what every CNN run's report must hold."""
    model, report = run_method(_cfg(method, **mcfg), digits, tiny, None)
    assert isinstance(model, SparseCNN) and model.n_conv == 2
    ref = report["dense_reference"]
    assert (ref["weights"], ref["flops"], ref["widths"]) == (DENSE_WEIGHTS, DENSE_FLOPS, [1, 8, 16, 32, 10])
    assert [r["weights"] for r in report["layers"]] == model.active_per_layer()
    assert [r["name"] for r in report["layers"]] == ["conv1", "conv2", "fc1", "fc2"]
    assert report["weights"]["final"] == model.active_weights()
    assert report["compression"]["weights"] == pytest.approx(DENSE_WEIGHTS / model.active_weights())
    for layer in model.layers:  # invariant: dormant weights are exactly zero
        assert torch.all(layer.weight[layer.mask == 0] == 0)
    return model, report


def _kept(model) -> list[int]:
    return [int(layer.mask.sum()) for layer in model.layers]


def _keep(n: int, s: float) -> int:
    return round(n * (1 - s))


# ---- methods that support CNNs ---------------------------------------------------------
def test_context_builds_the_spec(digits, tiny):
    ctx, _ = _ctx("dense", digits, tiny)
    model = ctx.dense_model()
    assert isinstance(model, SparseCNN) and model.widths == [1, 8, 16, 32, 10] and ctx.is_cnn
    assert [layer.weight.numel() for layer in model.layers] == LAYER_WEIGHTS
    # the MLP path is unchanged
    mlp = mlp_context(_cfg("dense"), digits, [64, 16, 10])
    assert type(mlp.dense_model()).__name__ == "SparseMLP" and not mlp.is_cnn


def test_dense_and_random(digits, tiny):
    model, report = _run("dense", digits, tiny, epochs=1)
    assert _kept(model) == LAYER_WEIGHTS and report["dense_reference"]["test_error"] is not None
    model, _ = _run("random", digits, tiny, epochs=1, sparsity=0.6)
    assert _kept(model) == [_keep(n, 0.6) for n in LAYER_WEIGHTS] == [29, 461, 819, 128]
    assert model.active_per_layer() == _kept(model)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_oneshot_keeps_the_largest_dense_weights(digits, tiny, scope):
    s = 0.75
    ctx, mcfg = _ctx("oneshot", digits, tiny, dense_epochs=1, finetune_epochs=0, sparsity=s, scope=scope)
    model = run_oneshot(ctx, mcfg)
    twin_ctx, _ = _ctx("oneshot", digits, tiny, dense_epochs=1)
    dense = twin_ctx.train_dense(1)  # the same dense network (same seed, same draws)
    mags = [layer.weight.detach().abs() for layer in dense.layers]
    if scope == "layer":
        assert _kept(model) == [_keep(n, s) for n in LAYER_WEIGHTS]  # conv layers included
        for m, layer in zip(mags, model.layers):
            kept = m.flatten()[layer.mask.flatten() > 0]
            dropped = m.flatten()[layer.mask.flatten() == 0]
            assert kept.min() >= dropped.max()
    else:
        assert sum(_kept(model)) == _keep(DENSE_WEIGHTS, s)
        flat = torch.cat([m.flatten() for m in mags])
        live = torch.cat([layer.mask.flatten() for layer in model.layers]) > 0
        assert flat[live].min() >= flat[~live].max()


def test_han_threshold_rule_on_conv_layers(digits, tiny):
    ctx, mcfg = _ctx("han", digits, tiny, dense_epochs=1, iterations=1, retrain_epochs=0, quality=0.9,
                     quality_output_scale=0.5)
    model = run_han(ctx, mcfg)
    twin_ctx, _ = _ctx("han", digits, tiny)
    dense = twin_ctx.train_dense(1, mcfg.weight_decay)
    qs = [0.9, 0.9, 0.9, 0.45]  # conv and hidden fc layers: q; output layer: q * 0.5
    expected = [int((layer.weight.detach().abs() >= q * layer.weight.detach().std()).sum())
                for q, layer in zip(qs, dense.layers)]
    assert _kept(model) == expected and all(0 < k < n for k, n in zip(expected, LAYER_WEIGHTS))
    _run("han", digits, tiny, dense_epochs=1, iterations=2, retrain_epochs=1)


def test_gradual_and_lottery_counts(digits, tiny):
    model, _ = _run("gradual", digits, tiny, epochs=2, begin_epoch=0, end_epoch=1, frequency=5,
                    final_sparsity=0.8)
    assert _kept(model) == [_keep(n, 0.8) for n in LAYER_WEIGHTS]
    model, _ = _run("gradual", digits, tiny, epochs=2, begin_epoch=0, end_epoch=1, frequency=5,
                    final_sparsity=0.8, scope="global")
    assert sum(_kept(model)) == _keep(DENSE_WEIGHTS, 0.8)
    model, _ = _run("lottery", digits, tiny, epochs_per_round=1, rounds=2, rate=0.2, output_rate=0.1)
    expected = []
    for n, r in zip(LAYER_WEIGHTS, [0.2, 0.2, 0.2, 0.1]):  # conv layers prune at the hidden rate
        for _ in range(2):
            n -= round(r * n)
        expected.append(n)
    assert _kept(model) == expected


def test_snip_scores_of_conv_layers_equal_the_mask_derivative(digits, tiny):
    """SNIP's |w dL/dw| equals |dL/dc| for a multiplicative mask c, on conv and fc layers."""
    model = tiny.build(torch.Generator().manual_seed(1))
    X, y = digits.train.X[:64], digits.train.y[:64]
    scores = snip_scores(model, X, y)
    cs = [torch.ones_like(layer.weight, requires_grad=True) for layer in model.layers]
    params = {f"layers.{i}.weight": layer.weight.detach() * c for i, (layer, c) in enumerate(zip(model.layers, cs))}
    grads = torch.autograd.grad(F.cross_entropy(functional_call(model, params, (X,)), y), cs)
    total = sum(g.abs().sum() for g in grads)
    assert scores[0].shape == (8, 1, 3, 3)
    for s, g in zip(scores, grads):
        torch.testing.assert_close(s, g.abs() / total, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("method", ["snip", "grasp"])
def test_snip_grasp_keep_an_exact_global_count(digits, tiny, method):
    model, report = _run(method, digits, tiny, epochs=1, batch_size=100, sparsity=0.9)
    assert sum(_kept(model)) == _keep(DENSE_WEIGHTS, 0.9) == 359
    assert report["weights"]["final"] == 359


def test_l0_gates_on_conv_layers_fold_exactly(digits, tiny):
    model = tiny.build(torch.Generator().manual_seed(2))
    conv = model.layers[1]
    with torch.no_grad():  # a partial area: gated_layer must mask the same outputs as the layer
        conv.area[:, 0, :] = 0
    x = model.trace(digits.train.X[:5])[0][1]  # conv2's input (5, 8, 4, 4)
    torch.testing.assert_close(gated_layer(conv, conv.weight * conv.mask, x), conv(x), rtol=0, atol=0)
    gen = torch.Generator().manual_seed(3)
    init = [torch.where(torch.rand(layer.weight.shape, generator=gen) < 0.3, -5.0, 3.0) for layer in model.layers]
    gates = L0Gates(model, init).eval()
    out = gates(digits.train.X[:32])
    gates.fold_into(model)
    torch.testing.assert_close(model(digits.train.X[:32]), out)
    assert _kept(model) == [int((la > 0).sum()) for la in init]  # z_hat > 0 exactly where log_alpha = 3
    model, _ = _run("l0", digits, tiny, epochs=1)
    assert all(0 < k <= n for k, n in zip(_kept(model), LAYER_WEIGHTS))


def test_lobs_on_conv_layers_keeps_exact_counts_and_compensates(digits, tiny):
    """L-OBS on tiny-cnn: exact per-layer counts (conv kernels included), pruned weights zero,
    and every layer's logged error is at most its prediction (k = 1: the predicted sum of
    sensitivities is the error under the damped Hessian, which only adds a positive term)."""
    s, out_s = 0.75, 0.5
    model, report = _run("lobs", digits, tiny, dense_epochs=1, retrain_epochs=1, sparsity=s, output_sparsity=out_s,
                         samples=300, recompute_every=1)
    assert _kept(model) == [_keep(n, s) for n in LAYER_WEIGHTS[:-1]] + [_keep(LAYER_WEIGHTS[-1], out_s)]
    ctx, mcfg = _ctx("lobs", digits, tiny, dense_epochs=1, retrain_epochs=0, sparsity=s, samples=300,
                     recompute_every=1)
    model = get_method("lobs").run(ctx, mcfg)
    rows = [r for r in ctx.history if r["phase"] == "prune"]
    assert [r["kept"] for r in rows] == [_keep(n, s) for n in LAYER_WEIGHTS] == _kept(model)
    for r in rows:
        assert 0 < r["layer_error"] <= r["predicted_error"] * (1 + 1e-6)


@pytest.mark.parametrize("variant", ["supervised", "unsupervised"])
def test_sensitivity_on_conv_layers_thresholds_exactly_the_small_weights(digits, tiny, variant):
    """Sensitivity-driven decay on tiny-cnn: the threshold prunes exactly the weights logged
    below it (conv kernels included), pruned weights are zero, retraining revives none."""
    model, report = _run("sensitivity", digits, tiny, epochs=1, final_epochs=1, lam=0.05, threshold=0.02,
                         variant=variant)
    ctx, mcfg = _ctx("sensitivity", digits, tiny, epochs=1, final_epochs=0, lam=0.05, threshold=0.02,
                     variant=variant)
    model = get_method("sensitivity").run(ctx, mcfg)
    below, pruned = ctx.history[0]["below_threshold"], ctx.history[1]["pruned"]
    assert 0 < below == pruned == DENSE_WEIGHTS - sum(_kept(model))
    assert _kept(model)[0] < LAYER_WEIGHTS[0] or _kept(model)[1] < LAYER_WEIGHTS[1]  # a conv layer lost weights
    for layer in model.layers:
        assert torch.all(layer.mask == (layer.weight.detach().abs() >= 0.02).float())


@pytest.mark.parametrize("method", UNSUPPORTED)
def test_mlp_only_methods_refuse_a_cnn_before_any_work(digits, tiny, tmp_path, method):
    out = tmp_path / "run"
    with pytest.raises(NestError, match=f"^method {method} supports MLP references only; [^.]+[.]$"):
        run_method(_cfg(method), digits, tiny, out)
    assert not out.exists()
    ctx, mcfg = _ctx(method, digits, tiny)  # the run function itself refuses too
    with pytest.raises(NestError, match="supports MLP references only"):
        get_method(method).run(ctx, mcfg)
    assert ctx.epochs == 0 and not ctx.history


def test_cli_prune_refuses_an_mlp_only_method_in_one_line(tmp_path):
    rc, _, err = _call(["prune", "--method", "radix", "--model", "tiny-cnn", "--dataset", "digits",
                        "--out", tmp_path / "r", "--quiet", "--device", "cpu"])
    assert rc == 2 and "method radix supports MLP references only" in _one_error_line(err)
    assert not (tmp_path / "r").exists()


# ---- Deep Compression ------------------------------------------------------------------------
def test_storage_treats_conv_kernels_as_out_by_in_k_k_matrices(tiny):
    model = tiny.build(torch.Generator().manual_seed(4))
    conv = model.layers[1]
    with torch.no_grad():
        conv.mask.view(-1)[::3] = 0
        conv.weight.mul_(conv.mask)
    shared = share_weights(model, bits=2, conv_bits=3)
    assert [len(s.centroids) for s in shared] == [8, 8, 4, 4]
    rep = storage_report(model, shared, index_bits=8)
    row = rep["layers"][1]
    n = int(conv.mask.sum())  # 768 of 1152; gaps of 0 or 2 zeros: no fillers at 8 bits
    assert row["shape"] == [16, 72] and row["weight_shape"] == [16, 8, 3, 3] and row["fillers"] == 0
    bias = 32 * 16
    assert row["bytes"]["dense"] * 8 == 32 * 1152 + bias
    assert row["bytes"]["csr"] == math.ceil((n * (32 + 7) + 17 * n.bit_length() + bias) / 8)  # 7 = ceil(log2 72)
    assert row["bytes"]["relative"] == math.ceil((n * (32 + 8) + bias) / 8)
    assert row["bytes"]["shared"] == math.ceil((n * (3 + 8) + 32 * 8 + bias) / 8)
    with torch.no_grad():  # a partial area costs one bit per output position (16 x 4 x 4)
        conv.area[:, :, 0] = 0
    again = storage_report(model, shared, index_bits=8)["layers"][1]
    assert again["area_bits"] == 256 and again["bytes"]["dense"] == row["bytes"]["dense"] + 32
    assert again["huffman_bits"]["area"] == 256


def test_compress_a_cnn_run(digits, tiny, tmp_path):
    run = tmp_path / "oneshot"
    model, report = run_method(_cfg("oneshot", dense_epochs=1, finetune_epochs=1, sparsity=0.5), digits, tiny, run)
    bits = 2
    result = compress_run(run, bits=bits, index_bits=4, finetune_epochs=1)
    assert json.loads((run / "compression.json").read_text()) == json.loads(json.dumps(result))
    hand = 4 * sum(layer.weight.numel() + layer.bias.numel() for layer in model.layers)
    assert result["bytes"]["dense"] == hand == 4 * (DENSE_WEIGHTS + 8 + 16 + 32 + 10)
    assert result["reference"]["bytes"] == hand  # oneshot keeps the reference's shape
    assert result["bytes"]["huffman"] < result["bytes"]["shared"] < result["bytes"]["relative"] < hand
    assert [row["name"] for row in result["layers"]] == ["conv1", "conv2", "fc1", "fc2"]
    assert result["layers"][0]["shape"] == [8, 9] and result["layers"][1]["shape"] == [16, 72]
    shared = load_model(run / "model_shared.pt")
    assert isinstance(shared, SparseCNN)
    for new, old in zip(shared.layers, model.layers):
        assert torch.equal(new.mask, old.mask) and torch.all(new.weight[new.mask == 0] == 0)
        assert len(torch.unique(new.weight[new.mask > 0])) <= 2 ** bits
        assert isinstance(new, MaskedConv2d) == isinstance(old, MaskedConv2d)


def test_cli_compare_nest_and_oneshot_on_tiny_cnn(tmp_path):
    out = tmp_path / "cmp"
    sets = ["dense.epochs=1", "growth.max_iterations=1", "growth.epochs_per_iteration=1", "growth.map_candidates=2",
            "pruning.max_iterations=1", "pruning.retrain_epochs=1", "pruning.recover_epochs=0",
            "methods.oneshot.dense_epochs=1", "methods.oneshot.finetune_epochs=1", "methods.oneshot.sparsity=0.5"]
    argv = ["compare", "--methods", "nest,oneshot", "--model", "tiny-cnn", "--dataset", "digits", "--seeds", "1",
            "--config", ROOT / "configs" / "digits-cnn-quick.toml", "--out", out, "--device", "cpu",
            "--jobs", "1"] + [a for s in sets for a in ("--set", s)]
    rc, _, err = _call(argv)
    assert rc == 0, err
    for name in ("comparison.md", "comparison.csv", "pareto.png"):
        assert (out / name).is_file(), name
    rows = list(csv.DictReader((out / "comparison.csv").open()))
    assert [r["method"] for r in rows] == ["nest", "oneshot"]
    for r in rows:
        report = json.loads((out / r["run_dir"] / "report.json").read_text())
        assert report["dense_reference"]["weights"] == DENSE_WEIGHTS
        assert report["dense_reference"]["flops"] == DENSE_FLOPS
        assert int(r["weights"]) == report["weights"]["final"]
    oneshot = json.loads((out / "oneshot" / "seed0" / "report.json").read_text())
    assert [row["weights"] for row in oneshot["layers"]] == [_keep(n, 0.5) for n in LAYER_WEIGHTS]
