"""The one top-k selector: against a brute-force sort (score, then index), ties, NaN,
eligibility, floors, and the global rules built on it."""

from __future__ import annotations

import pytest
import torch

from nestsynth.pruning import prune_smallest_global
from nestsynth.select import keep_top_masks, top_k


def brute(scores: list[float], k: int, largest: bool, eligible: list[bool]) -> list[int]:
    """The oracle: sort eligible positions by (score, best first; NaN last; then index)."""
    def key(i):
        v = scores[i]
        v = float("-inf") if v != v else (v if largest else -v)
        return (-v, i)
    return sorted((i for i in range(len(scores)) if eligible[i]), key=key)[:max(k, 0)]


@pytest.mark.parametrize("largest", [True, False])
def test_top_k_equals_brute_force_with_many_ties(largest):
    gen = torch.Generator().manual_seed(0)
    for trial in range(60):
        n = int(torch.randint(1, 40, (1,), generator=gen))
        scores = torch.randint(-3, 4, (n,), generator=gen).float()  # few values: many ties
        if trial % 3 == 0:
            scores[torch.randint(0, n, (2,), generator=gen)] = float("nan")
        eligible = torch.rand(n, generator=gen) < 0.7
        for k in (0, 1, n // 2, n, n + 3):
            got = top_k(scores, k, largest=largest, eligible=eligible).tolist()
            assert got == brute(scores.tolist(), k, largest, eligible.tolist())
        assert top_k(scores.view(1, -1), n, largest=largest).tolist() == brute(scores.tolist(), n, largest, [True] * n)


def test_top_k_rank_order_and_clipping():
    s = torch.tensor([[0.5, 2.0], [2.0, -1.0]])
    assert top_k(s, 3).tolist() == [1, 2, 0]
    assert top_k(s, -1).tolist() == [] and top_k(s, 99).tolist() == [1, 2, 0, 3]
    assert top_k(s, 2, largest=False).tolist() == [3, 0]


# ---- global masks --------------------------------------------------------------------
def hand_scores():
    scores = [torch.tensor([[3.0, 1.0], [2.0, 9.0]]), torch.tensor([[4.0, -1.0, 5.0]])]
    masks = [torch.tensor([[1.0, 1.0], [1.0, 0.0]]), torch.ones(1, 3)]  # the 9 is dormant
    return scores, masks


def test_keep_top_keeps_exact_count_of_largest_live():
    scores, masks = hand_scores()
    out = keep_top_masks(scores, masks, 3)  # live scores 3,1,2,4,-1,5 -> keep 5,4,3
    assert torch.equal(out[0], torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    assert torch.equal(out[1], torch.tensor([[1.0, 0.0, 1.0]]))
    out = keep_top_masks(scores, masks, 10)  # clipped to the 6 live weights: never revives
    assert torch.equal(out[0], masks[0]) and torch.equal(out[1], masks[1])
    assert sum(int(m.sum()) for m in keep_top_masks(scores, masks, 0)) == 0


def test_keep_top_smallest_end_for_grasp():
    scores, masks = hand_scores()
    out = keep_top_masks(scores, masks, 2, largest=False)  # keep -1 and 1
    assert torch.equal(out[0], torch.tensor([[0.0, 1.0], [0.0, 0.0]]))
    assert torch.equal(out[1], torch.tensor([[0.0, 1.0, 0.0]]))


def test_keep_top_ties_by_position_and_nan_last():
    scores = [torch.tensor([[1.0, 2.0, 2.0]]), torch.tensor([[2.0, float("nan")]])]
    masks = [torch.ones(1, 3), torch.ones(1, 2)]
    out = keep_top_masks(scores, masks, 2)  # three 2's: the first two by position
    assert out[0].tolist() == [[0.0, 1.0, 1.0]] and out[1].tolist() == [[0.0, 0.0]]
    out = keep_top_masks(scores, masks, 4, largest=False)  # 1, then the 2's; NaN never
    assert out[0].tolist() == [[1.0, 1.0, 1.0]] and out[1].tolist() == [[1.0, 0.0]]


def test_global_topk_masks_hand_example():
    scores = [torch.tensor([[0.1, 0.9], [0.5, 0.2]]), torch.tensor([[0.6, 0.05, 0.7]])]
    masks = [torch.tensor([[1.0, 1.0], [1.0, 1.0]]), torch.tensor([[1.0, 1.0, 0.0]])]  # 0.7 dormant
    new = keep_top_masks(scores, masks, 3)  # the live 0.9, 0.6, 0.5
    assert torch.equal(new[0], torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    assert torch.equal(new[1], torch.tensor([[1.0, 0.0, 0.0]]))



def test_floors_keep_each_layers_best_then_rank_globally():
    scores = [torch.tensor([[9.0, 8.0, 7.0]]), torch.tensor([[0.1, 0.3]])]
    masks = [torch.ones(1, 3), torch.ones(1, 2)]
    out = keep_top_masks(scores, masks, 2, floors=[0, 1])  # layer 1 keeps its 0.3, then the global 9
    assert out[0].tolist() == [[1.0, 0.0, 0.0]] and out[1].tolist() == [[0.0, 1.0]]
    out = keep_top_masks(scores, masks, 0, floors=[1, 1])  # floors win over keep
    assert out[0].tolist() == [[1.0, 0.0, 0.0]] and out[1].tolist() == [[0.0, 1.0]]


def test_prune_smallest_global_is_the_complement_of_keep():
    gen = torch.Generator().manual_seed(3)
    scores = [torch.randint(0, 5, (4, 6), generator=gen).float(), torch.randint(0, 5, (3, 4), generator=gen).float()]
    masks = [(torch.rand(4, 6, generator=gen) < 0.8).float(), (torch.rand(3, 4, generator=gen) < 0.8).float()]
    live = sum(int(m.sum()) for m in masks)
    for n_remove in (0, 5, live - 2, live + 4):
        a = prune_smallest_global(scores, masks, n_remove, [1, 2])
        b = keep_top_masks(scores, masks, live - n_remove, floors=[1, 2])
        assert all(torch.equal(x, y) for x, y in zip(a, b))
        assert sum(int(m.sum()) for m in a) == max(live - max(n_remove, 0), 3)
