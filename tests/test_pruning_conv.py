"""Pruning of conv layers: partial-area convolution (Algorithm 2), feature-map removal, Fig. 5."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nestsynth.metrics import conv_flops
from nestsynth.pruning.area import area_scores, depthwise_maps, prune_area
from nestsynth.pruning.feature_maps import feature_map_statistics, maps_to_keep, remove_feature_maps
from nestsynth.pruning.neurons import remove_neurons
from nestsynth.report.area_plot import plot_area_of_interest
from nestsynth.sparse import MaskedConv2d, SparseCNN
from nest_helpers import randomize_bn, randomize_masks


def tiny(pad2: int = 0, batch_norm: bool = True, seed: int = 0) -> SparseCNN:
    """(2, 8, 8) -> conv3 pad1 (3 maps, maxpool 2) -> 4x4 -> conv3 pad2 (4 maps) -> fc 5 -> 3."""
    gen = torch.Generator().manual_seed(seed)
    model = SparseCNN((2, 8, 8), [{"out": 3, "kernel": 3, "padding": 1, "pool": "max:2:2"},
                                  {"out": 4, "kernel": 3, "padding": pad2}],
                      [{"out": 5}, {"out": 3}], batch_norm, generator=gen)
    randomize_masks(model, gen, 0.7)
    randomize_bn(model, gen)
    return model.eval()


def make_constant(layer, c: int, value: float) -> None:
    """Feature map / neuron c of ``layer`` gets no incoming weights and bias ``value``."""
    with torch.no_grad():
        layer.mask[c] = 0
        layer.weight[c] = 0
        layer.bias[c] = value


# ---- partial-area convolution ------------------------------------------------
@pytest.mark.parametrize("stride,padding", [(1, 0), (2, 1)])
def test_area_layer_equals_dense_conv_with_masked_outputs_zeroed(stride, padding):
    gen = torch.Generator().manual_seed(3)
    out_hw = ((9 + 2 * padding - 3) // stride + 1,) * 2
    layer = MaskedConv2d(2, 3, 3, out_hw, stride, padding, generator=gen)
    with torch.no_grad():
        layer.mask.copy_((torch.rand(layer.mask.shape, generator=gen) < 0.6).float())
        scores = torch.rand(layer.area.shape, generator=gen)
        layer.area.copy_(prune_area(scores, layer.area, 0.4))
    x = torch.randn(4, 2, 9, 9, generator=gen)
    dense = nn.Conv2d(2, 3, 3, stride, padding)
    with torch.no_grad():
        dense.weight.copy_(layer.weight * layer.mask)
        dense.bias.copy_(layer.bias)
    torch.testing.assert_close(layer(x), dense(x) * layer.area)
    assert (layer(x)[:, layer.area == 0] == 0).all()


def _brute_inputs(model, X):
    """Layer 0 and layer 1 inputs, one image at a time."""
    ins0 = [x[None] for x in X]  # (1, 2, 8, 8)
    ins1 = [model.hidden_post(0, model.layers[0](x)) for x in ins0]  # (1, 3, 4, 4)
    return ins0, ins1


def test_area_scores_and_depthwise_maps_equal_brute_force():
    model = tiny(pad2=1)
    with torch.no_grad():
        model.layers[0].area[1, :3] = 0  # the area mask must not enter the scores
    X = torch.randn(7, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        inputs = _brute_inputs(model, X)
        for i in (0, 1):
            layer = model.layers[i]
            w = layer.weight * layer.mask  # (N, M, k, k)
            n_out, n_in = w.shape[:2]
            expected = torch.zeros(n_out, *layer.out_hw)
            expected_dw = torch.zeros(n_in, n_out, *layer.out_hw)
            for x in inputs[i]:
                for n in range(n_out):
                    expected[n] += F.conv2d(x, w[n:n + 1], None, layer.stride, layer.padding)[0, 0].abs()
                    for m in range(n_in):
                        expected_dw[m, n] += F.conv2d(x[:, m:m + 1], w[n:n + 1, m:m + 1], None, layer.stride,
                                                      layer.padding)[0, 0].abs()
            torch.testing.assert_close(area_scores(model, i, X, batch_size=3), expected / len(X))
            torch.testing.assert_close(depthwise_maps(model, i, X, batch_size=4), expected_dw / len(X))
    assert not model.training


def test_prune_area_hand_example():
    scores = torch.tensor([[[0.5, 0.1], [0.9, 0.3]],
                           [[0.3, 0.0], [0.3, 0.8]]])  # (2 kernels, 2, 2)
    area = torch.ones(2, 2, 2)
    area[1, 0, 1] = 0  # dead, with the smallest score: must stay dead and not count
    # 7 live; round(0.5 * 7) = 4 removed: 0.1 (0,0,1), then the 0.3 ties by position:
    # (0,1,1), (1,0,0), (1,1,0)
    new = prune_area(scores, area, 0.5)
    expected = torch.tensor([[[1., 0.], [1., 0.]], [[0., 0.], [0., 1.]]])
    assert torch.equal(new, expected)
    assert torch.equal(area[1, 0, 1], torch.tensor(0.))  # input untouched
    assert ((new <= area)).all()
    # a tiny rate removes at least one position, the weakest live one
    one = prune_area(scores, area, 0.01)
    assert int(area.sum() - one.sum()) == 1 and one[0, 0, 1] == 0
    assert torch.equal(prune_area(scores, area, 0.0), area)
    # never revives, and stops when nothing is live
    assert prune_area(scores, torch.zeros(2, 2, 2), 0.5).sum() == 0
    # min_positions=2: kernel 1 (3 live) may lose only (1,0,0), kernel 0 (4 live) only its two
    # weakest; the floors bind, so 3 of the 4 requested positions go
    floor = prune_area(scores, area, 0.5, min_positions=2)
    expected = torch.tensor([[[1., 0.], [1., 0.]], [[0., 0.], [1., 1.]]])
    # with a floor of 1, kernel 0 gives up a third position to reach the exact count (4)
    floor1 = prune_area(scores, area, 0.5, min_positions=1)
    assert int(area.sum() - floor1.sum()) == 4 and floor1[1].sum() == 1
    assert torch.equal(floor, expected)


def test_prune_area_removes_exact_count_below_percentile():
    gen = torch.Generator().manual_seed(5)
    scores = torch.rand(4, 6, 6, generator=gen)
    area = (torch.rand(4, 6, 6, generator=gen) < 0.8).float()
    live = int(area.sum())
    new = prune_area(scores, area, 0.1)
    gone = (area - new).bool()
    assert int(gone.sum()) == round(0.1 * live)
    assert scores[gone].max() <= scores[new.bool()].min()


def test_conv_pct_and_flops():
    layer = MaskedConv2d(1, 2, 3, (4, 4))
    with torch.no_grad():
        layer.mask.zero_()
        layer.mask[0, 0, :2, :2] = 1  # 4 weights in kernel 0
        layer.mask[1, 0, 0, 0] = 1  # 1 weight in kernel 1
        layer.weight.mul_(layer.mask)
        layer.area[0, :2] = 0  # kernel 0 computes 8 of 16 positions
    assert layer.conv_pct() == pytest.approx(100 * 24 / 32)
    assert conv_flops(layer) == 2 * (4 * 8 + 1 * 16)


# ---- feature maps -------------------------------------------------------------
def test_feature_map_statistics_are_means_of_what_the_next_layer_sees():
    model = tiny()
    X = torch.randn(6, 2, 8, 8, generator=torch.Generator().manual_seed(2))
    stats = feature_map_statistics(model, X, batch_size=4)
    with torch.no_grad():
        seen0 = model.hidden_post(0, model.layers[0](X))  # (6, 3, 4, 4) pooled
        seen1 = model.hidden_post(1, model.layers[1](seen0)).view(6, 4, 2, 2)  # flattened channel-major
        seen2 = model.hidden_post(2, model.layers[2](seen1.flatten(1)))  # (6, 5)
    for h, seen in enumerate((seen0, seen1)):
        torch.testing.assert_close(stats.mean_maps[h], seen.mean(0))
        torch.testing.assert_close(stats.means[h], seen.mean((0, 2, 3)))
        torch.testing.assert_close(stats.abs_means[h], seen.abs().mean((0, 2, 3)))
    torch.testing.assert_close(stats.means[2], seen2.mean(0))
    torch.testing.assert_close(stats.abs_means[2], seen2.abs().mean(0))


@pytest.mark.parametrize("h", [0, 1])  # h=0: next is a conv without padding; h=1: next is the linear layer
def test_removing_a_constant_map_is_exact(h):
    model = tiny(pad2=0)
    make_constant(model.layers[h], 1, 0.7)
    with torch.no_grad():  # a partial area in the next conv must not break exactness
        model.layers[1].area[2, 0, 0] = 0
    X = torch.randn(9, 2, 8, 8, generator=torch.Generator().manual_seed(4))
    opt = torch.optim.Adam(model.parameters())
    model.train()
    F.cross_entropy(model(X), torch.zeros(9, dtype=torch.long)).backward()
    opt.step()
    model.eval()
    with torch.no_grad():  # a live graph would pin the old weight shapes for the next backward
        before = model(X)
    stats = feature_map_statistics(model, X)  # stats of the current weights
    keep = torch.tensor([True, False, True] if h == 0 else [True, False, True, True])
    assert remove_feature_maps(model, h, keep, stats, opt) == 1
    assert model.widths[h + 1] == len(keep) - 1
    assert (model(X) - before).abs().max() < 1e-5
    model.train()
    F.cross_entropy(model(X), torch.zeros(9, dtype=torch.long)).backward()
    opt.step()  # optimizer state was cut along


def test_removing_a_map_before_a_padded_conv_preserves_the_mean_over_positions():
    model = tiny(pad2=1)  # next conv has zero padding: the border sees less of the map
    make_constant(model.layers[0], 2, 0.9)
    X = torch.randn(5, 2, 8, 8, generator=torch.Generator().manual_seed(6))
    stats = feature_map_statistics(model, X)
    with torch.no_grad():
        before = model.trace(X)[1][1]  # (5, 4, 4, 4) pre-BN output of the next conv
        remove_feature_maps(model, 0, torch.tensor([True, True, False]), stats)
        after = model.trace(X)[1][1]
    torch.testing.assert_close(after.mean((2, 3)), before.mean((2, 3)), atol=1e-5, rtol=0)
    assert (after - before).abs().max() > 1e-3  # not exact per position


def test_removing_a_hidden_neuron_equals_remove_neurons():
    model, ref = tiny(), tiny()
    X = torch.randn(5, 2, 8, 8, generator=torch.Generator().manual_seed(7))
    stats = feature_map_statistics(model, X)
    keep = torch.tensor([True, False, True, False, True])
    remove_feature_maps(model, 2, keep, stats)
    remove_neurons(ref, 2, keep, stats.means[2])
    torch.testing.assert_close(model(X), ref(X))


def test_maps_to_keep_hand_example():
    out_abs = torch.tensor([1.0, 2.0, 0.1, 3.0, 2.0])  # mean 1.62
    in_mask = torch.ones(5, 2, 3, 3)
    in_mask[0] = 0  # map 0: no incoming kernel weight
    out_lin = torch.ones(6, 5 * 4)  # next: linear, flat_size 4
    out_lin[:, 4:8] = 0  # map 1: no outgoing weight
    keep = maps_to_keep(out_abs, in_mask, out_lin, threshold=0.5)
    # map 2 is weak (0.1 < 0.5 * 1.62); maps 3, 4 survive
    assert keep.tolist() == [False, False, False, True, True]
    out_conv = torch.ones(6, 5, 3, 3)
    out_conv[:, 3] = 0  # map 3 has no outgoing kernel weight
    area = torch.ones(5, 4, 4)
    area[4] = 0  # map 4 computes nothing
    assert maps_to_keep(out_abs, in_mask, out_conv, 0.0).tolist() == [False, True, True, False, True]
    assert maps_to_keep(out_abs, in_mask, out_conv, 0.0, area).tolist() == [False, True, True, False, False]
    # nothing would survive: the strongest map is kept
    assert maps_to_keep(out_abs, torch.zeros(5, 2, 3, 3), out_conv, 0.0).tolist() == [False, False, False, True,
                                                                                         False]


# ---- Fig. 5 ---------------------------------------------------------------------
def test_plot_area_of_interest_writes_a_png(tmp_path):
    area = (torch.rand(6, 12, 12, generator=torch.Generator().manual_seed(0)) < 0.6).float()
    path = plot_area_of_interest(area, tmp_path / "fig" / "area.png", "layer 1")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
