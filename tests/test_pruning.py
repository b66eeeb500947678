"""nestsynth.pruning: magnitude pruning, neuron removal and schedules (Policy 4)."""

from __future__ import annotations

import copy

import pytest
import torch

from nest_helpers import random_mask, sparse_model
from nestsynth.pruning import (constant_rate_removal, cubic_sparsity, effective_scores,
                               neurons_to_keep, output_statistics, prune_smallest, remove_neurons)


# ----------------------------------------------------------------------------- connections


@pytest.mark.parametrize("n", [0, 1, 5, 11, 10_000, -3])
def test_prune_smallest_brute_force(n):
    gen = torch.Generator().manual_seed(abs(n))
    mask = random_mask(5, 6, 0.5, gen)
    scores = torch.rand(5, 6, generator=gen) + 0.01
    scores[mask == 0] = 1e-9                   # dormant with tiny scores must stay dormant
    new = prune_smallest(scores, mask, n)
    assert bool((new <= mask).all())           # never revives
    live = [(float(s), i) for i, (s, m) in enumerate(zip(scores.flatten().tolist(), mask.flatten().tolist()))
            if m == 1]
    live.sort()
    k = min(max(n, 0), len(live))
    expected_removed = {i for _, i in live[:k]}
    removed = set(((mask.flatten() == 1) & (new.flatten() == 0)).nonzero().flatten().tolist())
    assert removed == expected_removed
    assert int(mask.sum() - new.sum()) == k


def test_effective_scores_fold_batchnorm_rowwise():
    model = sparse_model((6, 5, 4, 3), seed=1, batch_norm=True)
    for i in range(3):
        w = (model.layers[i].weight * model.layers[i].mask).detach().abs()
        if i < 2:
            bn = model.norms[i]
            expected = torch.stack([w[r] / (float(bn.running_var[r]) + bn.eps) ** 0.5 for r in range(w.shape[0])])
        else:
            expected = w  # no batch norm after the output layer
        torch.testing.assert_close(effective_scores(model, i), expected)
    plain = sparse_model((6, 5, 3), seed=1)
    torch.testing.assert_close(effective_scores(plain, 0), (plain.layers[0].weight * plain.layers[0].mask).detach().abs())


# ----------------------------------------------------------------------------- neurons


def test_neurons_to_keep_hand_made():
    out_abs = torch.tensor([1.0, 0.05, 2.0, 0.0, 1.0, 3.0])   # mean 7.05/6 = 1.175
    in_mask = torch.ones(6, 4)
    in_mask[4] = 0                                            # neuron 4 has no input
    out_mask = torch.ones(3, 6)
    out_mask[:, 5] = 0                                        # neuron 5 has no output
    keep = neurons_to_keep(out_abs, in_mask, out_mask, threshold=0.5)   # bar 0.5875
    assert keep.tolist() == [True, False, True, False, False, False]
    keep0 = neurons_to_keep(out_abs, in_mask, out_mask, threshold=0.0)  # only connectivity
    assert keep0.tolist() == [True, True, True, True, False, False]
    # nothing passes -> the strongest survives
    none = neurons_to_keep(torch.tensor([0.1, 0.3, 0.2]), torch.zeros(3, 2), torch.ones(2, 3), 0.5)
    assert none.tolist() == [False, True, False]


def test_output_statistics_hand_computed():
    model = sparse_model((2, 3, 2), seed=0)
    with torch.no_grad():
        model.layers[0].mask.fill_(1)
        model.layers[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]))
        model.layers[0].bias.zero_()
    model.acts[0] = torch.nn.Identity()
    X = torch.tensor([[1.0, 2.0], [-1.0, 3.0], [-1.0, -1.0]])
    abs_means, means = output_statistics(model, X, batch_size=2)
    h = X @ torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]).T
    torch.testing.assert_close(abs_means[0], h.abs().mean(0))
    torch.testing.assert_close(means[0], h.mean(0))


@pytest.mark.parametrize("batch_norm,h", [
    (False, 0), (False, 1), (True, 1), (True, 0),
])
def test_remove_constant_neuron_keeps_outputs(batch_norm, h):
    model = sparse_model((6, 5, 4, 3), seed=3, batch_norm=batch_norm).eval()
    with torch.no_grad():  # neuron 2 of hidden layer h has no inputs: a constant output
        model.layers[h].mask[2] = 0
        model.layers[h].bias[2] = 0.7
        model.zero_dormant()
        if batch_norm:
            model.norms[h].running_mean[2] = -0.3  # keeps the constant after BN+ReLU non-zero
    X = torch.randn(20, 6, generator=torch.Generator().manual_seed(0))
    before = model(X)
    width = model.widths[h + 1]
    abs_means, means = output_statistics(model, X)
    assert float(means[h][2]) > 0  # the constant is not trivially zero
    keep = neurons_to_keep(abs_means[h], model.layers[h].mask, model.layers[h + 1].mask, 0.0)
    assert keep.tolist() == [True, True, False, True, True][:width]
    removed = remove_neurons(model, h, keep, means[h])
    assert removed == 1 and model.widths[h + 1] == width - 1
    assert model.layers[h + 1].in_features == width - 1
    torch.testing.assert_close(model(X), before, rtol=1e-5, atol=1e-5)


def test_remove_neurons_nothing_to_remove():
    model = sparse_model(seed=4)
    before = copy.deepcopy(model.state_dict())
    assert remove_neurons(model, 0, torch.ones(5, dtype=torch.bool), torch.zeros(5)) == 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


# ----------------------------------------------------------------------------- schedules


def test_constant_rate_removal_by_hand():
    assert constant_rate_removal(1000, 0.01) == 10
    assert constant_rate_removal(50, 0.01) == 1        # round(0.5) = 0 -> at least 1
    assert constant_rate_removal(200, 0.2) == 40
    assert constant_rate_removal(5, 0.5, floor=4) == 1  # never below the floor
    assert constant_rate_removal(1, 0.5) == 0
    assert constant_rate_removal(3, 0.9, floor=5) == 0


def test_cubic_sparsity_by_hand():
    assert cubic_sparsity(0, 0.9, 10) == pytest.approx(0.0)
    assert cubic_sparsity(10, 0.9, 10) == pytest.approx(0.9)
    assert cubic_sparsity(25, 0.9, 10) == pytest.approx(0.9)  # clamped
    assert cubic_sparsity(5, 0.9, 10) == pytest.approx(0.9 + (0.0 - 0.9) * 0.125)
    assert cubic_sparsity(5, 0.8, 10, initial=0.2) == pytest.approx(0.8 + (0.2 - 0.8) * 0.125)
    assert cubic_sparsity(0, 0.8, 10, initial=0.2) == pytest.approx(0.2)
    assert cubic_sparsity(1, 0.9, 10) == pytest.approx(0.9 - 0.9 * 0.9 ** 3)


def test_lamp_scores_by_hand_and_largest_weight_of_every_layer_scores_one():
    from nestsynth.pruning import lamp_scores

    s = lamp_scores(torch.tensor([[0.0, 3.0], [1.0, 2.0]]))
    assert torch.allclose(s, torch.tensor([[0.0, 1.0], [1 / 14, 4 / 13]]))
    gen = torch.Generator().manual_seed(0)
    for scale in (1e-3, 1.0, 1e3):  # scale-free: a layer's scores do not depend on its weights' size
        w = torch.rand(5, 7, generator=gen)
        assert float(lamp_scores(w * scale).max()) == pytest.approx(1.0)
        assert torch.allclose(lamp_scores(w * scale), lamp_scores(w), atol=1e-6)


def test_lamp_scope_keeps_a_small_scale_layer_that_global_starves():
    from nestsynth.baselines.magnitude import oneshot_masks
    from nestsynth.sparse import SparseMLP

    model = SparseMLP([6, 5, 3])
    with torch.no_grad():
        model.layers[0].weight.copy_(torch.arange(1, 31, dtype=torch.float32).view(5, 6))
        model.layers[1].weight.copy_(torch.arange(1, 16, dtype=torch.float32).view(3, 5) * 1e-3)
    g = oneshot_masks(model, 0.8, "global")  # keep 9 of 45: all from layer 0
    assert [int(m.sum()) for m in g] == [9, 0]
    lamp = oneshot_masks(model, 0.8, "lamp")
    assert int(lamp[1].sum()) > 0 and sum(int(m.sum()) for m in lamp) == 9
