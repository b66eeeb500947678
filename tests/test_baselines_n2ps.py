"""Tests of the N2PS baseline (nestsynth.baselines.n2ps) against hand computations."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from nest_helpers import sparse_model
from nestsynth.baselines.n2ps import insignificant, mean_activations, prune_round, significance


def _hand_means(model, X):
    """Mean hidden outputs by an explicit forward pass (no model.trace), eval-mode batch norm."""
    means, h = [], X.double()
    for i, layer in enumerate(model.layers[:-1]):
        u = h @ (layer.weight.detach() * layer.mask).double().T + layer.bias.detach().double()
        if model.norms:
            bn = model.norms[i]
            u = (u - bn.running_mean.double()) / torch.sqrt(bn.running_var.double() + bn.eps)
            u = u * bn.weight.detach().double() + bn.bias.detach().double()
        h = torch.relu(u)
        means.append([sum(float(h[p, j]) for p in range(len(X))) / len(X) for j in range(h.shape[1])])
    return means


def _hand_significance(model, means, measure):
    """S_j = sum over live k of sigma(a_j w_kj) (or |a_j w_kj|), element by element."""
    out = []
    for h, a in enumerate(means):
        nxt = model.layers[h + 1]
        s = []
        for j in range(len(a)):
            total = 0.0
            for k in range(nxt.out_features):
                if nxt.mask[k, j] != 0:
                    z = a[j] * float(nxt.weight.detach()[k, j])
                    total += 1 / (1 + math.exp(-z)) if measure == "sigmoid" else abs(z)
            s.append(total)
        out.append(s)
    return out


@pytest.mark.parametrize("batch_norm", [False, True])
@pytest.mark.parametrize("measure", ["sigmoid", "abs"])
def test_significance_equals_hand_computation(batch_norm, measure):
    model = sparse_model((6, 7, 5, 3), density=0.6, seed=1, batch_norm=batch_norm)
    X = torch.randn(25, 6, generator=torch.Generator().manual_seed(2))
    means = mean_activations(model, X, chunk=7)  # several chunks
    hand_means = _hand_means(model, X)
    for m, hm in zip(means, hand_means):
        torch.testing.assert_close(m, torch.tensor(hm, dtype=torch.float64), rtol=0, atol=1e-6)
    sig = significance(model, means, measure)
    for s, hs in zip(sig, _hand_significance(model, hand_means, measure)):
        torch.testing.assert_close(s, torch.tensor(hs, dtype=torch.float64), rtol=0, atol=1e-6)


def test_round_removes_below_average_and_output_matches():
    model = sparse_model((6, 8, 6, 3), density=1.0, seed=3, batch_norm=True)
    X = torch.randn(40, 6, generator=torch.Generator().manual_seed(4))
    original = copy.deepcopy(model)
    hand = _hand_significance(model, _hand_means(model, X), "sigmoid")
    expect_removed = [[s < sum(layer) / len(layer) for s in layer] for layer in hand]

    sig, removed = prune_round(model, X, "sigmoid", 1.0, 1)
    assert [r.tolist() for r in removed] == expect_removed
    assert 0 < sum(map(sum, expect_removed)) < 14  # the toy does remove something
    kept = [len(r) - sum(r) for r in expect_removed]
    assert model.widths == [6, *kept, 3]
    # the pruned net computes the original with the removed neurons' outgoing weights cut
    with torch.no_grad():
        for h, rem in enumerate(expect_removed):
            original.layers[h + 1].weight[:, torch.tensor(rem)] = 0
    model.eval()
    original.eval()
    Xt = torch.randn(30, 6, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(model(Xt), original(Xt), rtol=0, atol=1e-6)


def test_insignificant_threshold_scale_and_min_neurons():
    sig = torch.tensor([3.0, 1.0, 2.0, 6.0], dtype=torch.float64)  # mean 3
    assert insignificant(sig).tolist() == [False, True, True, False]
    assert insignificant(sig, 0.5).tolist() == [False, True, False, False]  # threshold 1.5
    # threshold 10 * 3: all below; the 2 most significant (6 and 3) are kept
    assert insignificant(sig, 10.0, min_neurons=2).tolist() == [False, True, True, False]
    assert insignificant(sig, 10.0, min_neurons=1).tolist() == [True, True, True, False]


def _ctx(digits, **method):
    from nest_helpers import mlp_context
    from nestsynth.config import from_dict

    cfg = from_dict({"method": "n2ps", "train": {"batch_size": 64}, "methods": {"n2ps": method}})
    return cfg, mlp_context(cfg, digits, [64, 32, 16, 10])


def test_run_n2ps_on_digits(digits):
    from nestsynth.baselines.registry import get_method

    cfg, ctx = _ctx(digits, dense_epochs=1, iterations=2, retrain_epochs=1, tolerance=1.0)
    model = get_method("n2ps").run(ctx, cfg.methods.n2ps)
    prunes = [row for row in ctx.history if row["phase"] == "prune"]
    assert ctx.history[0]["phase"] == "dense" and ctx.history[-1]["phase"] == "final"
    assert len(prunes) == 2 and ctx.epochs == 3  # 1 dense + 2 rounds x 1 retraining epoch
    widths = [32, 16]
    for row in prunes:  # every round removes exactly the logged counts
        widths = [w - r for w, r in zip(widths, row["removed"])]
        assert row["neurons"] == widths and min(row["removed"]) > 0
    assert model.widths == [64, *widths, 10]
    w = model.widths
    assert model.active_weights() <= sum(a * b for a, b in zip(w[:-1], w[1:]))
    assert all(int(layer.mask.sum()) == layer.weight.numel() for layer in model.layers)


def test_run_n2ps_undoes_a_round_that_costs_accuracy(digits):
    from nestsynth.baselines.registry import get_method

    cfg, ctx = _ctx(digits, dense_epochs=1, iterations=3, retrain_epochs=1, tolerance=0.01)
    errors = iter([0.10, 0.50])  # dense reference, then the first round's retrained network
    ctx.val_error = lambda model: next(errors)
    model = get_method("n2ps").run(ctx, cfg.methods.n2ps)
    phases = [row["phase"] for row in ctx.history]
    assert phases == ["dense", "rejected", "final"]
    assert model.widths == [64, 32, 16, 10]  # the dense network is restored
    assert ctx.history[1]["rejected_val_error"] == 0.50
    assert sum(ctx.history[1]["rejected_widths"]) < 48


def test_config_validation():
    from nestsynth.config import from_dict
    from nestsynth.errors import NestError

    with pytest.raises(NestError, match="methods.n2ps.measure"):
        from_dict({"method": "n2ps", "methods": {"n2ps": {"measure": "cosine"}}})
    with pytest.raises(NestError, match="methods.n2ps.threshold_scale"):
        from_dict({"method": "n2ps", "methods": {"n2ps": {"threshold_scale": 0.0}}})
