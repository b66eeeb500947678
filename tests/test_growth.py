"""nestsynth.growth: gradient scores (Policy 1 / Eq. 1), connection growth, Algorithm 1."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from nest_helpers import random_mask, sparse_model
from nestsynth.growth import (bridge_neuron, connections_to_grow, gradient_scan, grow_connections,
                              grow_connections_global, grow_neurons)
from nestsynth.seeds import make_seed
from nestsynth.sparse import set_mask


def _data(n=23, d=6, classes=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen), torch.randint(classes, (n,), generator=gen)


# ----------------------------------------------------------------------------- scores


@pytest.mark.parametrize("batch_norm", [False, True])
@pytest.mark.parametrize("batch_size", [2048, 5])
def test_gradient_scan_equals_autograd_on_unmasked_copy(batch_norm, batch_size):
    model = sparse_model((6, 5, 4, 3), density=0.4, seed=1, batch_norm=batch_norm)
    X, y = _data()
    scan = gradient_scan(model, X, y, batch_size=batch_size)
    assert scan.samples == len(X)

    dense = copy.deepcopy(model).eval()
    for layer in dense.layers:
        layer.mask.fill_(1.0)  # weights already zero where the original mask was 0
    F.cross_entropy(dense(X), y).backward()

    masked = copy.deepcopy(model).eval()
    F.cross_entropy(masked(X), y).backward()
    for i, (g, dl, ml) in enumerate(zip(scan.grads, dense.layers, masked.layers)):
        torch.testing.assert_close(g, dl.weight.grad, rtol=1e-5, atol=1e-6)
        dormant = model.layers[i].mask == 0
        assert bool(dormant.any())
        # the masked weight's own gradient is zero at dormant positions; the scan's is not
        assert float(ml.weight.grad[dormant].abs().sum()) == 0.0
        assert float(g[dormant].abs().max()) > 1e-4  # (dead ReLUs give exact zeros elsewhere)
        assert not torch.allclose(g, ml.weight.grad)
        torch.testing.assert_close(ml.weight.grad, g * model.layers[i].mask, rtol=1e-5, atol=1e-6)


def _forward_with_bridge(model, X, h, Wb):
    """The model's eval computation written out by hand, plus a direct connection Wb from
    the input of layer h to the pre-activation output of layer h + 1."""
    x = X
    x_h = None
    for i, layer in enumerate(model.layers):
        if i == h:
            x_h = x
        u = F.linear(x, layer.weight * layer.mask, layer.bias)
        if i == h + 1:
            u = u + x_h @ Wb.T
        if i < model.n_hidden:
            if model.norms:
                bn = model.norms[i]
                u = (u - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
            u = model.acts[i](u)
        x = u
    return x


@pytest.mark.parametrize("batch_norm", [False, True])
def test_bridging_gradient_equals_autograd_of_direct_connection(batch_norm):
    model = sparse_model((6, 5, 4, 3), density=0.5, seed=2, batch_norm=batch_norm).eval()
    X, y = _data(seed=1)
    scan = gradient_scan(model, X, y, batch_size=7)
    assert len(scan.bridges) == model.n_hidden
    for h in range(model.n_hidden):
        Wb = torch.zeros(model.layers[h + 1].out_features, model.layers[h].in_features, requires_grad=True)
        out = _forward_with_bridge(model, X, h, Wb)
        torch.testing.assert_close(out, model(X))  # the hand-built forward is the model's
        F.cross_entropy(out, y).backward()
        assert scan.bridges[h].shape == Wb.shape
        torch.testing.assert_close(scan.bridges[h], Wb.grad, rtol=1e-5, atol=1e-6)


def test_gradient_scan_restores_training_mode():
    model = sparse_model(seed=3, batch_norm=True)
    model.train()
    X, y = _data()
    gradient_scan(model, X, y, bridges=False)
    assert model.training


# ----------------------------------------------------------------------------- connection growth


def _brute_force_topk(scores, mask, k):
    cand = [(float(s), idx) for idx, (s, m) in enumerate(zip(scores.flatten().tolist(), mask.flatten().tolist()))
            if m == 0 and s > 0]
    cand.sort(reverse=True)
    return {idx for _, idx in cand[:k]}


@pytest.mark.parametrize("k", [0, 1, 4, 9, 1000])
def test_grow_connections_brute_force(k):
    gen = torch.Generator().manual_seed(k)
    mask = random_mask(5, 6, 0.4, gen)
    scores = torch.rand(5, 6, generator=gen)
    scores[0, :3] = 0.0                         # zero scores are never grown
    scores[mask.bool()] += 10.0                 # live connections with huge scores stay as they are
    new = grow_connections(scores, mask, k)
    assert bool((new >= mask).all())            # never removes a live connection
    added = {i for i, (a, b) in enumerate(zip(mask.flatten().tolist(), new.flatten().tolist())) if b > a}
    expected = _brute_force_topk(scores, mask, k)
    assert added == expected
    n_pos = int(((scores > 0) & (mask == 0)).sum())
    assert len(added) == min(k, n_pos)
    assert not any(scores.flatten()[i] == 0 for i in added)
    assert set(new.unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("k", [3, 17, 10_000])
def test_grow_connections_global_brute_force(k):
    gen = torch.Generator().manual_seed(100 + k)
    shapes = [(5, 6), (4, 5), (3, 4)]
    masks = [random_mask(o, i, 0.3, gen) for o, i in shapes]
    scores = [torch.rand(o, i, generator=gen) * (j + 1) for j, (o, i) in enumerate(shapes)]
    scores[1][:, 0] = 0.0
    new = grow_connections_global(scores, masks, k)
    flat_s = torch.cat([s.flatten() for s in scores])
    flat_m = torch.cat([m.flatten() for m in masks])
    flat_n = torch.cat([n.flatten() for n in new])
    assert bool((flat_n >= flat_m).all())
    added = set((flat_n > flat_m).nonzero().flatten().tolist())
    assert added == _brute_force_topk(flat_s, flat_m, k)
    assert len(added) == min(k, int(((flat_s > 0) & (flat_m == 0)).sum()))
    for n, m in zip(new, masks):
        assert n.shape == m.shape


def test_connections_to_grow():
    assert connections_to_grow(784, 300, 0.02) == 4704
    assert connections_to_grow(6, 5, 0.1) == 3


def _mean_loss(model, X, y):
    with torch.no_grad():
        return float(F.cross_entropy(model.eval()(X), y))


def test_growing_largest_gradients_reduces_loss_most():
    X, y = _data(n=64, d=8, classes=3, seed=5)
    model = make_seed([8, 10, 3], 1.0, 0.2, torch.Generator().manual_seed(5))
    scan = gradient_scan(model, X, y, bridges=False)
    eta, k = 0.05, 6
    before = _mean_loss(model, X, y)

    def grow_and_step(new_masks):
        m = copy.deepcopy(model)
        predicted = 0.0
        for layer, g, new in zip(m.layers, scan.grads, new_masks):
            grown = (new == 1) & (layer.mask == 0)
            set_mask(layer, new)
            with torch.no_grad():
                layer.weight[grown] = -eta * g[grown]  # one gradient step on the new connections
            predicted += eta * float((g[grown] ** 2).sum())
        return predicted, _mean_loss(m, X, y)

    top = grow_connections_global([g.abs() for g in scan.grads], [l.mask for l in model.layers], k)
    # k random dormant connections (fixed generator)
    gen = torch.Generator().manual_seed(0)
    flat_dormant = torch.cat([(l.mask == 0).flatten() for l in model.layers]).nonzero().flatten()
    pick = flat_dormant[torch.randperm(len(flat_dormant), generator=gen)[:k]]
    chosen = torch.zeros(sum(l.mask.numel() for l in model.layers), dtype=torch.bool)
    chosen[pick] = True
    rand, start = [], 0
    for l in model.layers:
        n = l.mask.numel()
        rand.append(torch.maximum(l.mask, chosen[start:start + n].view_as(l.mask).float()))
        start += n
    assert sum(int(n.sum() - l.mask.sum()) for n, l in zip(top, model.layers)) == k
    pred_top, after_top = grow_and_step(top)
    pred_rand, after_rand = grow_and_step(rand)
    assert pred_top > pred_rand > 0
    assert after_top < before
    assert before - after_top > before - after_rand
    # first-order prediction matches the actual decrease for a small step
    assert before - after_top == pytest.approx(pred_top, rel=0.1)


# ----------------------------------------------------------------------------- Algorithm 1

G_HAND = torch.tensor([[0.5, -4.0, 0.09], [-1.0, 0.25, 2.25]])
W_IN_REF = torch.tensor([[1.0, 0.0, -3.0], [0.0, 0.0, 0.0]])    # avg |non-zero| = 2
W_OUT_REF = torch.tensor([[0.5, 0.0], [0.0, -1.5], [0.0, 0.0]])  # avg |non-zero| = 1


def _signs(seed, k):
    return (torch.randint(0, 2, (k,), generator=torch.Generator().manual_seed(seed)) * 2 - 1).tolist()


@pytest.mark.parametrize("sign", ["descent", "paper"])
def test_bridge_neuron_hand_computed(sign):
    beta, alpha = 1 / 3, 0.5  # round(1/3 * 6) = 2 pairs: |G| = 4 at (0,1), 2.25 at (1,2)
    w_in, w_out, pairs = bridge_neuron(G_HAND, beta, alpha, W_IN_REF, W_OUT_REF,
                                       torch.Generator().manual_seed(7), sign=sign)
    r0, r1 = _signs(7, 2)  # drawn in |G| order
    # square-root rule: dw = sqrt|G| * r; w_out[m] += dw; w_in[n] += dw * s(G)
    s = -1.0 if sign == "descent" else 1.0
    out_raw = [2.0 * r0, 1.5 * r1]
    in_raw = [0.0, 2.0 * r0 * s * (-1.0), 1.5 * r1 * s * (+1.0)]
    # birth strength: alpha * avg|W_ref| / avg|w|, avg over non-zeros (both 1.75 here)
    out_exp = [v * alpha * 1.0 / 1.75 for v in out_raw]
    in_exp = [v * alpha * 2.0 / 1.75 for v in in_raw]
    torch.testing.assert_close(w_out, torch.tensor(out_exp))
    torch.testing.assert_close(w_in, torch.tensor(in_exp))
    assert pairs.tolist() == [[False, True, False], [False, False, True]]
    # the bridged path moves u_m along -G (descent) or +G (paper)
    for m, n in ((0, 1), (1, 2)):
        assert math.copysign(1, float(w_out[m] * w_in[n])) == s * math.copysign(1, float(G_HAND[m, n]))


def test_bridge_neuron_shared_input_accumulates():
    G = torch.tensor([[3.0, 0.1], [-2.0, 0.2]])  # top-2 pairs share input n = 0
    ref = torch.tensor([[2.0]])
    w_in, w_out, pairs = bridge_neuron(G, 0.5, 1.0, ref, ref, torch.Generator().manual_seed(3))
    r0, r1 = _signs(3, 2)
    raw_out = torch.tensor([math.sqrt(3) * r0, math.sqrt(2) * r1])
    raw_in0 = math.sqrt(3) * r0 * (-1.0) + math.sqrt(2) * r1 * (+1.0)
    torch.testing.assert_close(w_out, raw_out * 2.0 / raw_out.abs().mean())
    torch.testing.assert_close(w_in, torch.tensor([math.copysign(2.0, raw_in0), 0.0]))
    assert pairs.tolist() == [[True, False], [True, False]]


def test_bridge_neuron_exclude_and_zero_gradients():
    ex = torch.zeros(2, 3, dtype=torch.bool)
    ex[0, 1] = True
    _, _, pairs = bridge_neuron(G_HAND, 1 / 3, 0.5, W_IN_REF, W_OUT_REF, torch.Generator().manual_seed(0), ex)
    assert pairs.tolist() == [[False, False, False], [True, False, True]]  # next in |G| order: 2.25, 1.0
    w_in, w_out, pairs = bridge_neuron(torch.zeros(2, 3), 0.5, 0.5, W_IN_REF, W_OUT_REF,
                                       torch.Generator().manual_seed(0))
    assert not pairs.any() and float(w_in.abs().sum()) == 0 and float(w_out.abs().sum()) == 0


def test_bridge_neuron_pair_count_is_ceil_as_documented():
    _, _, pairs = bridge_neuron(G_HAND, 0.2, 0.5, W_IN_REF, W_OUT_REF, torch.Generator().manual_seed(0))
    assert int(pairs.sum()) == math.ceil(0.2 * 6)


def test_bridge_neuron_descent_sign_lowers_loss_paper_sign_raises_it():
    """Eq. 2-6: with tanh (f(x) ~ x) a small bridged neuron changes u along -G for "descent"."""
    model = sparse_model((6, 5, 3), density=0.6, seed=4, activations="tanh").eval()
    X, y = _data(n=40, seed=4)
    G = gradient_scan(model, X, y).bridges[0]
    before = _mean_loss(model, X, y)
    losses = {}
    for sign in ("descent", "paper"):
        m = copy.deepcopy(model)
        w_in, w_out = grow_neurons(G, 1, 1 / G.numel(), 0.05, m.effective_weight(0), m.effective_weight(1),
                                   torch.Generator().manual_seed(1), sign)
        from nestsynth.sparse import append_units
        append_units(m, 0, w_in, w_out)
        losses[sign] = _mean_loss(m, X, y)
    assert losses["descent"] < before < losses["paper"]


def test_grow_neurons_bridges_disjoint_pair_sets():
    beta, alpha = 1 / 3, 0.5
    w_in, w_out = grow_neurons(G_HAND, 2, beta, alpha, W_IN_REF, W_OUT_REF, torch.Generator().manual_seed(11))
    assert w_in.shape == (2, 3) and w_out.shape == (2, 2)
    # oracle: Algorithm 1 twice on the same generator, the second excluding the first's pairs
    gen = torch.Generator().manual_seed(11)
    a_in, a_out, a_pairs = bridge_neuron(G_HAND, beta, alpha, W_IN_REF, W_OUT_REF, gen)
    b_in, b_out, b_pairs = bridge_neuron(G_HAND, beta, alpha, W_IN_REF, W_OUT_REF, gen, a_pairs)
    torch.testing.assert_close(w_in, torch.stack([a_in, b_in]))
    torch.testing.assert_close(w_out, torch.stack([a_out, b_out], dim=1))
    # by hand: ranks 1-2 (|G| 4, 2.25) then ranks 3-4 (|G| 1, 0.5), disjoint
    assert a_pairs.tolist() == [[False, True, False], [False, False, True]]
    assert b_pairs.tolist() == [[True, False, False], [True, False, False]]
    assert not (a_pairs & b_pairs).any()
    assert (w_in[0] != 0).tolist() == [False, True, True] and (w_out[:, 0] != 0).tolist() == [True, True]
    assert (w_in[1] != 0).tolist() == [True, False, False] and (w_out[:, 1] != 0).tolist() == [True, True]
    # six pairs, two per neuron: a fourth neuron has nothing left and is dropped
    w_in4, w_out4 = grow_neurons(G_HAND, 4, beta, alpha, W_IN_REF, W_OUT_REF, torch.Generator().manual_seed(11))
    assert w_in4.shape == (3, 3) and w_out4.shape == (2, 3)
