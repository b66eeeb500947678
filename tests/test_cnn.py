"""The sparse CNN: masked convolution oracles, layout, conversion and shape surgery."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nestsynth.errors import NestError
from nestsynth.sparse import MaskedConv2d, SparseCNN, append_units, cnn_from_sequential, keep_units, model_from_arch
from nest_helpers import randomize_bn, randomize_masks

CONV = [{"out": 4, "kernel": 3, "padding": 1, "pool": "max:2:2"}, {"out": 5, "kernel": 3, "pool": "avg:2:2"}]
FC = [{"out": 7}, {"out": 3}]


def tiny(batch_norm=False, seed=0) -> SparseCNN:
    gen = torch.Generator().manual_seed(seed)
    model = SparseCNN((2, 10, 10), CONV, FC, batch_norm, generator=gen)
    randomize_masks(model, gen, 0.6)
    randomize_bn(model, gen, bias=None)
    return model.eval()


def test_masked_conv_equals_dense_conv_with_zeroed_weights_and_outputs():
    gen = torch.Generator().manual_seed(1)
    layer = MaskedConv2d(3, 4, 3, (6, 6), stride=1, padding=0, generator=gen)
    with torch.no_grad():
        layer.mask.copy_((torch.rand(layer.mask.shape, generator=gen) < 0.5).float())
        layer.area.copy_((torch.rand(layer.area.shape, generator=gen) < 0.7).float())
    x = torch.randn(2, 3, 8, 8, generator=gen)
    dense = nn.Conv2d(3, 4, 3)
    with torch.no_grad():
        dense.weight.copy_(layer.weight * layer.mask)
        dense.bias.copy_(layer.bias)
    expected = dense(x) * layer.area  # the masked outputs zeroed
    torch.testing.assert_close(layer(x), expected)
    assert layer.active_connections() == int(layer.mask.sum())
    assert layer.conv_pct() == pytest.approx(100 * float(layer.area.mean()))


def test_layout_widths_and_arch_round_trip():
    model = tiny()
    # 10x10 -pad1 conv-> 10x10 -pool-> 5x5 -conv3-> 3x3 -avgpool2-> 1x1
    assert model.conv_hw == [(10, 10), (3, 3)] and model.flat_hw == (1, 1)
    assert model.widths == [2, 4, 5, 7, 3] and model.layers[2].in_features == 5
    x = torch.randn(3, 2, 10, 10)
    copy = model_from_arch(model.arch())
    copy.load_state_dict(model.state_dict())
    assert torch.equal(copy.eval()(x), model(x))
    inputs, outputs = model.trace(x)
    assert [tuple(t.shape[1:]) for t in inputs] == [(2, 10, 10), (4, 5, 5), (5,), (7,)]
    assert torch.equal(outputs[-1], model(x))


def test_from_sequential_computes_the_same_function():
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Tanh(), nn.Flatten(),
                        nn.Linear(4 * 2 * 2, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.1), nn.Linear(6, 2))
    seq.eval()
    model = cnn_from_sequential(seq, (1, 8, 8)).eval()
    x = torch.randn(5, 1, 8, 8)
    torch.testing.assert_close(model(x), seq(x))
    with pytest.raises(NestError, match="Linear expects"):
        cnn_from_sequential(seq, (1, 10, 10))
    with pytest.raises(NestError, match="LSTM"):
        cnn_from_sequential(nn.Sequential(nn.Conv2d(1, 2, 3), nn.LSTM(2, 2)), (1, 8, 8))


def test_effective_weight_is_hand_folded_bn():
    model = tiny(batch_norm=True)
    bn = model.norms[0]
    w = model.layers[0].weight.detach() * model.layers[0].mask
    hand = w / torch.sqrt(bn.running_var + bn.eps).view(-1, 1, 1, 1)
    torch.testing.assert_close(model.effective_weight(0), hand)
    # folding (affine included) reproduces the BN output
    x = torch.randn(2, 2, 10, 10)
    W, b = model.folded_layer(0)
    torch.testing.assert_close(F.conv2d(x, W, b, 1, 1), bn(model.layers[0](x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("h", [0, 1])
def test_keep_units_equals_zeroing_the_removed_maps(h):
    model = tiny(batch_norm=True, seed=3)
    x = torch.randn(4, 2, 10, 10)
    keep = torch.tensor([0, 2, 3]) if h == 0 else torch.tensor([1, 4])
    removed = [c for c in range(model.widths[h + 1]) if c not in keep.tolist()]
    # oracle: the same model with the removed maps' outgoing connections switched off
    oracle = model_from_arch(model.arch())
    oracle.load_state_dict(model.state_dict())
    oracle.eval()
    with torch.no_grad():
        nxt = oracle.layers[h + 1]
        if h == 0:
            nxt.mask[:, removed] = 0
        else:  # conv -> flattened linear: channel c is columns c*HW .. c*HW + HW - 1
            hw = oracle.flat_size
            for c in removed:
                nxt.mask[:, c * hw:(c + 1) * hw] = 0
        oracle.zero_dormant()
    keep_units(model, h, keep)
    assert model.widths[h + 1] == len(keep)
    assert model.layers[h].area.shape[0] == len(keep) and model.norms[h].num_features == len(keep)
    torch.testing.assert_close(model(x), oracle(x))


def test_append_feature_maps_then_remove_them_restores_the_function():
    model = tiny(seed=4)
    x = torch.randn(2, 2, 10, 10)
    before = model(x)
    k = 2
    w_in = torch.randn(k, 2, 3, 3)
    w_out = torch.randn(5, k, 3, 3)
    append_units(model, 0, w_in, w_out)
    assert model.widths == [2, 6, 5, 7, 3] and model.layers[0].area.shape == (6, 10, 10)
    assert model.layers[1].mask[:, 4:].sum() == (w_out != 0).sum()
    assert not torch.allclose(model(x), before)
    keep_units(model, 0, torch.arange(4))
    torch.testing.assert_close(model(x), before)
    # before the flatten: the next layer gets k * flat_size new columns
    append_units(model, 1, torch.randn(k, 4, 3, 3), torch.randn(7, k * model.flat_size))
    assert model.layers[2].in_features == 7 * model.flat_size
