"""SNIP and GraSP: scores against brute-force / explicit-Hessian oracles, exact global selection,
and end-to-end runs on the digits data."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from nestsynth.baselines.saliency import (grasp_scores, hessian_gradient, kept_count,
                                          mean_gradient, snip_scores)
from nestsynth.errors import NestError
from nestsynth.select import keep_top_masks
from nestsynth.sparse import SparseMLP


def tiny(widths=(4, 3, 2), activations="relu", seed=0):
    """A float64 SparseMLP and a small batch (X: (8, in), y: (8,))."""
    gen = torch.Generator().manual_seed(seed)
    model = SparseMLP(list(widths), activations, generator=gen).double()
    with torch.no_grad():
        for layer in model.layers:  # larger weights than the default init: a richer Hessian
            layer.weight.mul_(3.0)
    X = torch.randn(8, widths[0], generator=gen, dtype=torch.float64)
    y = torch.randint(widths[-1], (8,), generator=gen)
    return model, X, y


def loss_of(model, X, y, T=1.0):
    return float(F.cross_entropy(model(X) / T, y))


# ---- SNIP: |dL/dc_j| by central differences on the multiplicative mask ---------------
@pytest.mark.parametrize("activations", ["relu", "tanh"])
def test_snip_scores_equal_finite_difference_of_the_mask(activations):
    model, X, y = tiny(activations=activations)
    eps = 1e-6
    fd = []
    with torch.no_grad():
        for layer in model.layers:
            d = torch.zeros_like(layer.weight)
            for j in range(layer.mask.numel()):
                layer.mask.view(-1)[j] = 1 + eps
                up = loss_of(model, X, y)
                layer.mask.view(-1)[j] = 1 - eps
                down = loss_of(model, X, y)
                layer.mask.view(-1)[j] = 1.0
                d.view(-1)[j] = (up - down) / (2 * eps)  # dL/dc_j at c = 1
            fd.append(d.abs())
    total = sum(d.sum() for d in fd)
    scores = snip_scores(model, X, y)
    assert len(scores) == 2 and scores[0].shape == (3, 4) and scores[1].shape == (2, 3)
    for s, d in zip(scores, fd):
        torch.testing.assert_close(s, d / total, rtol=1e-6, atol=1e-9)
    assert float(sum(s.sum() for s in scores)) == pytest.approx(1.0)


def test_snip_scores_leave_model_unchanged_and_chunks_average():
    """Chunked passes give the full-batch gradient; BN running stats and mode are restored."""
    model, X, y = tiny()
    full = mean_gradient(model, X, y)
    chunked = mean_gradient(model, X, y, chunk=3)  # chunks of 3, 3, 2 examples
    for a, b in zip(full, chunked):
        torch.testing.assert_close(a, b)
    bn_model = SparseMLP([4, 3, 2], "relu", batch_norm=True, generator=torch.Generator().manual_seed(1))
    bn_model.eval()
    before = {k: v.clone() for k, v in bn_model.state_dict().items()}
    snip_scores(bn_model, X.float(), y)
    grasp_scores(bn_model, X.float(), y, 5.0)
    assert not bn_model.training
    for k, v in bn_model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in bn_model.parameters())


# ---- GraSP: Hg against an explicit Hessian ---------------------------------------
def explicit_hg(model, X, y, T):
    """(g, H g) from torch.autograd.functional.hessian of the loss of the flattened weights."""
    names = [f"layers.{i}.weight" for i in range(len(model.layers))]
    shapes = [layer.weight.shape for layer in model.layers]
    sizes = [s.numel() for s in shapes]
    params = dict(model.named_parameters())

    def loss(wvec):  # (n_weights,) -> scalar; biases held fixed
        ws = [w.view(s) for w, s in zip(torch.split(wvec, sizes), shapes)]
        p = {**{k: v.detach() for k, v in params.items()}, **dict(zip(names, ws))}
        return F.cross_entropy(functional_call(model, p, (X,)) / T, y)

    w0 = torch.cat([layer.weight.detach().flatten() for layer in model.layers])
    H = torch.autograd.functional.hessian(loss, w0)  # (n, n)
    g = torch.autograd.functional.jacobian(loss, w0)  # (n,)
    return g, H @ g, w0


@pytest.mark.parametrize("activations,T", [("tanh", 1.0), ("relu", 1.0), ("tanh", 3.0)])
def test_grasp_hg_equals_explicit_hessian_times_gradient(activations, T):
    model, X, y = tiny(activations=activations, seed=2)
    g_ref, hg_ref, w0 = explicit_hg(model, X, y, T)
    assert hg_ref.abs().max() > 1e-4  # the oracle is not trivially zero
    g, hg = hessian_gradient(model, X, y, T)
    torch.testing.assert_close(torch.cat([t.flatten() for t in g]), g_ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(torch.cat([t.flatten() for t in hg]), hg_ref, rtol=1e-8, atol=1e-12)
    _, hg_chunked = hessian_gradient(model, X, y, T, chunk=3)  # mean of per-chunk H_c g
    torch.testing.assert_close(torch.cat([t.flatten() for t in hg_chunked]), hg_ref, rtol=1e-8, atol=1e-12)
    s_ref = -w0 * hg_ref
    scores = torch.cat([s.flatten() for s in grasp_scores(model, X, y, T)])
    torch.testing.assert_close(scores, s_ref / s_ref.sum().abs(), rtol=1e-8, atol=1e-12)


def test_kept_count_rounds():
    assert kept_count(2720, 0.95) == 136 and kept_count(18, 0.5) == 9 and kept_count(7, 0.0) == 7


# ---- end to end ---------------------------------------------------------------------
def make_ctx(digits, name, **mcfg):
    from nest_helpers import mlp_context
    from nestsynth.config import from_dict

    cfg = from_dict({"method": name, "train": {"batch_size": 64}, "methods": {name: mcfg}})
    return mlp_context(cfg, digits, [64, 32, 16, 10]), cfg


@pytest.mark.parametrize("name", ["snip", "grasp"])
def test_end_to_end_on_digits(digits, name):
    from nestsynth.baselines.registry import get_method

    opts = {"sparsity": 0.9, "epochs": 1, "batch_size": 100, "score_batches": 2}
    ctx, cfg = make_ctx(digits, name, **opts)
    model = get_method(name).run(ctx, getattr(cfg.methods, name))
    total = 64 * 32 + 32 * 16 + 16 * 10
    n_keep = round(total * 0.1)
    assert sum(int(layer.mask.sum()) for layer in model.layers) == n_keep
    for layer in model.layers:
        assert torch.all(layer.weight[layer.mask == 0] == 0)
    assert ctx.epochs == 1 and [r["phase"] for r in ctx.history] == ["prune", "final"]
    assert ctx.history[0]["kept"] == n_keep and ctx.history[0]["score_examples"] == 200

    # oracle: the same seed gives the same init and scoring batch; the mask is keep_top_masks of the scores
    ctx2, _ = make_ctx(digits, name, **opts)
    fresh = ctx2.dense_model()
    X, y = ctx2.batch(200)
    if name == "snip":
        scores = snip_scores(fresh, X, y, chunk=100)
    else:
        scores = grasp_scores(fresh, X, y, 200.0, chunk=100)
    expect = keep_top_masks(scores, [layer.mask for layer in fresh.layers], n_keep, largest=(name == "snip"))
    for layer, m in zip(model.layers, expect):
        assert torch.equal(layer.mask, m)
    moved = [(layer.weight - f.weight).abs()[layer.mask == 1].max()
             for layer, f in zip(model.layers, fresh.layers)]
    assert min(moved) > 0  # the kept weights were trained


def test_config_validation(digits):
    with pytest.raises(NestError, match="methods.grasp.temperature"):
        make_ctx(digits, "grasp", temperature=0.0)
    with pytest.raises(NestError, match="methods.snip.sparsity"):
        make_ctx(digits, "snip", sparsity=1.0)
