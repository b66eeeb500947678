"""nestsynth.sparse: MaskedLinear, SparseMLP, from_sequential and shape surgery."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nest_helpers import random_mask, sparse_model
from nestsynth.errors import NestError
from nestsynth.sparse import MaskedLinear, SparseMLP, append_units, from_sequential, keep_units, set_mask


# ----------------------------------------------------------------------------- MaskedLinear


def test_masked_linear_equals_dense_linear_with_zeroed_weights():
    gen = torch.Generator().manual_seed(1)
    layer = MaskedLinear(6, 5, generator=gen)
    with torch.no_grad():
        layer.mask.copy_(random_mask(5, 6, 0.4, gen))
    dense = nn.Linear(6, 5)
    with torch.no_grad():
        dense.weight.copy_(layer.weight * layer.mask)
        dense.bias.copy_(layer.bias)

    x1 = torch.randn(7, 6, generator=gen, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    g_out = torch.randn(7, 5, generator=gen)
    y1, y2 = layer(x1), dense(x2)
    torch.testing.assert_close(y1, y2)
    (y1 * g_out).sum().backward()
    (y2 * g_out).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)
    # the masked weight's gradient is the dense one, masked
    torch.testing.assert_close(layer.weight.grad, dense.weight.grad * layer.mask)
    assert float(layer.weight.grad[layer.mask == 0].abs().sum()) == 0.0
    # counts
    assert layer.active_connections() == int(layer.mask.sum())
    assert layer.active_weights() == int(torch.count_nonzero(dense.weight))


# ----------------------------------------------------------------------------- from_sequential


def _fill_bn(bn: nn.BatchNorm1d, gen: torch.Generator) -> None:
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1, generator=gen)
        bn.running_var.uniform_(0.5, 2.0, generator=gen)
        bn.weight.uniform_(0.5, 1.5, generator=gen)
        bn.bias.uniform_(-0.5, 0.5, generator=gen)


def test_from_sequential_matches_sequential():
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    model = from_sequential(seq)
    assert model.widths == [6, 5, 4, 3]
    assert model.activation_specs == ["relu", "tanh"]
    assert all(bool(layer.mask.all()) for layer in model.layers)
    x = torch.randn(9, 6)
    torch.testing.assert_close(model(x), seq(x))
    torch.testing.assert_close(model(x.view(9, 2, 3)), seq(x))


def test_from_sequential_with_batchnorm_eval_matches():
    torch.manual_seed(1)
    gen = torch.Generator().manual_seed(1)
    seq = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.LeakyReLU(0.2),
                        nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3, bias=False))
    _fill_bn(seq[1], gen)
    _fill_bn(seq[4], gen)
    seq.eval()
    model = from_sequential(seq).eval()
    assert model.batch_norm and model.widths == [6, 5, 4, 3]
    x = torch.randn(8, 6)
    torch.testing.assert_close(model(x), seq(x))
    assert float(model.layers[2].bias.detach().abs().sum()) == 0.0  # bias=False -> zero bias


@pytest.mark.parametrize("bad", [
    nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5), nn.ReLU(), nn.Linear(3, 2)),
    nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Linear(3, 2)),
    nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)),             # no activation in between
    nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(5, 2)),  # does not chain
    nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2), nn.ReLU()),  # activation after last
])
def test_from_sequential_rejects_unsupported(bad):
    with pytest.raises(NestError):
        from_sequential(bad)


def test_from_sequential_batchnorm_after_activation_same_function_or_error():
    gen = torch.Generator().manual_seed(2)
    torch.manual_seed(2)
    seq = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.BatchNorm1d(3), nn.Linear(3, 2))
    _fill_bn(seq[2], gen)
    seq.eval()
    x = torch.randn(6, 4)
    try:
        model = from_sequential(seq).eval()
    except NestError:
        return  # refusing the irregular order is fine too
    torch.testing.assert_close(model(x), seq(x))


# ----------------------------------------------------------------------------- surgery


def _adam_with_state(model, seed=0):
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.randn(10, model.widths[0], generator=torch.Generator().manual_seed(seed))
    y = torch.arange(10) % model.widths[-1]
    model.train()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    return opt, x, y


def _check_state_shapes(model, opt):
    for p in model.parameters():
        st = opt.state[p]
        for key in ("exp_avg", "exp_avg_sq"):
            assert st[key].shape == p.shape, key


def test_append_units_forward_equals_hand_computation():
    model = sparse_model((3, 2, 2), density=0.7, seed=3)
    model.eval()
    old = copy.deepcopy(model)
    w_in = torch.tensor([[0.5, 0.0, -1.0]])          # new neuron's inputs
    w_out = torch.tensor([[2.0], [0.0]])             # feeds output 0 only
    bias = torch.tensor([0.25])
    append_units(model, 0, w_in, w_out, bias=bias)
    assert model.widths == [3, 3, 2]
    assert model.layers[0].mask[2].tolist() == [1.0, 0.0, 1.0]
    assert model.layers[1].mask[:, 2].tolist() == [1.0, 0.0]

    x = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.5, -2.0]])
    new_h = torch.relu(x @ w_in.T + bias)            # (2, 1)
    expected = old(x) + new_h @ w_out.T
    torch.testing.assert_close(model(x), expected)
    # by hand for the first sample: relu(0.5 - 3 + 0.25) = 0 -> output unchanged
    torch.testing.assert_close(model(x)[0], old(x)[0])
    # second sample: relu(-0.5 + 2 + 0.25) = 1.75 -> output 0 moves by 3.5
    torch.testing.assert_close(model(x)[1] - old(x)[1], torch.tensor([3.5, 0.0]))


def test_append_units_with_batchnorm_new_entries_are_identity():
    model = sparse_model((4, 3, 2), seed=4, batch_norm=True).eval()
    old = copy.deepcopy(model)
    w_in = torch.tensor([[1.0, 0.0, 0.0, -1.0]])
    w_out = torch.tensor([[1.0], [-2.0]])
    append_units(model, 0, w_in, w_out)
    bn = model.norms[0]
    assert bn.num_features == 4 and bn.running_mean[3] == 0 and bn.running_var[3] == 1
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    h = torch.relu((x @ w_in.T) / torch.sqrt(torch.tensor(1.0 + bn.eps)))
    torch.testing.assert_close(model(x), old(x) + h @ w_out.T)


def test_keep_units_dropping_neurons_without_outputs_keeps_function():
    for bn in (False, True):
        model = sparse_model((6, 5, 4, 3), seed=5, batch_norm=bn).eval()
        with torch.no_grad():  # neurons 1 and 3 of hidden layer 0 feed nothing
            model.layers[1].mask[:, [1, 3]] = 0
            model.zero_dormant()
        x = torch.randn(11, 6, generator=torch.Generator().manual_seed(1))
        before = model(x)
        keep_units(model, 0, torch.tensor([0, 2, 4]))
        assert model.widths == [6, 3, 4, 3]
        assert model.layers[0].weight.shape == (3, 6) and model.layers[1].mask.shape == (4, 3)
        if bn:
            assert model.norms[0].num_features == 3 and model.norms[0].running_var.shape == (3,)
        torch.testing.assert_close(model(x), before)


def test_append_units_resizes_adam_state_and_step_works():
    model = sparse_model((6, 5, 4, 3), seed=6, batch_norm=True)
    opt, x, y = _adam_with_state(model)
    w0 = model.layers[1].weight
    old_m = opt.state[w0]["exp_avg"].clone()
    old_b = opt.state[model.layers[1].bias]["exp_avg_sq"].clone()
    old_next = opt.state[model.layers[2].weight]["exp_avg"].clone()
    gen = torch.Generator().manual_seed(0)
    w_in = torch.randn(2, 5, generator=gen)
    w_out = torch.randn(3, 2, generator=gen)
    append_units(model, 1, w_in, w_out, optimizer=opt)
    assert model.layers[1].weight is w0                      # identity kept
    _check_state_shapes(model, opt)
    st = opt.state[w0]["exp_avg"]
    torch.testing.assert_close(st[:4], old_m)
    assert float(st[4:].abs().sum()) == 0.0
    torch.testing.assert_close(opt.state[model.layers[1].bias]["exp_avg_sq"][:4], old_b)
    torch.testing.assert_close(opt.state[model.layers[2].weight]["exp_avg"][:, :4], old_next)
    assert float(opt.state[model.layers[2].weight]["exp_avg"][:, 4:].abs().sum()) == 0.0
    F.cross_entropy(model(x), y).backward()
    opt.step()                                               # shapes agree -> no error
    _check_state_shapes(model, opt)


def test_keep_units_resizes_adam_state_and_step_works():
    model = sparse_model((6, 5, 4, 3), seed=7, batch_norm=True)
    opt, x, y = _adam_with_state(model)
    keep = torch.tensor([0, 3, 4])
    exp_rows = opt.state[model.layers[0].weight]["exp_avg"].index_select(0, keep)
    exp_cols = opt.state[model.layers[1].weight]["exp_avg_sq"].index_select(1, keep)
    exp_bn = opt.state[model.norms[0].weight]["exp_avg"].index_select(0, keep)
    keep_units(model, 0, keep, optimizer=opt)
    _check_state_shapes(model, opt)
    torch.testing.assert_close(opt.state[model.layers[0].weight]["exp_avg"], exp_rows)
    torch.testing.assert_close(opt.state[model.layers[1].weight]["exp_avg_sq"], exp_cols)
    torch.testing.assert_close(opt.state[model.norms[0].weight]["exp_avg"], exp_bn)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    _check_state_shapes(model, opt)


def test_surgery_resizes_sgd_momentum_and_fresh_optimizer():
    model = sparse_model((6, 5, 4, 3), seed=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(10, 6, generator=torch.Generator().manual_seed(0))
    y = torch.arange(10) % 3
    F.cross_entropy(model(x), y).backward()
    opt.step()
    buf = opt.state[model.layers[0].weight]["momentum_buffer"].clone()
    append_units(model, 0, torch.ones(1, 6), torch.ones(4, 1), optimizer=opt)
    keep_units(model, 0, torch.tensor([0, 2, 5]), optimizer=opt)
    for p in model.parameters():
        assert opt.state[p]["momentum_buffer"].shape == p.shape
    torch.testing.assert_close(opt.state[model.layers[0].weight]["momentum_buffer"][:2], buf[[0, 2]])
    assert float(opt.state[model.layers[0].weight]["momentum_buffer"][2].abs().sum()) == 0.0
    F.cross_entropy(model(x), y).backward()
    opt.step()
    # an optimizer without state yet simply works after surgery
    fresh_model = sparse_model((6, 5, 3), seed=11)
    fresh = torch.optim.Adam(fresh_model.parameters())
    append_units(fresh_model, 0, torch.ones(2, 6), torch.ones(3, 2), optimizer=fresh)
    F.cross_entropy(fresh_model(x), y).backward()
    fresh.step()
    _check_state_shapes(fresh_model, fresh)


def test_set_mask_zeroes_weights_and_moments_at_changed_positions():
    model = sparse_model((6, 5, 3), density=0.5, seed=8)
    opt, _, _ = _adam_with_state(model)
    layer = model.layers[0]
    old_mask = layer.mask.clone()
    old_w = layer.weight.detach().clone()
    m_old = opt.state[layer.weight]["exp_avg"].clone()
    v_old = opt.state[layer.weight]["exp_avg_sq"].clone()
    new = old_mask.clone()
    on = (old_mask == 1).nonzero()[:3]
    off = (old_mask == 0).nonzero()[:3]
    new[on[:, 0], on[:, 1]] = 0
    new[off[:, 0], off[:, 1]] = 1
    changed = new != old_mask
    set_mask(layer, new, opt)
    assert torch.equal(layer.mask, new)
    torch.testing.assert_close(layer.weight.detach(), old_w * new)
    assert float(layer.weight.detach()[new == 0].abs().sum()) == 0.0
    for key, old in (("exp_avg", m_old), ("exp_avg_sq", v_old)):
        st = opt.state[layer.weight][key]
        assert float(st[changed].abs().sum()) == 0.0
        torch.testing.assert_close(st[~changed], old[~changed])
    assert float(m_old[changed].abs().sum()) > 0  # the test is not vacuous


def test_sparse_mlp_counts_and_effective_weight():
    model = sparse_model((6, 5, 4, 3), seed=9, batch_norm=True)
    with torch.no_grad():
        r, c = model.layers[0].mask.bool().nonzero()[0].tolist()
        model.layers[0].weight[r, c] = 0.0  # live connection with a zero weight is not counted
    expected = [int(torch.count_nonzero(layer.weight * layer.mask)) for layer in model.layers]
    assert model.active_per_layer() == expected
    assert model.active_weights() == sum(expected)
    assert expected[0] == int(model.layers[0].mask.sum()) - 1
    bn = model.norms[1]
    torch.testing.assert_close(model.effective_weight(1),
                               model.layers[1].weight.detach() / torch.sqrt(bn.running_var + bn.eps)[:, None])
    torch.testing.assert_close(model.effective_weight(2), model.layers[2].weight.detach())
    # arch round trip rebuilds the same module
    rebuilt = SparseMLP.from_arch(model.arch())
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randn(4, 6)
    model.eval(), rebuilt.eval()
    torch.testing.assert_close(rebuilt(x), model(x))


def test_warm_set_mask_gives_grown_connections_the_mean_second_moment():
    g = torch.Generator().manual_seed(0)
    model = SparseMLP([6, 5, 3], "relu", generator=g)
    with torch.no_grad():
        model.layers[0].mask.copy_(random_mask(5, 6, 0.5, g))
        model.zero_dormant()
    opt, _, _ = _adam_with_state(model)
    layer = model.layers[0]
    v_before = opt.state[layer.weight]["exp_avg_sq"].clone()
    old = layer.mask.bool()
    new_mask = layer.mask.clone()
    new_mask[0, :] = 1  # grow row 0
    new_mask[4, 0] = 0 if old[4, 0] else 1
    changed = new_mask.bool() != old
    grown = changed & new_mask.bool()
    kept = ~changed & (v_before > 0)
    hand = float(v_before[kept].sum() / kept.sum())  # oracle: mean over the untouched trained entries
    set_mask(layer, new_mask, opt, warm=True)
    v = opt.state[layer.weight]["exp_avg_sq"]
    assert torch.allclose(v[grown], torch.full_like(v[grown], hand))
    assert torch.equal(v[~changed], v_before[~changed])
    assert bool((v[changed & ~new_mask.bool()] == 0).all())  # pruned: zero
    assert bool((opt.state[layer.weight]["exp_avg"][changed] == 0).all())  # first moment: zero
    set_mask(layer, layer.mask * 0 + 1, opt)  # without warm: zero, as before
    assert bool((opt.state[layer.weight]["exp_avg_sq"][~new_mask.bool()] == 0).all())


def test_warm_append_units_gives_new_weights_the_mean_second_moment():
    g = torch.Generator().manual_seed(1)
    model = SparseMLP([6, 5, 3], "relu", generator=g)
    opt, _, _ = _adam_with_state(model)
    v_in = opt.state[model.layers[0].weight]["exp_avg_sq"].clone()
    v_b = opt.state[model.layers[0].bias]["exp_avg_sq"].clone()
    v_out = opt.state[model.layers[1].weight]["exp_avg_sq"].clone()
    w_in = torch.randn(2, 6, generator=g)
    w_in[1, :3] = 0  # dormant incoming positions stay at zero state
    w_out = torch.randn(3, 2, generator=g)
    append_units(model, 0, w_in, w_out, opt, warm=True)
    vi = opt.state[model.layers[0].weight]["exp_avg_sq"]
    assert torch.allclose(vi[5:][w_in != 0], torch.full((9,), float(v_in[v_in > 0].mean())))
    assert bool((vi[5:][w_in == 0] == 0).all()) and torch.equal(vi[:5], v_in)
    vb = opt.state[model.layers[0].bias]["exp_avg_sq"]
    assert torch.allclose(vb[5:], torch.full((2,), float(v_b[v_b > 0].mean())))
    vo = opt.state[model.layers[1].weight]["exp_avg_sq"]
    assert torch.allclose(vo[:, 5:], torch.full((3, 2), float(v_out[v_out > 0].mean())))
    assert bool((opt.state[model.layers[1].weight]["exp_avg"][:, 5:] == 0).all())
    opt.step()  # the optimizer still works on the grown tensors
