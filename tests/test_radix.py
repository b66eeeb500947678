"""RadiX-Net topologies (nestsynth.seeds.radix) and the ``radix`` baseline.

Oracles: hand counts of connections, brute-force path enumeration, the closed-form path
count of a Kronecker product, and an independent rebuild of the masks.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from nestsynth.errors import NestError
from nestsynth.seeds.radix import (choose_radices, emr_node_masks, mixed_radix_masks, path_counts,
                                   radix_masks_for_widths, radix_net_masks, radix_seed_masks,
                                   random_cover_mask, random_equivalent)


def brute_force_paths(masks) -> torch.Tensor:
    """Path counts by enumerating every (input, hidden..., output) chain; (out, in)."""
    widths = [masks[0].shape[1]] + [m.shape[0] for m in masks]
    counts = torch.zeros(widths[-1], widths[0])
    for chain in itertools.product(*[range(w) for w in widths]):
        if all(masks[i][chain[i + 1], chain[i]] == 1 for i in range(len(masks))):
            counts[chain[-1], chain[0]] += 1
    return counts


def all_connected(masks) -> bool:
    """Every row (unit input) and every column (neuron output) of every mask is non-empty."""
    return all(bool((m.sum(1) > 0).all() and (m.sum(0) > 0).all()) for m in masks)


# ---- mixed-radix systems -------------------------------------------------------------
def test_radix_222_is_75_percent_sparse_with_one_path_per_pair():
    masks = mixed_radix_masks([2, 2, 2])
    for i, m in enumerate(masks):
        assert m.shape == (8, 8)
        # 2 of 8 connections per node in and out: 75% sparsity (seed 002)
        assert torch.equal(m.sum(0), torch.full((8,), 2.0)) and torch.equal(m.sum(1), torch.full((8,), 2.0))
        assert 1 - float(m.mean()) == 0.75
        for j in range(8):  # node j feeds j and j + 2^i (mod 8)
            assert {int(v) for v in torch.nonzero(m[:, j]).flatten()} == {j, (j + 2 ** i) % 8}
    assert torch.equal(brute_force_paths(masks), torch.ones(8, 8))
    assert torch.equal(path_counts(masks), torch.ones(8, 8, dtype=torch.float64))


def test_mixed_radix_unequal_radices_give_unique_paths():
    masks = mixed_radix_masks([3, 2, 4])  # N' = 24, place values 1, 3, 6
    assert [int(m.sum()) for m in masks] == [3 * 24, 2 * 24, 4 * 24]
    assert torch.equal(path_counts(masks), torch.ones(24, 24, dtype=torch.float64))


def test_emr_concatenation_and_its_rules():
    masks = emr_node_masks([[2, 2], [2]])  # N' = 4; the last system (2) divides 4
    # first system: one path per pair; the last layer has 2 inputs per node -> 2 paths
    assert torch.equal(brute_force_paths(masks), 2 * torch.ones(4, 4))
    with pytest.raises(ValueError):
        emr_node_masks([[2, 2], [3]])  # 3 does not divide 4
    with pytest.raises(ValueError):
        emr_node_masks([[2, 2], [2], [2]])  # a middle system must multiply to N'


def test_radix_net_kronecker_widths_density_and_paths():
    a = mixed_radix_masks([2, 2, 2])
    masks = radix_net_masks([[2, 2, 2]], [1, 2, 3, 1])
    assert [tuple(m.shape) for m in masks] == [(16, 8), (24, 16), (8, 24)]  # N' * B_i
    # hand counts: 16 node edges x B_{i+1} x B_i
    assert [int(m.sum()) for m in masks] == [16 * 2 * 1, 16 * 3 * 2, 16 * 1 * 3]
    assert all(float(m.mean()) == 0.25 for m in masks)
    # block structure: unit o of a width-N'B layer is node o // B
    assert all(masks[1][o, j] == a[1][o // 3, j // 2] for o in range(24) for j in range(16))
    # paths: one per node pair times B_1 * B_2 choices of hidden neurons
    assert torch.equal(path_counts(masks), torch.full((8, 8), 6.0, dtype=torch.float64))


# ---- arbitrary widths ------------------------------------------------------------------
def test_widths_adaptation_is_the_kronecker_product_when_divisible():
    got = radix_masks_for_widths([8, 16, 24, 8], radices=[[2, 2, 2]])
    want = radix_net_masks([[2, 2, 2]], [1, 2, 3, 1])
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    flat = radix_masks_for_widths([8, 16, 24, 8], radices=[2, 2, 2])  # one system, N' = 8
    assert all(torch.equal(g, w) for g, w in zip(flat, want))


def test_lenet_widths_hit_ten_percent_exactly():
    assert choose_radices([784, 300, 100, 10], 0.1) == (100, [[10, 10], [10]])
    masks = radix_masks_for_widths([784, 300, 100, 10], density=0.1)
    assert [int(m.sum()) for m in masks] == [23520, 3000, 100]  # 10% of 784x300, 300x100, 100x10
    assert bool((path_counts(masks) > 0).all()) and all_connected(masks)


def test_small_widths_density_and_every_input_reaches_every_output():
    widths = [64, 32, 16, 10]
    # (8, [[2, 2, 2]]) fits as well; ties go to the larger N'
    assert choose_radices(widths, 0.25) == (16, [[4, 4], [4]])
    masks = radix_seed_masks(widths, 0.25, torch.Generator().manual_seed(0))
    assert [tuple(m.shape) for m in masks] == [(32, 64), (16, 32), (10, 16)]
    assert [int(m.sum()) for m in masks] == [round(0.25 * 64 * 32), round(0.25 * 32 * 16), round(0.25 * 16 * 10)]
    assert bool((path_counts(masks) > 0).all()) and all_connected(masks)


def test_unreached_units_get_one_repair_connection():
    # radix 1 first: hidden node v only hears input node v, but 4 inputs sit on nodes 0, 2, 4, 6
    masks = radix_masks_for_widths([4, 8, 8, 8], radices=[1, 2, 4], generator=torch.Generator().manual_seed(1))
    assert int(masks[0].sum()) == 4 + 4  # 4 structural + one for each odd hidden unit
    assert all_connected(masks)
    assert bool((brute_force_paths(masks) > 0).all())


def test_invalid_radices_are_reported():
    with pytest.raises(NestError, match="hidden widths"):
        radix_masks_for_widths([64, 4, 4, 10], radices=[2, 2, 2])  # N' = 8 > 4
    with pytest.raises(NestError, match="layers"):
        radix_masks_for_widths([64, 8, 8, 10], radices=[2, 4])
    with pytest.raises(NestError, match="radices"):
        radix_masks_for_widths([64, 8, 8, 10], radices=[2, 3, 2], nodes=8)


# ---- random control ----------------------------------------------------------------------
def test_random_equivalent_keeps_counts_and_connectivity():
    masks = radix_masks_for_widths([64, 32, 16, 10], density=0.25)
    rand = random_equivalent(masks, torch.Generator().manual_seed(0))
    assert [int(m.sum()) for m in rand] == [int(m.sum()) for m in masks]
    assert all_connected(rand)
    assert not all(torch.equal(r, m) for r, m in zip(rand, masks))
    again = random_equivalent(masks, torch.Generator().manual_seed(0))
    assert all(torch.equal(r, a) for r, a in zip(rand, again))


def test_random_cover_tight_count():
    m = random_cover_mask(5, 3, 5, torch.Generator().manual_seed(0))
    assert int(m.sum()) == 5 and torch.equal(m.sum(1), torch.ones(5)) and bool((m.sum(0) > 0).all())
    with pytest.raises(ValueError):
        random_cover_mask(5, 3, 4, torch.Generator())


# ---- the baseline ----------------------------------------------------------------------------
def _context(digits, **mcfg):
    from nest_helpers import mlp_context
    from nestsynth.config import from_dict

    cfg = from_dict({"method": "radix", "train": {"batch_size": 64}, "methods": {"radix": mcfg}})
    return cfg, mlp_context(cfg, digits, [64, 32, 16, 10])


def _train_loss(model, ctx) -> float:
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(model(ctx.X), ctx.y))


def test_config_validation_and_radices_list():
    from nestsynth.config import from_dict, parse_override

    cfg = from_dict(parse_override("methods.radix.radices=[4, 4, 4]") | {"method": "radix"})
    assert cfg.methods.radix.radices == [4, 4, 4]
    for bad in ({"topology": "expander"}, {"radices": [4, 0]}, {"density": 0.0}, {"epochs": -1}):
        with pytest.raises(NestError):
            from_dict({"method": "radix", "methods": {"radix": bad}})


@pytest.mark.parametrize("topology", ["radix", "random"])
def test_radix_method_end_to_end(digits, topology):
    from nestsynth.baselines import get_method

    cfg, ctx = _context(digits, density=0.25, epochs=1, topology=topology)
    model = get_method("radix").run(ctx, cfg.methods.radix)
    want = radix_masks_for_widths([64, 32, 16, 10], density=0.25)
    masks = [layer.mask for layer in model.layers]
    assert [int(m.sum()) for m in masks] == [512, 128, 40]
    assert all(torch.equal(m, w) for m, w in zip(masks, want)) == (topology == "radix")
    assert all(bool((layer.weight[layer.mask == 0] == 0).all()) for layer in model.layers)
    assert ctx.epochs == 1
    assert [row["phase"] for row in ctx.history] == ["init", "train", "final"]
    assert ctx.history[-1]["nodes"] == 16 and ctx.history[-1]["radix_lists"] == [[4, 4], [4]]
    # oracle for "it trained": the same run with 0 epochs (same seed) is the untrained start
    cfg0, ctx0 = _context(digits, density=0.25, epochs=0, topology=topology)
    start = get_method("radix").run(ctx0, cfg0.methods.radix)
    assert all(torch.equal(a.mask, b.mask) for a, b in zip(start.layers, model.layers))
    assert _train_loss(model, ctx) < _train_loss(start, ctx)


def test_radix_method_explicit_radices(digits):
    from nestsynth.baselines import get_method

    cfg, ctx = _context(digits, radices=[2, 2, 2], epochs=0)
    model = get_method("radix").run(ctx, cfg.methods.radix)
    # N' = 8 -> 2 of 8 connections per node in every layer: 25% of each layer
    assert [int(layer.mask.sum()) for layer in model.layers] == [512, 128, 40]
    assert ctx.history[-1]["radix_lists"] == [[2, 2, 2]]
