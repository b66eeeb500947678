"""nestsynth.metrics: weights, parameters, FLOPs (paper Table 2/4 convention), Act%."""

from __future__ import annotations

import pytest
import torch

from nestsynth.metrics import activation_density, dense_flops, layer_flops, layer_table, totals
from nestsynth.registry import get_model
from nestsynth.sparse import SparseMLP


def test_lenet_300_100_flops():
    assert layer_flops(266_200) == 532_400
    assert dense_flops([784, 300, 100, 10]) == 532_400
    assert layer_flops(784 * 300) + layer_flops(300 * 100) + layer_flops(100 * 10) == 532_400
    spec = get_model("lenet-300-100")
    assert spec.dense_weights() == 266_200 and spec.dense_flops() == 532_400
    # paper Table 4: fc1 with 7,032 weights and a dense input costs 14.1K FLOPs
    assert layer_flops(7032) == 14_064
    assert layer_flops(100, 0.25) == 50


def _hand_model(batch_norm=False):
    model = SparseMLP([4, 3, 2], batch_norm=batch_norm)
    with torch.no_grad():
        l0, l1 = model.layers
        l0.mask.copy_(torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1], [1, 0, 0, 1]], dtype=torch.float))  # 7 on
        l0.weight.copy_(torch.tensor([[0.5, -1.0, 9.0, 9.0], [9.0, 0.0, 0.3, -0.2], [1.5, 9.0, 9.0, 0.7]]))
        l0.bias.copy_(torch.tensor([0.5, 0.0, -1.0]))
        l1.mask.copy_(torch.tensor([[1, 0, 1], [1, 1, 0]], dtype=torch.float))  # 4 on
        l1.weight.copy_(torch.tensor([[1.0, 5.0, -1.0], [0.5, 0.25, 5.0]]))
        l1.bias.zero_()
    return model


def test_layer_table_hand_counted():
    model = _hand_model()
    # fc1: 7 connections, one of them with weight 0 -> 6 weights; biases 0.5, 0, -1 -> 2 non-zero
    rows = layer_table(model, act=[0.5, 1.0])
    assert [r["name"] for r in rows] == ["fc1", "fc2"]
    assert [(r["in"], r["out"]) for r in rows] == [(4, 3), (3, 2)]
    assert [r["weights"] for r in rows] == [6, 4]
    assert [r["parameters"] for r in rows] == [8, 4]
    assert [r["flops"] for r in rows] == [12, 8]
    assert [r["flops_act"] for r in rows] == [12, 4]   # fc2's inputs are 50% non-zero
    assert [r["act_pct"] for r in rows] == [50.0, 100.0]
    assert totals(rows) == {"weights": 10, "parameters": 12, "flops": 20, "flops_act": 16}
    plain = layer_table(model)
    assert [r["flops_act"] for r in plain] == [12, 8] and plain[0]["act_pct"] is None


def test_layer_table_parameters_count_folded_batchnorm_bias():
    model = _hand_model(batch_norm=True)
    with torch.no_grad():
        model.layers[0].bias.copy_(torch.tensor([0.5, 0.5, 0.0]))
        model.norms[0].running_mean.copy_(torch.tensor([0.5, 0.0, 0.0]))
        model.norms[0].bias.zero_()
    # folded biases: (0.5 - 0.5) * s = 0, 0.5 * s != 0, 0 -> one non-zero
    assert layer_table(model)[0]["parameters"] == 6 + 1


def test_activation_density_hand_computed():
    model = SparseMLP([2, 3, 2])
    with torch.no_grad():
        model.layers[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]))
        model.layers[0].bias.zero_()
        model.layers[1].weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
        model.layers[1].bias.zero_()
    X = torch.tensor([[1.0, 2.0], [-1.0, 3.0], [-1.0, -1.0]])
    # hidden ReLU outputs: [1, 2, 0], [0, 3, 0], [0, 0, 2] -> 2/3, 1/3, 1/3 non-zero
    # logits = [h0, 0]: [1, 0], [0, 0], [0, 0] -> 1/2, 0, 0
    dens = activation_density(model, X, batch_size=2)
    assert dens == pytest.approx([(2 / 3 + 1 / 3 + 1 / 3) / 3, (0.5 + 0 + 0) / 3])
    assert model.training  # mode restored


def test_paper_table_4a_flops():
    """Table 4(a): 7032/718/94 weights with Act% 46/71/100 cost 14.1K/0.7K/0.1K, 14.9K in total."""
    model = SparseMLP([784, 300, 100, 10])
    with torch.no_grad():
        for layer, n in zip(model.layers, (7032, 718, 94)):
            layer.mask.zero_()
            layer.mask.view(-1)[:n] = 1
            layer.weight.fill_(0.1)
    rows = layer_table(model, act=[0.46, 0.71, 1.0])
    assert [r["weights"] for r in rows] == [7032, 718, 94]
    assert [round(r["flops_act"] / 100) / 10 for r in rows] == [14.1, 0.7, 0.1]
    assert round(totals(rows)["flops_act"] / 100) / 10 == 14.9
    assert totals(rows)["weights"] == 7844
