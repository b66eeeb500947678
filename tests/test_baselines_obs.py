"""Tests of the L-OBS baseline (nestsynth.baselines.obs) against closed forms and brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nestsynth.baselines.obs import (damp, layer_error, layer_hessian, layer_inputs, lobs_prune,
                                     prune_layer)
from nestsynth.sparse import SparseMLP


def _toy(seed: int = 0):
    """A 2-layer tanh net [5, 4, 3] and 40 inputs (tanh: no dead units, H non-singular)."""
    gen = torch.Generator().manual_seed(seed)
    model = SparseMLP([5, 4, 3], "tanh", generator=gen)
    X = torch.randn(40, 5, generator=gen)
    return model, X


def _brute_force_greedy(W0: np.ndarray, H: np.ndarray, n_prune: int, n_fixed: int):
    """Exact constrained greedy OBS with a fresh inverse of H restricted to every row's support."""
    W = W0.copy()
    out, D = W.shape
    alive = np.ones_like(W, dtype=bool)
    order, losses = [], []
    for _ in range(n_prune):
        best = None
        for i in range(out):
            a = np.flatnonzero(alive[i])
            R = np.linalg.inv(H[np.ix_(a, a)])
            for t, q in enumerate(a):
                if q >= D - n_fixed:
                    continue
                L = W[i, q] ** 2 / (2 * R[t, t])
                if best is None or L < best[0] - 1e-15:
                    best = (L, i, q, a, R, t)
        L, i, q, a, R, t = best
        W[i, a] -= (W[i, q] / R[t, t]) * R[:, t]
        W[i, q] = 0.0
        alive[i, q] = False
        order.append((i, q))
        losses.append(L)
    return W, alive, order, losses


# ---- the single OBS step: closed form ---------------------------------------------------
@pytest.mark.parametrize("layer_index", [0, 1])
def test_single_prune_matches_closed_form_and_error_identity(layer_index):
    model, X = _toy()
    x = layer_inputs(model, X)[layer_index].double()  # (n, d)
    layer = model.layers[layer_index]
    n, d = x.shape
    # explicit matrices: x_hat = [x, 1], H = x_hat^T x_hat / n, its inverse
    xh = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], 1)
    H = xh.T @ xh / n
    Hinv = torch.linalg.inv(H)
    Wb = torch.cat([layer.weight.detach().double(), layer.bias.detach().double().unsqueeze(1)], 1)
    L = Wb[:, :d] ** 2 / (2 * torch.diagonal(Hinv)[:d])  # (out, d)
    i, q = divmod(int(torch.argmin(L)), d)
    expected = Wb.clone()
    expected[i] = Wb[i] - (Wb[i, q] / Hinv[q, q]) * Hinv[:, q]

    res = lobs_prune(Wb.numpy(), H.numpy(), np.ones(Wb.shape, bool), 1, 1, n_fixed=1)
    assert res.order == [(i, q)]
    assert res.weight[i, q] == 0.0
    np.testing.assert_allclose(res.weight, expected.numpy(), rtol=0, atol=1e-10)
    assert res.losses[0] == pytest.approx(float(L[i, q]), rel=1e-12)
    # the increase of the layer-output squared error (1/2n) sum_p ||dW x_hat_p||^2 is L
    new_out = xh @ torch.from_numpy(res.weight).T
    old_out = xh @ Wb.T
    increase = 0.5 * float(((new_out - old_out) ** 2).sum()) / n
    assert increase == pytest.approx(res.losses[0], abs=1e-8, rel=1e-8)

    # the same step through prune_layer on the model (float32 storage)
    stats = prune_layer(layer, X=x, sparsity=1 / layer.weight.numel(), damping=0.0, recompute_every=1)
    assert stats["removed"] == 1 and layer.mask[i, q] == 0 and layer.weight[i, q] == 0
    assert int(layer.mask.sum()) == layer.weight.numel() - 1
    torch.testing.assert_close(layer.weight.detach().double(), expected[:, :d], rtol=0, atol=1e-6)
    torch.testing.assert_close(layer.bias.detach().double(), expected[:, d], rtol=0, atol=1e-6)
    assert stats["layer_error"] == pytest.approx(stats["predicted_error"], rel=1e-6)


# ---- recompute_every = 1: exact constrained greedy OBS ---------------------------------------
def test_recompute_every_one_is_exact_constrained_greedy():
    rng = np.random.default_rng(1)
    X = torch.from_numpy(rng.normal(size=(30, 6)))
    H = damp(layer_hessian(X, fold_bias=True), 1e-3)  # (7, 7)
    W0 = rng.normal(size=(4, 7))
    res = lobs_prune(W0, H, np.ones((4, 7), bool), 15, recompute_every=1, n_fixed=1)
    W_bf, alive_bf, order_bf, losses_bf = _brute_force_greedy(W0, H, 15, n_fixed=1)
    assert res.order == order_bf
    np.testing.assert_allclose(res.losses, losses_bf, rtol=1e-9, atol=0)
    np.testing.assert_allclose(res.weight, W_bf, rtol=0, atol=1e-9)
    assert np.array_equal(res.active, alive_bf)
    # pruned entries stay EXACTLY zero (never moved after removal)
    assert np.all(res.weight[~res.active] == 0.0)
    assert int((~res.active[:, :6]).sum()) == 15 and res.active[:, 6].all()
    # each row is the H-projection of the dense row onto its surviving support:
    # w_A = H_AA^-1 H_A,: w0  (least squares reconstruction of the dense outputs)
    for i in range(4):
        a = np.flatnonzero(res.active[i])
        proj = np.linalg.solve(H[np.ix_(a, a)], H[a] @ W0[i])
        np.testing.assert_allclose(res.weight[i, a], proj, rtol=0, atol=1e-9)
    # nested projections: the total error increase is the sum of the step sensitivities
    assert layer_error(res.weight - W0, H) == pytest.approx(sum(res.losses), rel=1e-9)


def test_block_recompute_first_block_and_zero_constraint():
    rng = np.random.default_rng(2)
    X = torch.from_numpy(rng.normal(size=(50, 8)))
    H = damp(layer_hessian(X, fold_bias=False), 1e-4)
    W0 = rng.normal(size=(5, 8))
    Hinv = np.linalg.inv(H)
    L0 = W0 ** 2 / (2 * np.diag(Hinv))[None, :]
    first = {divmod(int(f), 8) for f in np.argsort(L0, axis=None)[:6]}
    res = lobs_prune(W0, H, np.ones((5, 8), bool), 23, recompute_every=6)
    assert set(res.order[:6]) == first  # block 1: the 6 smallest L of the dense layer
    assert res.refreshes == 4  # ceil(23 / 6) blocks
    assert int((~res.active).sum()) == 23 and len(set(res.order)) == 23
    assert np.all(res.weight[~res.active] == 0.0)


def test_rows_with_dormant_weights_start_from_restricted_inverse():
    rng = np.random.default_rng(3)
    X = torch.from_numpy(rng.normal(size=(40, 5)))
    H = damp(layer_hessian(X, fold_bias=True), 1e-3)  # (6, 6), column 5 = bias
    active = np.ones((3, 6), bool)
    active[0, [1, 3]] = False
    W0 = rng.normal(size=(3, 6)) * active
    res = lobs_prune(W0, H, active, 1, recompute_every=1, n_fixed=1)
    # brute force: L of every live weight with its row's restricted inverse
    best = None
    for r in range(3):
        a = np.flatnonzero(active[r])
        R = np.linalg.inv(H[np.ix_(a, a)])
        for t, c in enumerate(a[:-1]):  # the last support index is the bias
            L = W0[r, c] ** 2 / (2 * R[t, t])
            if best is None or L < best[0]:
                best = (L, r, c, a, R, t)
    L, i, q, a, R, t = best
    assert res.order == [(i, q)] and res.losses[0] == pytest.approx(L, rel=1e-12)
    expected = W0[i].copy()
    expected[a] -= (W0[i, q] / R[t, t]) * R[:, t]
    expected[q] = 0.0
    np.testing.assert_allclose(res.weight[i], expected, rtol=0, atol=1e-12)
    assert np.all(res.weight[~res.active] == 0.0)


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.75, 0.95])
def test_prune_layer_exact_per_layer_count(sparsity):
    gen = torch.Generator().manual_seed(4)
    model = SparseMLP([12, 9, 4], "relu", generator=gen)
    X = torch.randn(64, 12, generator=gen)
    inputs = layer_inputs(model, X)
    for layer, x in zip(model.layers, inputs):
        prune_layer(layer, x, sparsity, damping=1e-4, recompute_every=0)
        assert layer.active_connections() == int(round(layer.weight.numel() * (1 - sparsity)))
        assert torch.all(layer.weight[layer.mask == 0] == 0)


def test_config_validation():
    from nestsynth.config import from_dict
    from nestsynth.errors import NestError

    with pytest.raises(NestError, match="methods.lobs.sparsity"):
        from_dict({"method": "lobs", "methods": {"lobs": {"sparsity": 1.0}}})
    with pytest.raises(NestError, match="methods.lobs.damping"):
        from_dict({"method": "lobs", "methods": {"lobs": {"damping": -1.0}}})


# ---- end to end on digits ------------------------------------------------------------------
def test_run_lobs_on_digits(digits):
    from nest_helpers import mlp_context
    from nestsynth.baselines.registry import get_method
    from nestsynth.config import from_dict

    cfg = from_dict({"method": "lobs", "train": {"batch_size": 64},
                     "methods": {"lobs": {"dense_epochs": 1, "retrain_epochs": 1, "sparsity": 0.9,
                                          "output_sparsity": 0.5, "samples": 500}}})
    ctx = mlp_context(cfg, digits, [64, 32, 16, 10])
    model = get_method("lobs").run(ctx, cfg.methods.lobs)
    numel = [64 * 32, 32 * 16, 16 * 10]
    expect = [round(numel[0] * 0.1), round(numel[1] * 0.1), round(numel[2] * 0.5)]
    assert [layer.active_connections() for layer in model.layers] == expect
    for layer in model.layers:
        assert torch.all(layer.weight[layer.mask == 0] == 0)
    assert ctx.epochs == 2 and ctx.dense is not None
    phases = [row["phase"] for row in ctx.history]
    assert phases == ["dense", "prune", "prune", "prune", "final"]
    assert ctx.history[-1]["weights"] == model.active_weights() <= sum(expect)
    for row in ctx.history[1:4]:  # the layer error is finite and non-negative
        assert 0 <= row["layer_error"] < float("inf") and row["kept"] == expect[row["layer"]]


# ---- conv layers: the patch Hessian -----------------------------------------------------------
def _brute_force_conv_hessian(X: torch.Tensor, layer, fold_bias: bool) -> np.ndarray:
    """(1/(n P)) sum over images and output positions of patch patch^T, by explicit loops:
    each patch cut from the zero-padded image at (stride * row, stride * col)."""
    k, s, pad = layer.kernel_size, layer.stride, layer.padding
    Xp = torch.nn.functional.pad(X.double(), (pad, pad, pad, pad))
    H_out, W_out = layer.out_hw
    D = X.shape[1] * k * k + (1 if fold_bias else 0)
    H = np.zeros((D, D))
    for img in Xp:
        for r in range(H_out):
            for c in range(W_out):
                v = img[:, r * s:r * s + k, c * s:c * s + k].reshape(-1).numpy()  # (channel, kh, kw)
                if fold_bias:
                    v = np.append(v, 1.0)
                H += np.outer(v, v)
    return H / (len(X) * H_out * W_out)


@pytest.mark.parametrize("stride,padding", [(1, 0), (1, 1), (2, 1)])
@pytest.mark.parametrize("fold_bias", [True, False])
def test_conv_hessian_equals_brute_force_patches(stride, padding, fold_bias, monkeypatch):
    from nestsynth.baselines import obs
    from nestsynth.sparse import MaskedConv2d
    from nestsynth.sparse.conv import conv_out_size

    monkeypatch.setattr(obs, "PATCH_CHUNK", 50)  # several chunks of images
    gen = torch.Generator().manual_seed(5)
    out_hw = (conv_out_size(6, 3, stride, padding),) * 2
    layer = MaskedConv2d(2, 3, 3, out_hw, stride=stride, padding=padding, generator=gen)
    X = torch.randn(7, 2, 6, 6, generator=gen)
    H = layer_hessian(X, fold_bias, layer)
    np.testing.assert_allclose(H, _brute_force_conv_hessian(X, layer, fold_bias), rtol=1e-12, atol=1e-12)


def test_one_by_one_conv_hessian_is_the_linear_hessian_of_the_pixels():
    from nestsynth.sparse import MaskedConv2d

    gen = torch.Generator().manual_seed(6)
    layer = MaskedConv2d(4, 2, 1, (5, 5), generator=gen)
    X = torch.randn(3, 4, 5, 5, generator=gen)
    pixels = X.permute(0, 2, 3, 1).reshape(-1, 4)  # every position of every image is one input vector
    np.testing.assert_allclose(layer_hessian(X, True, layer), layer_hessian(pixels, True), rtol=1e-12, atol=1e-14)


def test_conv_prune_layer_is_obs_on_the_flattened_kernel():
    """prune_layer on a conv layer = lobs_prune on (out, in*k*k + bias) with the patch Hessian,
    and the predicted error is the increase of the conv output's squared error."""
    from nestsynth.sparse import MaskedConv2d

    gen = torch.Generator().manual_seed(7)
    layer = MaskedConv2d(2, 3, 3, (4, 4), padding=0, generator=gen)
    X = torch.randn(20, 2, 6, 6, generator=gen)
    W0 = torch.cat([layer.weight.detach().double().flatten(1), layer.bias.detach().double().unsqueeze(1)], 1)
    H = layer_hessian(X, True, layer)
    expect = lobs_prune(W0.numpy(), H, np.ones(W0.shape, bool), 20, 1, n_fixed=1)
    with torch.no_grad():
        before = torch.nn.functional.conv2d(X.double(), layer.weight.double(), layer.bias.double())
    stats = prune_layer(layer, X, sparsity=20 / 54, damping=0.0, recompute_every=1)
    assert stats["removed"] == 20 and layer.active_connections() == 54 - 20
    np.testing.assert_array_equal(layer.mask.flatten(1).numpy() > 0, expect.active[:, :18])
    torch.testing.assert_close(layer.weight.detach().double().flatten(1), torch.from_numpy(expect.weight[:, :18]),
                               rtol=0, atol=1e-6)
    assert torch.all(layer.weight[layer.mask == 0] == 0)
    with torch.no_grad():
        after = torch.nn.functional.conv2d(X.double(), layer.weight.double(), layer.bias.double())
    increase = 0.5 * float(((after - before) ** 2).sum()) / (20 * 16)  # (1/(2 n P)) sum ||dW x||^2
    assert increase == pytest.approx(stats["predicted_error"], rel=1e-4)
    assert stats["layer_error"] == pytest.approx(stats["predicted_error"], rel=1e-6)
