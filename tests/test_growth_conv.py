"""Conv growth: dense gradients (autograd oracle), memory-bounded global top-k (dense
oracle) and Policy 3 feature-map growth (brute force with append_units)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from nestsynth.growth.connections import grow_connections_global
from nestsynth.growth.conv import dormant_topk, layer_gradients, top_dormant
from nestsynth.growth.feature_maps import grow_feature_map, grow_feature_maps, random_feature_map
from nestsynth.growth.scores import gradient_scan
from nestsynth.sparse import SparseCNN, SparseMLP, append_units
from nest_helpers import randomize_bn, randomize_masks

CONV = [{"out": 4, "kernel": 3, "padding": 1, "pool": "max:2:2"},
        {"out": 5, "kernel": 3, "stride": 2, "padding": 1, "act": "tanh", "pool": "avg:2:2"}]
FC = [{"out": 6, "dropout": 0.3}, {"out": 3}]


def _sparsify(model, gen, density=0.5, area=True):
    randomize_masks(model, gen, density, 0.7 if area else None)
    randomize_bn(model, gen)
    return model


def tiny_cnn(batch_norm=True, seed=0, area=True, conv=CONV, fc=FC) -> SparseCNN:
    gen = torch.Generator().manual_seed(seed)
    model = SparseCNN((2, 12, 12), conv, fc, batch_norm, generator=gen).double()
    return _sparsify(model, gen, area=area).train()  # train mode: the functions must switch to eval


def data(n=10, seed=1, shape=(2, 12, 12), classes=3):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, *shape, generator=gen, dtype=torch.float64),
            torch.randint(0, classes, (n,), generator=gen))


def autograd_oracle(model, X, y):
    """dL/dW of an unmasked copy (mask of ones, dormant weights zero but trainable), eval mode."""
    dense = copy.deepcopy(model).eval()
    for layer in dense.layers:
        layer.mask.fill_(1.0)
    loss = F.cross_entropy(dense(X), y)
    return torch.autograd.grad(loss, [layer.weight for layer in dense.layers])


# ---- dense gradients ---------------------------------------------------------------
def test_layer_gradients_equal_autograd_on_unmasked_copy_conv_with_area_mask():
    model = tiny_cnn()
    X, y = data()
    assert not bool(model.layers[0].area.all()) and not bool(model.layers[1].area.all())
    grads = layer_gradients(model, X, y, batch_size=3)
    oracle = autograd_oracle(model, X, y)
    assert model.training  # mode restored
    for g, o, layer in zip(grads, oracle, model.layers):
        assert g.shape == layer.weight.shape
        dormant = layer.mask == 0
        assert dormant.any() and o[dormant].abs().max() > 0  # the oracle is informative at dormant positions
        torch.testing.assert_close(g, o, rtol=1e-10, atol=1e-12)


def test_layer_gradients_without_area_mask_and_for_mlp_match_gradient_scan():
    model = tiny_cnn(batch_norm=False, area=False)
    X, y = data(7)
    for g, o in zip(layer_gradients(model, X, y, batch_size=4), autograd_oracle(model, X, y)):
        torch.testing.assert_close(g, o, rtol=1e-10, atol=1e-12)
    gen = torch.Generator().manual_seed(3)
    mlp = _sparsify(SparseMLP((288, 9, 5, 3), batch_norm=True, generator=gen).double(), gen)
    grads = layer_gradients(mlp, X, y, batch_size=4)
    scan = gradient_scan(mlp, X, y, batch_size=4, bridges=False)
    for g, s, o in zip(grads, scan.grads, autograd_oracle(mlp, X, y)):
        torch.testing.assert_close(g, o, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(g, s, rtol=1e-10, atol=1e-12)


# ---- memory-bounded global top-k -----------------------------------------------------
@pytest.mark.parametrize("block_rows", [1, 2])
@pytest.mark.parametrize("cache", [True, False])
def test_top_dormant_equals_dense_global_topk(block_rows, cache):
    model = tiny_cnn(seed=5)
    X, y = data(9, seed=6)
    masks = [layer.mask.clone() for layer in model.layers]
    dense = [g.abs() for g in layer_gradients(model, X, y)]
    k = 40
    expected = grow_connections_global(dense, masks, k)
    got = top_dormant(model, X, y, k, batch_size=4, block_rows=block_rows, cache=cache)
    for e, g, m in zip(expected, got, masks):
        assert torch.equal(e, g)
        assert torch.equal(g * m, m)  # live connections stay live
    added = [int((g - m).sum()) for g, m in zip(got, masks)]
    assert sum(added) == k
    assert sum(added[:model.n_conv]) > 0 and sum(added[model.n_conv:]) > 0  # one ranking over conv and fc
    values, idx = dormant_topk(model, X, y, k, batch_size=4, block_rows=block_rows, cache=cache)
    flat = torch.cat([d.masked_fill(m.bool(), 0).flatten() for d, m in zip(dense, masks)])
    torch.testing.assert_close(values, flat[idx], rtol=1e-10, atol=0)
    assert bool((values[:-1] >= values[1:]).all())
    assert not torch.cat([m.flatten() for m in masks])[idx].bool().any()  # never a live position


def test_top_dormant_k_larger_than_candidates_takes_all_positive_dormant():
    model = tiny_cnn(seed=2)
    X, y = data(5, seed=3)
    masks = [layer.mask.clone() for layer in model.layers]
    dense = [g.abs() for g in layer_gradients(model, X, y)]
    k = sum(m.numel() for m in masks)
    expected = grow_connections_global(dense, masks, k)
    for e, g in zip(expected, top_dormant(model, X, y, k, block_rows=3, cache=False)):
        assert torch.equal(e, g)


# ---- Policy 3 ----------------------------------------------------------------------
def brute_loss(model, h, X, y, w_in, w_out):
    big = copy.deepcopy(model)
    append_units(big, h, w_in, w_out)
    with torch.no_grad():
        return float(F.cross_entropy(big.eval()(X), y))


def test_running_topk_breaks_ties_like_the_selector_whatever_the_push_order():
    """Many equal scores pushed in blocks out of index order (as conv layers are pushed after
    linear blocks): the kept set and its order are the selector's on the whole vector."""
    from nestsynth.growth.conv import RunningTopK
    from nestsynth.select import top_k

    gen = torch.Generator().manual_seed(1)
    flat = torch.randint(0, 4, (90,), generator=gen).double()  # values 0..3: ties everywhere, 0 never kept
    blocks = [(60, 90), (0, 25), (40, 60), (25, 40)]
    for k in (1, 7, 30, 80):
        top = RunningTopK(k, dtype=torch.float64)
        for a, b in blocks:
            top.push(flat[a:b], a)
        want = top_k(flat, min(k, int((flat > 0).sum())))
        assert torch.equal(top.indices, want) and torch.equal(top.values, flat[want])


@pytest.mark.parametrize("h", [0, 1])  # next layer: a convolution (with area mask), then the linear head
@pytest.mark.parametrize("scale", ["layer", "default"])
def test_grow_feature_map_picks_the_best_candidate_brute_force(h, scale):
    model = tiny_cnn(seed=7)
    X, y = data(12, seed=8)
    n_cand, density = 6, 0.4
    w_in, w_out, stats = grow_feature_map(model, h, X, y, n_cand, density,
                                          torch.Generator().manual_seed(11), scale)
    assert model.training and model.widths == [2, 4, 5, 6, 3]  # not modified
    regen = torch.Generator().manual_seed(11)
    cands = [random_feature_map(model, h, density, regen, scale) for _ in range(n_cand)]
    losses = [brute_loss(model, h, X, y, a, b) for a, b in cands]
    with torch.no_grad():
        before = float(F.cross_entropy(copy.deepcopy(model).eval()(X), y))
    assert torch.equal(w_in, cands[stats["best_index"]][0]) and torch.equal(w_out, cands[stats["best_index"]][1])
    assert brute_loss(model, h, X, y, w_in, w_out) <= min(losses) + 1e-12
    assert stats["candidate_losses"] == pytest.approx(losses, rel=1e-10, abs=1e-12)
    assert stats["loss_before"] == pytest.approx(before, rel=1e-12)
    assert stats["best_reduction"] == pytest.approx(before - min(losses), rel=1e-9, abs=1e-12)
    mean_red = before - sum(losses) / n_cand
    assert stats["mean_random_reduction"] == pytest.approx(mean_red, rel=1e-9, abs=1e-12)
    if mean_red > 1e-12:
        assert stats["ratio"] == pytest.approx(stats["best_reduction"] / mean_red, rel=1e-9)
    # shapes and sparsity of a candidate
    nxt = model.layers[h + 1]
    assert w_in.shape == (1, model.layers[h].in_features, 3, 3)
    assert w_out.shape == ((nxt.out_features, 1, 3, 3) if h == 0 else (nxt.out_features, model.flat_size))
    assert int((w_in != 0).sum()) == max(1, round(density * w_in.numel()))


def test_grow_feature_maps_sequential_choice_equals_installing_the_earlier_maps():
    model = tiny_cnn(seed=9)
    X, y = data(12, seed=10)
    w_in, w_out, stats = grow_feature_maps(model, 0, 2, X, y, 4, 0.5, torch.Generator().manual_seed(1))
    assert w_in.shape[0] == 2 and w_out.shape[1] == 2 and len(stats) == 2
    first = copy.deepcopy(model)
    append_units(first, 0, w_in[:1], w_out[:, :1])
    with torch.no_grad():
        after_first = float(F.cross_entropy(first.eval()(X), y))
    assert stats[1]["loss_before"] == pytest.approx(after_first, rel=1e-10)
    assert stats[0]["best_loss"] == pytest.approx(after_first, rel=1e-10)
    # map 2's candidates, evaluated on the model with map 1 installed
    regen = torch.Generator().manual_seed(1)
    cands = [random_feature_map(model, 0, 0.5, regen) for _ in range(8)][4:]
    losses = [brute_loss(first, 0, X, y, a, b) for a, b in cands]
    assert stats[1]["candidate_losses"] == pytest.approx(losses, rel=1e-10)
    assert brute_loss(model, 0, X, y, w_in, w_out) == pytest.approx(min(losses), rel=1e-10)


def test_installed_map_changes_nothing_else():
    model = tiny_cnn(seed=4).eval()
    X, y = data(6, seed=5)
    w_in, w_out, _ = grow_feature_map(model, 1, X, y, 3, 0.5, torch.Generator().manual_seed(2))
    big = copy.deepcopy(model)
    append_units(big, 1, w_in, w_out)
    with torch.no_grad():
        _, old = model.trace(X)
        _, new = big.trace(X)
    assert torch.equal(new[0], old[0])
    # the existing maps of layer h are unchanged (up to the conv kernel's summation order)
    torch.testing.assert_close(new[1][:, :5], old[1][:, :5], rtol=0, atol=1e-14)
    torch.testing.assert_close(new[1][:, 5:], F.conv2d(model.trace(X)[0][1], w_in, None, 2, 1))
    zero_out = copy.deepcopy(model)  # with zero outgoing weights the output is unchanged
    append_units(zero_out, 1, w_in, torch.zeros_like(w_out))
    with torch.no_grad():
        torch.testing.assert_close(zero_out(X), model(X), rtol=0, atol=1e-14)


def test_running_topk_equals_topk_of_the_concatenation():
    from nestsynth.growth.conv import RunningTopK

    gen = torch.Generator().manual_seed(0)
    chunks = [torch.randn(n, generator=gen, dtype=torch.float64) for n in (5, 1, 30, 12, 7, 40)]
    flat = torch.cat(chunks)
    for k in (1, 8, 60, 200):
        top, off = RunningTopK(k, dtype=torch.float64), 0
        for c in chunks:
            top.push(c, off)
            off += len(c)
        expected = torch.topk(flat.clamp(min=0), min(k, int((flat > 0).sum())))
        assert torch.equal(top.indices, expected.indices) and torch.equal(top.values, expected.values)


@pytest.mark.parametrize("h", [0, 1])  # next layer: a convolution (with area mask), then the linear head
def test_gradient_outgoing_weights_follow_autograd_and_lower_the_loss(h):
    from nestsynth.growth.feature_maps import _bounds, _out_shape

    model = tiny_cnn(seed=12)
    X, y = data(12, seed=13)
    density, n_cand = 0.4, 5
    w_in, w_out, stats = grow_feature_map(model, h, X, y, n_cand, density, torch.Generator().manual_seed(3),
                                          "default", out_init="gradient")
    # oracle: install the chosen kernels with zero outgoing weights and differentiate
    big = copy.deepcopy(model).eval()
    append_units(big, h, w_in, torch.zeros_like(w_out))
    nxt = big.layers[h + 1]
    nxt.mask.fill_(1.0)  # every outgoing position may be chosen
    loss = F.cross_entropy(big(X), y)
    g = torch.autograd.grad(loss, nxt.weight)[0]
    g = g[:, -1:] if nxt.weight.dim() == 4 else g[:, -model.flat_size:]
    count = max(1, round(density * g.numel()))
    top = torch.topk(g.abs().flatten(), count).indices
    assert torch.equal((w_out != 0).flatten().nonzero().flatten().sort().values, top.sort().values)
    ratio = (w_out.flatten()[top] / -g.flatten()[top])
    torch.testing.assert_close(ratio, torch.full_like(ratio, float(ratio[0])))  # parallel to -G
    assert float(ratio[0]) > 0
    assert float(w_out.flatten()[top].abs().mean()) == pytest.approx(_bounds(model, h, "default")[1] / 2)
    assert w_out.shape == _out_shape(model, h)
    # the chosen map is still the best candidate by the exact loss, and it lowers the loss
    assert brute_loss(model, h, X, y, w_in, w_out) == pytest.approx(min(stats["candidate_losses"]), rel=1e-10)
    assert stats["best_reduction"] > 0
    # the candidates' kernels are the random draws (only the outgoing weights differ)
    regen = torch.Generator().manual_seed(3)
    cands = [random_feature_map(model, h, density, regen, "default")[0] for _ in range(n_cand)]
    assert torch.equal(w_in, cands[stats["best_index"]])
