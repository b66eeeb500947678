"""Training budgets: steps per epoch with a minimum (train.min_steps_per_epoch)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nestsynth.config import TrainConfig, from_dict
from nestsynth.errors import NestError
from nestsynth.sparse import SparseMLP
from nestsynth.training import batch_indices, epoch_steps, samples_per_epoch, steps_per_epoch, train_epoch


@pytest.mark.parametrize("n, batch, min_steps, expected", [
    (54000, 128, 150, 422),   # MNIST minus a 10% validation split: one pass, unchanged
    (60000, 128, 150, 469),
    (45000, 128, 150, 352),   # CIFAR-10 minus 10%
    (1293, 128, 150, 150),    # digits minus 10%: 11 steps per pass, raised to 150
    (1293, 128, 0, 11),
    (1293, 128, 11, 11),
    (100, 128, 0, 1),
    (100, 128, 5, 5),
    (0, 128, 150, 0),
])
def test_steps_per_epoch(n, batch, min_steps, expected):
    assert steps_per_epoch(n, batch, min_steps) == expected


def test_default_config_leaves_mnist_sized_epochs_unchanged():
    cfg = TrainConfig()
    assert epoch_steps(cfg, 54000) == math.ceil(54000 / cfg.batch_size)
    assert epoch_steps(cfg, 1293) == cfg.min_steps_per_epoch == 150


def test_negative_min_steps_is_refused():
    with pytest.raises(NestError, match="train.min_steps_per_epoch"):
        from_dict({"train": {"min_steps_per_epoch": -1}})


def test_one_pass_draws_one_permutation():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    batches = batch_indices(10, 4, 3, g1)
    order = torch.randperm(10, generator=g2)
    assert [b.tolist() for b in batches] == [order[:4].tolist(), order[4:8].tolist(), order[8:].tolist()]
    assert torch.equal(g1.get_state(), g2.get_state())


def test_extra_steps_cycle_through_fresh_permutations():
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    batches = batch_indices(10, 4, 7, g1)  # 28 examples: three permutations, the last partly used
    stream = torch.cat([torch.randperm(10, generator=g2) for _ in range(3)])
    assert [len(b) for b in batches] == [4] * 7
    assert torch.equal(torch.cat(batches), stream[:28])
    assert sorted(stream[:10].tolist()) == list(range(10))  # every example once per permutation


def _old_train_epoch(model, X, y, optimizer, batch_size, generator, lr_at):
    """The training loop before train.min_steps_per_epoch existed (the oracle)."""
    model.train()
    order = torch.randperm(len(X), generator=generator)
    for b, start in enumerate(range(0, len(X), batch_size)):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(b)
        idx = order[start:start + batch_size]
        loss = F.cross_entropy(model(X[idx]), y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize("min_steps", [0, 5, 8])  # 8 = ceil(300 / 40), the natural count
def test_minimum_at_or_below_one_pass_changes_nothing(min_steps):
    X, y = torch.randn(300, 6, generator=torch.Generator().manual_seed(0)), torch.arange(300) % 3
    runs = []
    for new in (False, True):
        model = SparseMLP([6, 8, 3], generator=torch.Generator().manual_seed(1))
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        gen = torch.Generator().manual_seed(2)
        lr_at = lambda b: 1e-2 / (b + 1)  # noqa: E731 -- depends on the batch index
        for _ in range(2):
            if new:
                train_epoch(model, X, y, opt, 40, gen, lr_at=lr_at, steps=steps_per_epoch(300, 40, min_steps))
            else:
                _old_train_epoch(model, X, y, opt, 40, gen, lr_at)
        runs.append((model.state_dict(), gen.get_state()))
    (old, old_gen), (new, new_gen) = runs
    assert torch.equal(old_gen, new_gen)
    for key in old:
        assert torch.equal(old[key], new[key]), key


def test_train_epoch_takes_the_requested_steps():
    X, y = torch.randn(50, 4), torch.arange(50) % 2
    model = SparseMLP([4, 5, 2], generator=torch.Generator().manual_seed(0))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    count, seen = [0], []
    train_epoch(model, X, y, opt, 16, torch.Generator().manual_seed(0), progress=seen.append,
                after_step=lambda: count.__setitem__(0, count[0] + 1), steps=20)
    assert count[0] == 20
    assert seen == [16] * 20


def test_method_context_epoch_spans_the_minimum(digits):
    """RunContext.train's cosine schedule and optimizer steps use the same count."""
    from nest_helpers import mlp_context

    cfg = from_dict({"method": "dense", "train": {"batch_size": 128, "min_steps_per_epoch": 30}})
    ctx = mlp_context(cfg, digits, [64, 8, 10])
    model = ctx.dense_model()
    lrs, opt = [], ctx.optimizer(model)
    ctx.train(model, 2, opt, after_step=lambda: lrs.append(opt.param_groups[0]["lr"]))
    assert ctx.steps_per_epoch() == 30 > math.ceil(len(digits.train.X) / 128)
    assert len(lrs) == 60
    t = cfg.train
    expected = [t.lr * (t.min_lr_scale + (1 - t.min_lr_scale) * 0.5 * (1 + math.cos(math.pi * k / 60)))
                for k in range(60)]
    assert lrs == pytest.approx(expected)


@pytest.mark.parametrize("n, batch, steps, expected", [(1293, 128, 11, 1293), (1293, 128, 150, 19200),
                                                       (100, 128, 1, 100), (100, 128, 3, 384)])
def test_samples_per_epoch_counts_what_train_epoch_draws(n, batch, steps, expected):
    assert samples_per_epoch(n, batch, steps) == expected
    drawn = sum(len(b) for b in batch_indices(n, batch, steps, torch.Generator().manual_seed(0)))
    assert drawn == expected


def test_recalibrate_batch_norm_equals_the_data_statistics():
    """Running statistics after recalibration = the mean of the batch means and of the
    unbiased batch variances of the BN's input (equal batches), computed directly."""
    import torch

    from nestsynth.training import recalibrate_batch_norm

    torch.manual_seed(0)
    lin, bn = torch.nn.Linear(5, 3), torch.nn.BatchNorm1d(3)
    model = torch.nn.Sequential(lin, bn, torch.nn.ReLU(), torch.nn.Linear(3, 2)).eval()
    bn.running_mean.fill_(7.0)
    bn.running_var.fill_(9.0)
    X = torch.randn(40, 5) * 3 + 1
    assert recalibrate_batch_norm(model, X, batch_size=10)
    with torch.no_grad():
        h = lin(X).view(4, 10, 3)
    torch.testing.assert_close(bn.running_mean, h.mean(1).mean(0))
    torch.testing.assert_close(bn.running_var, h.var(1, unbiased=True).mean(0))
    assert bn.momentum == 0.1 and not model.training  # settings restored
    plain = torch.nn.Sequential(torch.nn.Linear(5, 2))
    before = plain[0].weight.clone()
    assert not recalibrate_batch_norm(plain, X) and torch.equal(plain[0].weight, before)
