"""nestsynth.seeds: seed widths, connected random masks, the seed network."""

from __future__ import annotations

import math

import pytest
import torch

from nestsynth.seeds import make_seed, random_connected_mask, seed_widths
from nestsynth.sparse import SparseMLP


def test_seed_widths():
    assert seed_widths([784, 300, 100, 10], 0.4) == [784, 120, 40, 10]
    assert seed_widths([784, 300, 100, 10], 1.0) == [784, 300, 100, 10]
    assert seed_widths([64, 300, 100, 10], 0.2) == [64, 60, 20, 10]
    assert seed_widths([10, 3, 4, 2], 0.01) == [10, 1, 1, 2]  # at least 1 neuron


def _check_connectivity(model):
    for i, layer in enumerate(model.layers):
        m = layer.mask
        assert bool((m.sum(1) >= 1).all()), f"layer {i}: a neuron without inputs"
        if i > 0:
            assert bool((m.sum(0) >= 1).all()), f"layer {i}: a hidden neuron without outputs"


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("density", [0.1, 0.3, 0.6])
def test_make_seed_exact_density_and_connectivity(seed, density):
    widths = [30, 20, 12, 5]
    model = make_seed(widths, 0.5, density, torch.Generator().manual_seed(seed))
    assert model.widths == [30, 10, 6, 5]
    _check_connectivity(model)
    for i, layer in enumerate(model.layers):
        o, n = layer.out_features, layer.in_features
        need = o + (n if i > 0 else 0)  # the guarantee places at most this many ones
        want = round(density * o * n)
        if want >= need:
            assert layer.active_connections() == want
        else:
            assert want <= layer.active_connections() <= need
        # dormant weights are exactly zero, active ones non-zero
        assert float(layer.weight.detach()[layer.mask == 0].abs().sum()) == 0.0
        assert layer.active_weights() == layer.active_connections()


@pytest.mark.parametrize("seed", [0, 3])
def test_make_seed_very_low_density_forces_connectivity(seed):
    widths = [40, 30, 20, 10]
    model = make_seed(widths, 1.0, 0.001, torch.Generator().manual_seed(seed))
    _check_connectivity(model)
    first = model.layers[0]
    # round(0.001*30*40) = 1 < 30: exactly one input per neuron of the first layer
    assert first.active_connections() == 30
    assert first.mask.sum(1).tolist() == [1.0] * 30
    for i, layer in enumerate(model.layers[1:], start=1):
        o, n = layer.out_features, layer.in_features
        assert layer.active_connections() > round(0.001 * o * n)
        assert max(o, n) <= layer.active_connections() <= o + n


def test_random_connected_mask_counts():
    gen = torch.Generator().manual_seed(0)
    m = random_connected_mask(5, 6, 0.5, gen, connect_inputs=True)
    assert int(m.sum()) == 15 and bool((m.sum(0) >= 1).all()) and bool((m.sum(1) >= 1).all())
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    full = random_connected_mask(4, 3, 1.0, gen, connect_inputs=True)
    assert bool(full.all())


def test_make_seed_deterministic_and_weights_scaled():
    widths, ratio, density = [12, 10, 8, 4], 0.5, 0.3
    a = make_seed(widths, ratio, density, torch.Generator().manual_seed(42))
    b = make_seed(widths, ratio, density, torch.Generator().manual_seed(42))
    c = make_seed(widths, ratio, density, torch.Generator().manual_seed(43))
    for la, lb in zip(a.layers, b.layers):
        assert torch.equal(la.mask, lb.mask) and torch.equal(la.weight, lb.weight)
    assert any(not torch.equal(la.mask, lc.mask) for la, lc in zip(a.layers, c.layers))
    # oracle: the same generator stream drawn by hand (weights first, then the masks)
    gen = torch.Generator().manual_seed(42)
    ref = SparseMLP(seed_widths(widths, ratio), generator=gen)
    for i, (layer, rl) in enumerate(zip(a.layers, ref.layers)):
        mask = random_connected_mask(rl.out_features, rl.in_features, density, gen, connect_inputs=i > 0)
        assert torch.equal(layer.mask, mask)
        torch.testing.assert_close(layer.weight.detach(), rl.weight.detach() * mask / math.sqrt(density))
