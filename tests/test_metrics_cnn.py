"""nestsynth.metrics for SparseCNN: conv FLOPs with partial areas, Act% of feature maps,
activation-aware FLOPs, dense reference counts (paper Table 2 / Tables 4(b), 5, 6)."""

from __future__ import annotations

import pytest
import torch

from nestsynth.metrics import (activation_density, conv_flops, conv_macs, dense_flops, layer_flops,
                               layer_table, reference_flops, reference_weights, totals)
from nestsynth.registry import get_model
from nestsynth.sparse import SparseCNN, SparseMLP

CONV = [{"out": 3, "kernel": 3, "padding": 1, "pool": "max:2:2"}, {"out": 4, "kernel": 2, "stride": 2}]
FC = [{"out": 5}, {"out": 3}]


def masked_cnn(seed: int = 0) -> SparseCNN:
    """(2, 6, 6) -> conv 3x3 pad 1 (6x6) -> max pool 2 (3x3) -> conv 2x2 stride 2 (1x1) -> fc 5 -> fc 3,
    random kernel, area and fc masks, and one active weight set to exactly zero."""
    gen = torch.Generator().manual_seed(seed)
    model = SparseCNN((2, 6, 6), CONV, FC, generator=gen)
    with torch.no_grad():
        for layer in model.layers:
            layer.mask.copy_((torch.rand(layer.mask.shape, generator=gen) < 0.6).float())
            if hasattr(layer, "area"):
                layer.area.copy_((torch.rand(layer.area.shape, generator=gen) < 0.7).float())
        model.zero_dormant()
        first = model.layers[0]
        idx = first.mask.flatten().nonzero()[0, 0]
        first.weight.view(-1)[idx] = 0.0  # mask 1, weight 0: not an active weight
    return model.eval()


def hand_conv_macs(layer) -> int:
    """MACs by explicit loops: every computed output position x every non-zero kernel weight."""
    w = (layer.weight.detach() * layer.mask).tolist()
    area = layer.area.tolist()
    out_c, in_c, k = layer.out_features, layer.in_features, layer.kernel_size
    h_out, w_out = layer.out_hw
    macs = 0
    for n in range(out_c):
        for p in range(h_out):
            for q in range(w_out):
                if area[n][p][q] == 0:
                    continue
                for c in range(in_c):
                    for i in range(k):
                        for j in range(k):
                            macs += w[n][c][i][j] != 0
    return macs


def hand_conv_relu(layer, x):
    """ReLU(masked conv + bias) * area by loops; x is one (C, H, W) image as nested lists."""
    w = (layer.weight.detach() * layer.mask).tolist()
    b, area = layer.bias.tolist(), layer.area.tolist()
    s, pad, k = layer.stride, layer.padding, layer.kernel_size
    h_in, w_in = len(x[0]), len(x[0][0])
    out = []
    for n in range(layer.out_features):
        rows = []
        for p in range(layer.out_hw[0]):
            row = []
            for q in range(layer.out_hw[1]):
                v = b[n]
                for c in range(layer.in_features):
                    for i in range(k):
                        for j in range(k):
                            r, t = p * s + i - pad, q * s + j - pad
                            if 0 <= r < h_in and 0 <= t < w_in:
                                v += w[n][c][i][j] * x[c][r][t]
                v *= area[n][p][q]
                row.append(max(v, 0.0))
            rows.append(row)
        out.append(rows)
    return out


def hand_maxpool(fmap, k):
    return [[[max(ch[p * k + i][q * k + j] for i in range(k) for j in range(k))
              for q in range(len(ch[0]) // k)] for p in range(len(ch) // k)] for ch in fmap]


def share_nonzero(fmap) -> float:
    vals = [v for ch in fmap for row in ch for v in row]
    return sum(v != 0 for v in vals) / len(vals)


# ---- dense reference counts --------------------------------------------------
def test_lenet5_dense_flops_4586k_from_spec_and_from_layer_table():
    spec = get_model("lenet-5")
    assert spec.dense_flops() == 4_586_000 and reference_flops(spec) == 4_586_000
    model = spec.build(generator=torch.Generator().manual_seed(0))
    rows = layer_table(model)
    assert [r["name"] for r in rows] == ["conv1", "conv2", "fc1", "fc2"]
    # conv1: 20x1x5x5 = 500 weights x 24x24; conv2: 50x20x5x5 = 25,000 x 8x8; fc1 800x500; fc2 500x10
    assert [r["flops"] for r in rows] == [2 * 500 * 576, 2 * 25_000 * 64, 2 * 400_000, 2 * 5_000]
    assert totals(rows)["flops"] == 4_586_000 == reference_flops(model)
    assert totals(rows)["weights"] == spec.dense_weights() == reference_weights(model) == 430_500
    assert [(r["kernel"], r["out_hw"], r["conv_pct"]) for r in rows[:2]] == [(5, [24, 24], 100.0), (5, [8, 8], 100.0)]
    assert [(r["in"], r["out"]) for r in rows] == [(1, 20), (20, 50), (800, 500), (500, 10)]
    assert rows[2]["conv_pct"] is None and "kernel" not in rows[2]


def test_imagenet_references_from_spec():
    vgg = get_model("vgg-16")  # spec only: a 224x224 VGG-16 is too big to build here
    assert round(reference_flops(vgg) / 1e7) / 100 == 30.94  # paper Table 3/6: 30.9B
    assert reference_weights(vgg) == vgg.dense_weights()
    assert round(reference_weights(vgg) / 1e6) == 138
    assert 1.4e9 <= reference_flops(get_model("alexnet")) <= 1.5e9  # Table 3: 1.5B


def test_reference_counts_ignore_masks_and_accept_mlps():
    model = masked_cnn()
    # (2,6,6) conv 3x3 pad 1 -> 6x6: 3*2*9 = 54 weights; pool 2 -> 3x3; conv 2x2 stride 2 -> 1x1: 4*3*4 = 48
    # flat 4 -> fc 5 (20) -> fc 3 (15)
    assert reference_weights(model) == 54 + 48 + 20 + 15
    assert reference_flops(model) == 2 * (54 * 36 + 48 * 1 + 20 + 15)
    mlp = SparseMLP([784, 300, 100, 10])
    assert reference_flops(mlp) == dense_flops([784, 300, 100, 10]) == 532_400
    assert reference_flops(get_model("lenet-300-100")) == 532_400 == reference_flops([784, 300, 100, 10])
    assert reference_weights(mlp) == 266_200
    with pytest.raises(TypeError):
        reference_flops("lenet-5")


# ---- sparse conv counts ---------------------------------------------------------
def test_conv_flops_hand_counted_with_kernel_and_area_masks():
    model = masked_cnn()
    rows = layer_table(model)
    for layer, row in zip(model.layers[:2], rows[:2]):
        macs = hand_conv_macs(layer)
        assert 0 < macs < layer.weight.numel() * layer.out_hw[0] * layer.out_hw[1]
        assert conv_macs(layer) == macs
        assert conv_flops(layer) == layer_flops(macs) == 2 * macs == row["flops"] == row["flops_act"]
        area = layer.area.tolist()
        on = sum(v for ch in area for r in ch for v in r)
        assert row["conv_pct"] == pytest.approx(100 * on / layer.area.numel())
        assert row["weights"] == int(sum(v != 0 for v in (layer.weight * layer.mask).flatten().tolist()))
    assert rows[0]["weights"] == int(model.layers[0].mask.sum()) - 1  # the zeroed active weight
    assert [r["name"] for r in rows] == ["conv1", "conv2", "fc1", "fc2"]
    assert rows[2]["flops"] == 2 * int(model.layers[2].mask.sum())
    assert [r["out_hw"] for r in rows[:2]] == [[6, 6], [1, 1]] and [r["kernel"] for r in rows[:2]] == [3, 2]


def test_full_area_conv_is_weights_times_output_positions():
    model = masked_cnn(seed=1)
    layer = model.layers[0]
    with torch.no_grad():
        layer.area.fill_(1.0)
    assert conv_flops(layer) == 2 * layer.active_weights() * 36
    assert layer_table(model)[0]["conv_pct"] == 100.0


# ---- activation density and activation-aware FLOPs -------------------------------
def test_activation_density_of_conv_layers_hand_computed():
    model = masked_cnn(seed=2)
    X = torch.randn(3, 2, 6, 6, generator=torch.Generator().manual_seed(5))
    c1, c2 = model.layers[0], model.layers[1]
    dens1, dens2 = [], []
    for x in X.tolist():
        f1 = hand_maxpool(hand_conv_relu(c1, x), 2)    # conv1 -> ReLU -> 2x2 max pool: (3, 3, 3)
        f2 = hand_conv_relu(c2, f1)                    # conv2 -> ReLU: (4, 1, 1), flattened for fc1
        dens1.append(share_nonzero(f1))
        dens2.append(share_nonzero(f2))
    dens = activation_density(model.train(), X, batch_size=2)
    assert dens[0] == pytest.approx(sum(dens1) / 3) and dens[1] == pytest.approx(sum(dens2) / 3)
    assert 0 < dens[0] < 1 and len(dens) == 4
    assert model.training  # mode restored


def test_activation_density_is_per_element_for_feature_maps():
    # one conv, identity weights: feature-map density = share of positive inputs over channels and positions
    model = SparseCNN((2, 2, 2), [{"out": 2, "kernel": 1}], [{"out": 1}])
    with torch.no_grad():
        model.layers[0].weight.copy_(torch.eye(2).view(2, 2, 1, 1))
        model.layers[0].bias.zero_()
    X = torch.tensor([[[[1.0, -1.0], [2.0, 0.0]], [[-1.0, -2.0], [-3.0, 4.0]]],   # 3 positive of 8
                      [[[1.0, 1.0], [1.0, 1.0]], [[1.0, 1.0], [1.0, -1.0]]]])      # 7 positive of 8
    assert activation_density(model, X)[0] == pytest.approx((3 / 8 + 7 / 8) / 2)


def test_activation_aware_flops_hand_formula():
    model = masked_cnn(seed=3)
    act = [0.5, 0.25, 0.8, 1.0]
    rows = layer_table(model, act)
    m1, m2 = hand_conv_macs(model.layers[0]), hand_conv_macs(model.layers[1])
    w3, w4 = (int(l.mask.sum()) for l in model.layers[2:])
    assert [r["flops"] for r in rows] == [2 * m1, 2 * m2, 2 * w3, 2 * w4]
    # the network input is dense; each later layer scales by the previous layer's density
    assert [r["flops_act"] for r in rows] == pytest.approx([2 * m1, 2 * m2 * 0.5, 2 * w3 * 0.25, 2 * w4 * 0.8])
    assert [r["act_pct"] for r in rows] == pytest.approx([50.0, 25.0, 80.0, 100.0])
    assert totals(rows)["flops_act"] == pytest.approx(2 * (m1 + 0.5 * m2 + 0.25 * w3 + 0.8 * w4))
    # measured densities: flops_act[i] = flops[i] x act[i-1]
    X = torch.randn(4, 2, 6, 6, generator=torch.Generator().manual_seed(1))
    dens = activation_density(model, X)
    measured = layer_table(model, dens)
    assert [r["flops_act"] for r in measured[1:]] == pytest.approx([r["flops"] * d for r, d in zip(measured[1:], dens)])


def test_parameters_count_conv_biases():
    model = masked_cnn(seed=4)
    with torch.no_grad():
        model.layers[0].bias.copy_(torch.tensor([0.0, 0.3, 0.0]))
    row = layer_table(model)[0]
    assert row["parameters"] == row["weights"] + 1


# ---- MLP rows unchanged ------------------------------------------------------------
def _mlp_rows_as_before(model, act):
    """The pre-CNN layer_table, written out: fc{i+1}, 2 x active weights, act of layer i-1."""
    rows = []
    for i, layer in enumerate(model.layers):
        w = layer.active_weights()
        d = 1.0 if (act is None or i == 0) else act[i - 1]
        rows.append({"name": f"fc{i + 1}", "in": layer.in_features, "out": layer.out_features, "weights": w,
                     "parameters": w + model.nonzero_biases(i), "flops": 2 * w, "flops_act": 2 * w * d,
                     "act_pct": None if act is None else 100.0 * act[i]})
    return rows


@pytest.mark.parametrize("batch_norm", [False, True])
def test_mlp_layer_table_unchanged(batch_norm):
    gen = torch.Generator().manual_seed(7)
    model = SparseMLP([6, 5, 4, 3], batch_norm=batch_norm, generator=gen)
    with torch.no_grad():
        for layer in model.layers:
            layer.mask.copy_((torch.rand(layer.mask.shape, generator=gen) < 0.5).float())
        model.zero_dormant()
    X = torch.randn(10, 6, generator=gen)
    act = activation_density(model, X)
    for a in (None, act):
        rows = layer_table(model, a)
        assert [{k: v for k, v in r.items() if k != "conv_pct"} for r in rows] == _mlp_rows_as_before(model, a)
        assert all(r["conv_pct"] is None for r in rows)
        assert list(rows[0]) == ["name", "in", "out", "weights", "parameters", "flops", "flops_act",
                                 "act_pct", "conv_pct"]
