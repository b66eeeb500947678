"""Magnitude baselines: exact mask rules against hand counts and closed forms, and one
short end-to-end run of every method on digits."""

from __future__ import annotations

import math

import pytest
import torch
from nest_helpers import mlp_context, sparse_model

from nestsynth.baselines import magnitude as mag
from nestsynth.baselines.registry import get_method, list_methods
from nestsynth.config import from_dict
from nestsynth.errors import NestError
from nestsynth.run_context import RunContext
from nestsynth.sparse import SparseMLP

WIDTHS = [64, 32, 16, 10]
SIZES = [64 * 32, 32 * 16, 16 * 10]


def make_ctx(digits, name: str, options: dict, seed: int = 0) -> RunContext:
    """A context for method ``name`` on digits with a small reference net."""
    cfg = from_dict({"method": name, "seed": seed, "train": {"batch_size": 64},
                     "methods": {name: options}})
    return mlp_context(cfg, digits, WIDTHS)


def run(digits, name: str, options: dict, seed: int = 0):
    """Run method ``name``; returns (model, ctx)."""
    ctx = make_ctx(digits, name, options, seed)
    model = get_method(name).run(ctx, getattr(ctx.cfg.methods, name))
    return model, ctx


def masks_of(model) -> list[torch.Tensor]:
    return [layer.mask.clone() for layer in model.layers]


def is_subset(new: torch.Tensor, old: torch.Tensor) -> bool:
    return bool(((new == 1) <= (old == 1)).all())


# ---- registration ------------------------------------------------------------------------
def test_methods_registered_in_order():
    names = [m.name for m in list_methods()]
    expected = ["nest", "dense", "random", "han", "oneshot", "gradual", "lottery"]
    assert names[:7] == expected


@pytest.mark.parametrize("name, options, key", [
    ("random", {"sparsity": 1.0}, "methods.random.sparsity"),
    ("han", {"quality": 0.0}, "methods.han.quality"),
    ("oneshot", {"scope": "row"}, "methods.oneshot.scope"),
    ("gradual", {"epochs": 10, "end_epoch": 12}, "methods.gradual.end_epoch"),
    ("gradual", {"initial_sparsity": 0.99}, "methods.gradual.initial_sparsity"),
    ("lottery", {"rate": 1.0}, "methods.lottery.rate"),
])
def test_validation_names_the_key(name, options, key):
    with pytest.raises(NestError, match=key.replace(".", r"\.")):
        from_dict({"method": name, "methods": {name: options}})


# ---- pure rules -------------------------------------------------------------------------
def test_random_mask_exact_count():
    gen = torch.Generator().manual_seed(0)
    for shape, keep in [((7, 5), 0), ((7, 5), 12), ((300, 100), 1500), ((3, 3), 9)]:
        m = mag.random_mask(shape, keep, gen)
        assert m.shape == shape and int(m.sum()) == keep and set(m.unique().tolist()) <= {0.0, 1.0}
    assert mag.keep_count(235200, 0.95) == 11760 and mag.keep_count(1000, 0.95) == 50


def test_topk_mask_hand_example():
    scores = torch.tensor([[0.1, 0.9, 0.5], [0.7, 0.3, 0.8]])
    mask = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 1.0]])  # 0.9 is dormant: must stay off
    new = mag.topk_mask(scores, mask, 2)
    assert torch.equal(new, torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 1.0]]))
    assert torch.equal(mag.topk_mask(scores, mask, 10), mask)  # more than live: no change


def test_prune_rate_mask_removes_exact_rate():
    gen = torch.Generator().manual_seed(1)
    scores = torch.rand(20, 30, generator=gen)
    mask = (torch.rand(20, 30, generator=gen) < 0.7).float()
    live = int(mask.sum())
    new = mag.prune_rate_mask(scores, mask, 0.2)
    assert int(new.sum()) == live - round(0.2 * live) and is_subset(new, mask)
    # the survivors are exactly the largest live scores
    live_scores = scores[mask.bool()].sort(descending=True).values
    assert scores[new.bool()].min() >= live_scores[int(new.sum()) - 1]


def test_han_mask_hand_computation():
    w = torch.tensor([[-3.0, -1.0], [1.0, 3.0]])
    # std by hand: mean 0, sum of squares 20, unbiased variance 20 / 3
    std = mag.layer_std(w)
    assert std == pytest.approx(math.sqrt(20 / 3))
    # q = 0.5: threshold 1.291 -> the two 1s go, the two 3s stay
    assert torch.equal(mag.han_mask(w, torch.ones(2, 2), 0.5, std), torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    # q = 0.3: threshold 0.775 -> everything stays; a dormant entry is never revived
    mask = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    assert torch.equal(mag.han_mask(w, mask, 0.3, std), mask)
    # |w| == threshold is kept (the rule prunes |w| < T)
    assert torch.equal(mag.han_mask(w, torch.ones(2, 2), 1.0, 1.0), torch.ones(2, 2))
    # q too large: only the largest live weight survives (ties: topk keeps one)
    assert int(mag.han_mask(w, mask, 10.0, std).sum()) == 1


def test_han_default_quality_schedule():
    qs = [mag.HanMethodConfig().qualities(k, 3) for k in range(5)]
    assert [q[0] for q in qs] == pytest.approx([0.8, 1.075, 1.35, 1.625, 1.9])
    assert qs[-1] == pytest.approx([1.9, 1.9, 1.9 * 0.75])


def test_gradual_sparsity_matches_cubic_formula():
    f = lambda t: mag.gradual_sparsity(t, 10, 50, 10, 0.0, 0.9)
    assert f(9) is None and f(25) is None and f(60) is None  # off the schedule
    assert f(10) == 0.0
    assert f(20) == pytest.approx(0.9 - 0.9 * (1 - 10 / 40) ** 3)  # 0.5203125
    assert f(20) == pytest.approx(0.5203125)
    assert f(50) == 0.9
    # the end step is a pruning step even when it is off the frequency grid
    assert mag.gradual_sparsity(47, 10, 47, 10, 0.1, 0.8) == 0.8
    assert mag.gradual_sparsity(40, 10, 47, 10, 0.1, 0.8) == pytest.approx(0.8 - 0.7 * (1 - 30 / 37) ** 3)


def test_gradual_pruner_mid_schedule_counts_and_nesting():
    model = SparseMLP([6, 5, 4, 3], generator=torch.Generator().manual_seed(0))
    sizes = [30, 20, 12]
    pruner = mag.GradualPruner(model, None, begin=10, end=50, frequency=10, initial=0.0, final=0.9)
    gen = torch.Generator().manual_seed(3)
    previous = masks_of(model)
    for step in range(1, 51):
        with torch.no_grad():  # stand-in for training: move the live weights
            for layer in model.layers:
                layer.weight.add_(0.1 * torch.randn(layer.weight.shape, generator=gen) * layer.mask)
        pruner()
        current = masks_of(model)
        assert all(is_subset(c, p) for c, p in zip(current, previous))  # never revives
        previous = current
        if step == 20:  # s = 0.9 - 0.9 (3/4)^3 = 0.5203125 -> keep round(n * 0.4796875)
            assert [int(m.sum()) for m in current] == [round(n * 0.4796875) for n in sizes] == [14, 10, 6]
        if step == 25:  # between pruning steps nothing changes
            assert [int(m.sum()) for m in current] == [14, 10, 6]
    assert [int(m.sum()) for m in previous] == [round(n * 0.1) for n in sizes] == [3, 2, 1]
    assert all(torch.equal(layer.weight * (1 - layer.mask), torch.zeros_like(layer.weight))
               for layer in model.layers)


def test_lottery_reset_is_exact_and_masks_nested():
    model = sparse_model((6, 5, 4, 3), density=1.0, seed=2)
    init = mag.snapshot(model)
    gen = torch.Generator().manual_seed(4)
    previous = masks_of(model)
    for _ in range(4):
        with torch.no_grad():  # stand-in for a round of training
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen))
            model.zero_dormant()
        live = [int(m.sum()) for m in previous]
        masks = mag.lottery_prune_reset(model, init, 0.2, 0.1)
        removed = [a - int(m.sum()) for a, m in zip(live, masks)]
        assert removed == [round(0.2 * live[0]), round(0.2 * live[1]), round(0.1 * live[2])]
        assert all(is_subset(m, p) for m, p in zip(masks, previous))
        for i, layer in enumerate(model.layers):
            assert torch.equal(layer.weight, init[f"layers.{i}.weight"] * layer.mask)
            assert torch.equal(layer.bias, init[f"layers.{i}.bias"])
            assert torch.equal(layer.mask, masks[i])
        previous = masks


def test_rewind_hook_snapshots_after_k_steps():
    model = SparseMLP([4, 3, 2], generator=torch.Generator().manual_seed(0))
    hook = mag._Rewind(model, 3)
    for k in range(1, 6):
        with torch.no_grad():
            model.layers[0].weight.fill_(float(k))
        hook()
    assert torch.equal(hook.state["layers.0.weight"], torch.full((3, 4), 3.0))


# ---- end to end on digits -------------------------------------------------------------------
def test_dense_run_keeps_everything(digits):
    model, ctx = run(digits, "dense", {"epochs": 1})
    assert model.active_per_layer() == SIZES and ctx.dense is not None
    assert ctx.history[-1]["phase"] == "final" and ctx.epochs == 1


def test_random_run_exact_per_layer(digits):
    model, ctx = run(digits, "random", {"sparsity": 0.9, "epochs": 1})
    expected = [round(n * 0.1) for n in SIZES]  # 205, 51, 16
    assert [int(layer.mask.sum()) for layer in model.layers] == expected
    assert model.active_per_layer() == expected


def test_oneshot_run_layer_and_global(digits):
    model, _ = run(digits, "oneshot", {"dense_epochs": 1, "finetune_epochs": 1, "sparsity": 0.95})
    assert [int(layer.mask.sum()) for layer in model.layers] == [round(n * 0.05) for n in SIZES]
    model, ctx = run(digits, "oneshot", {"dense_epochs": 1, "finetune_epochs": 0, "sparsity": 0.9,
                                         "scope": "global"})
    keep = round(sum(SIZES) * 0.1)
    assert sum(int(layer.mask.sum()) for layer in model.layers) == keep == model.active_weights()
    assert [r["phase"] for r in ctx.history] == ["dense", "prune", "final"]
    assert ctx.history[1]["weights"] == keep


def test_oneshot_global_matches_brute_force():
    model = sparse_model((6, 5, 4, 3), density=1.0, seed=5)
    masks = mag.oneshot_masks(model, 0.75, "global")
    scores = torch.cat([layer.weight.detach().abs().flatten() for layer in model.layers])
    keep = round(scores.numel() * 0.25)
    threshold = scores.sort(descending=True).values[keep - 1]
    expected = [(layer.weight.detach().abs() >= threshold).float() for layer in model.layers]
    assert all(torch.equal(m, e) for m, e in zip(masks, expected))


def test_han_run_reproduces_the_rule(digits):
    opts = {"dense_epochs": 1, "iterations": 2, "retrain_epochs": 0, "quality": 0.5, "quality_step": 0.5,
            "quality_output_scale": 0.5}
    model, ctx = run(digits, "han", opts)
    # oracle: the same dense training in a fresh context, then |w| >= q_last * std by hand
    ref_ctx = make_ctx(digits, "han", opts)
    ref = ref_ctx.dense_model()
    ref_ctx.train(ref, 1, ref_ctx.optimizer(ref, weight_decay=1e-4))
    for i, (layer, q) in enumerate(zip(ref.layers, [1.0, 1.0, 0.5])):
        w = layer.weight.detach().double()
        std = math.sqrt(float(((w - w.mean()) ** 2).sum()) / (w.numel() - 1))
        expected = (w.abs() >= q * std).float()
        assert torch.equal(model.layers[i].mask, expected)
    counts = [r["weights"] for r in ctx.history]
    assert counts == sorted(counts, reverse=True) and counts[-1] == model.active_weights()


def test_han_run_with_retraining_is_nested(digits):
    model, ctx = run(digits, "han", {"dense_epochs": 1, "iterations": 3, "retrain_epochs": 1})
    phases = [r["phase"] for r in ctx.history]
    assert phases == ["dense"] + ["prune", "retrain"] * 3 + ["final"]
    counts = [r["weights"] for r in ctx.history]
    assert counts == sorted(counts, reverse=True) and counts[-1] < sum(SIZES)
    assert ctx.epochs == 1 + 3


def test_gradual_run_final_and_mid_schedule(digits):
    opts = {"epochs": 3, "begin_epoch": 0, "end_epoch": 2, "frequency": 5, "final_sparsity": 0.9}
    model, ctx = run(digits, "gradual", opts)
    assert [int(layer.mask.sum()) for layer in model.layers] == [round(n * 0.1) for n in SIZES]
    assert model.active_per_layer() == [round(n * 0.1) for n in SIZES]
    # after epoch 1 (step P) the last pruning step is the largest multiple of 5 <= P
    per_epoch = max(math.ceil(len(ctx.X) / 64), ctx.cfg.train.min_steps_per_epoch)
    t = (per_epoch // 5) * 5
    s = 0.9 - 0.9 * (1 - t / (2 * per_epoch)) ** 3
    row = ctx.history[0]
    assert row["iteration"] == 1 and row["sparsity"] == pytest.approx(s)
    assert row["layer_weights"] == [round(n * (1 - s)) for n in SIZES]


def test_lottery_run_counts_per_round(digits):
    model, ctx = run(digits, "lottery", {"epochs_per_round": 1, "rounds": 3})
    live, expected = list(SIZES), []
    for _ in range(3):
        live = [a - round(r * a) for a, r in zip(live, [0.2, 0.2, 0.1])]
        expected.append(live)
    pruned = [r["layer_weights"] for r in ctx.history if r["phase"] == "prune"]
    assert pruned == expected
    assert model.active_per_layer() == expected[-1] and ctx.epochs == 4
    assert ctx.dense is not None and ctx.history[-1]["phase"] == "final"


def test_lottery_rewind_beyond_first_round_is_an_error(digits):
    ctx = make_ctx(digits, "lottery", {"epochs_per_round": 1, "rewind_steps": 10_000})
    with pytest.raises(NestError, match="rewind_steps"):
        get_method("lottery").run(ctx, ctx.cfg.methods.lottery)


def test_lottery_run_with_rewinding(digits):
    model, ctx = run(digits, "lottery", {"epochs_per_round": 1, "rounds": 1, "rewind_steps": 5})
    assert model.active_per_layer() == [a - round(r * a) for a, r in zip(SIZES, [0.2, 0.2, 0.1])]


def test_gradual_global_scope_hits_the_total_and_ranks_across_layers(digits):
    opts = {"epochs": 2, "begin_epoch": 0, "end_epoch": 2, "frequency": 5, "final_sparsity": 0.9,
            "scope": "global"}
    model, _ = run(digits, "gradual", opts)
    counts = [int(layer.mask.sum()) for layer in model.layers]
    assert sum(counts) == round(sum(SIZES) * 0.1) and counts != [round(n * 0.1) for n in SIZES]
    # the layers end at different sparsities (one ranking), every kept weight non-zero
    kept = torch.cat([layer.weight.detach().abs()[layer.mask.bool()] for layer in model.layers])
    assert len(kept) == sum(counts) and bool((kept > 0).all())
