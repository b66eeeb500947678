"""nestsynth.baselines.regularized: L0 hard-concrete gates and sensitivity-driven decay."""

from __future__ import annotations

import math

import pytest
import torch

from nest_helpers import mlp_context, sparse_model
from nestsynth.baselines.regularized import insensitivity_decay, sensitivity, threshold_prune
from nestsynth.pruning.gates import BETA, GAMMA, ZETA, L0Gates, deterministic_gate, hard_concrete_sample, prob_nonzero
from nestsynth.config import from_dict
from nestsynth.errors import NestError
from nestsynth.run_context import RunContext
from nestsynth.pruning import cubic_count


def _context(digits, method: str, mcfg: dict) -> RunContext:
    cfg = from_dict({"method": method, "train": {"batch_size": 64}, "methods": {method: mcfg}})
    return mlp_context(cfg, digits, [64, 32, 16, 10])


def _spread_gates(model, seed=0, low=-4.0, high=4.0) -> L0Gates:
    """Gates whose log_alpha spans closed (z_hat = 0), partial and open (z_hat = 1) gates."""
    gen = torch.Generator().manual_seed(seed)
    init = [torch.empty(layer.weight.shape).uniform_(low, high, generator=gen) for layer in model.layers]
    return L0Gates(model, init, generator=gen)


# ------------------------------------------------------------------------------ hard concrete

LOG_ALPHAS = torch.tensor([-4.0, -2.0, -0.5, 0.0, 1.0, 3.0])


@pytest.mark.parametrize("beta", [BETA, 0.5])
def test_expected_l0_equals_closed_form_and_monte_carlo(beta):
    # closed form 1 - Q(s_bar <= 0), written out with math on each entry
    t = -GAMMA / (ZETA - GAMMA)  # s_bar <= 0  <=>  s <= t
    for la, p in zip(LOG_ALPHAS.tolist(), prob_nonzero(LOG_ALPHAS, beta).tolist()):
        cdf = 1.0 / (1.0 + math.exp(-(beta * math.log(t / (1 - t)) - la)))
        assert p == pytest.approx(1.0 - cdf, abs=1e-6)
    # Monte Carlo: fraction of sampled gates that are not exactly zero
    gen = torch.Generator().manual_seed(0)
    n = 200_000
    u = torch.rand(n, len(LOG_ALPHAS), generator=gen)
    z = hard_concrete_sample(LOG_ALPHAS.expand(n, -1), u, beta)
    freq = (z != 0).float().mean(0)
    torch.testing.assert_close(freq, prob_nonzero(LOG_ALPHAS, beta), atol=5e-3, rtol=0)  # ~5 sigma


def test_hard_concrete_sample_formula_and_range():
    u = torch.tensor([0.2, 0.5, 0.9, 0.5])
    la = torch.tensor([0.3, -1.0, 2.0, -6.0])
    s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + la) / BETA)
    expected = torch.clamp(s * (ZETA - GAMMA) + GAMMA, 0, 1)
    torch.testing.assert_close(hard_concrete_sample(la, u), expected)
    assert float(expected[3]) == 0.0  # a closed gate is exactly zero


def test_deterministic_gate_formula():
    la = torch.tensor([0.0, math.log(3.0), -math.log(11.0), -10.0, 10.0, math.log(1 / 9)])
    # sigmoid: 0.5, 0.75, 1/12, ~0, ~1, 0.1  ->  s * 1.2 - 0.1, clamped to [0, 1]
    expected = torch.tensor([0.5, 0.8, 0.0, 0.0, 1.0, 0.02])
    torch.testing.assert_close(deterministic_gate(la), expected, atol=1e-6, rtol=0)
    # with u = 1/2 (no noise) and beta = 1 the sample is the test-time gate
    torch.testing.assert_close(hard_concrete_sample(la, torch.full_like(la, 0.5), 1.0), deterministic_gate(la))


# ------------------------------------------------------------------------------------ L0Gates


def test_penalty_and_expected_l0_match_hand_formula():
    model = sparse_model(density=0.6, seed=3)
    gates = _spread_gates(model, seed=3)
    lam, n, wd = 0.7, 50, 0.3
    shift = BETA * math.log(-GAMMA / ZETA)
    expected, l0 = 0.0, 0.0
    for i, layer in enumerate(model.layers):
        for (r, c), m in zip(torch.cartesian_prod(*(torch.arange(k) for k in layer.mask.shape)).tolist(),
                             layer.mask.flatten().tolist()):
            if m:
                p = 1 / (1 + math.exp(-(float(gates.log_alpha(i).detach()[r, c]) - shift)))
                expected += p * (lam + 0.5 * wd * float(layer.weight.detach()[r, c]) ** 2) / n
                l0 += p
    with torch.no_grad():
        got, got_plain = float(gates.penalty(lam, n, wd)), float(gates.penalty(lam, n))
        got_l0 = float(gates.expected_l0())
    assert got == pytest.approx(expected, rel=1e-5)
    assert got_plain == pytest.approx(lam * l0 / n, rel=1e-5)
    assert got_l0 == pytest.approx(l0, rel=1e-5)


@pytest.mark.parametrize("batch_norm", [False, True])
def test_folded_model_equals_gated_deterministic_network_exactly(batch_norm):
    model = sparse_model(density=0.7, seed=5, batch_norm=batch_norm)
    gates = _spread_gates(model, seed=5).eval()
    x = torch.randn(9, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        gated = gates(x)
    old = [(layer.weight.detach().clone(), layer.mask.clone()) for layer in model.layers]
    z_hats = [deterministic_gate(gates.log_alpha(i)).detach() for i in range(len(model.layers))]
    folded = gates.deterministic_model()
    with torch.no_grad():
        assert torch.equal(folded.eval()(x), gated)
    for layer, (w, m), z in zip(folded.layers, old, z_hats):
        assert torch.equal(layer.mask, m * (z > 0).float())
        assert torch.equal(layer.weight.detach(), w * z)
        assert float(layer.weight.detach()[layer.mask == 0].abs().sum()) == 0.0
    assert 0 < folded.active_weights() < model.active_weights()  # some gates closed, the source untouched


def test_gates_sample_fresh_noise_in_train_mode_only():
    gates = _spread_gates(sparse_model(seed=2), seed=2, low=-1.0, high=1.0)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = gates.train()(x), gates(x)
        c, d = gates.eval()(x), gates(x)
    assert not torch.equal(a, b)
    assert torch.equal(c, d)


# -------------------------------------------------------------------------------- run_l0


def test_l0_without_penalty_keeps_every_connection(digits):
    from nestsynth.baselines.regularized import run_l0

    ctx = _context(digits, "l0", {"lam": 0.0, "epochs": 1})
    model = run_l0(ctx, ctx.cfg.methods.l0)
    total = sum(layer.mask.numel() for layer in model.layers)
    assert all(bool((layer.mask == 1).all()) for layer in model.layers)  # every z_hat > 0
    assert model.active_weights() == total
    assert ctx.history[-1]["phase"] == "final" and ctx.history[-1]["weights"] == total


def test_l0_end_to_end_on_digits_prunes_by_the_gates(digits):
    from nestsynth.baselines.regularized import run_l0

    # gates start just above the z_hat = 0 boundary (log_alpha = -2.2 > -log 11), a strong penalty
    ctx = _context(digits, "l0", {"lam": 200.0, "epochs": 1, "init_droprate": 0.9, "gate_lr_scale": 50.0})
    model = run_l0(ctx, ctx.cfg.methods.l0)
    total = sum(layer.mask.numel() for layer in model.layers)
    assert model.active_weights() < 0.5 * total
    for layer in model.layers:
        assert set(layer.mask.unique().tolist()) <= {0.0, 1.0}
        assert float(layer.weight.detach()[layer.mask == 0].abs().sum()) == 0.0
    assert [r["phase"] for r in ctx.history] == ["l0", "final"]
    assert ctx.history[-1]["weights"] == model.active_weights() == ctx.history[0]["weights"]
    assert ctx.epochs == 1


# ----------------------------------------------------------------------------- sensitivity


def _hand_sensitivity(model, X, y, variant):
    """Per-example autograd of each softmax output wrt every weight, |.|, averaged."""
    model.eval()
    sums = [torch.zeros_like(layer.weight) for layer in model.layers]
    for xn, yn in zip(X, y):
        probs = torch.softmax(model(xn[None]), 1)[0]
        classes = [int(yn)] if variant == "supervised" else range(len(probs))
        alpha = 1.0 if variant == "supervised" else 1.0 / len(probs)
        for k in classes:
            grads = torch.autograd.grad(probs[k], [layer.weight for layer in model.layers], retain_graph=True)
            for s, g in zip(sums, grads):
                s += alpha * g.abs()
    return [s / len(X) for s in sums]


@pytest.mark.parametrize("variant", ["supervised", "unsupervised"])
@pytest.mark.parametrize("widths,batch_norm", [((5, 4, 3), False), ((6, 5, 4, 3), True)])
def test_sensitivity_equals_per_example_autograd(variant, widths, batch_norm):
    model = sparse_model(widths, density=0.7, seed=11, batch_norm=batch_norm, activations="tanh")
    gen = torch.Generator().manual_seed(4)
    X, y = torch.randn(7, widths[0], generator=gen), torch.randint(widths[-1], (7,), generator=gen)
    model.train()
    got = sensitivity(model, X, y, variant)
    assert model.training  # mode restored
    for s, h in zip(got, _hand_sensitivity(model, X, y, variant)):
        torch.testing.assert_close(s, h, atol=1e-7, rtol=1e-5)
    # a single weight by hand on the 2-layer net: output c of example 0 wrt W1[0, 1]
    if len(widths) == 3 and variant == "supervised":
        w = model.layers[0].weight
        p = torch.softmax(model(X[:1]), 1)[0, int(y[0])]
        (g,) = torch.autograd.grad(p, w)
        single = sensitivity(model, X[:1], y[:1], variant)[0][0, 1]
        assert float(single) == pytest.approx(abs(float(g[0, 1])), rel=1e-5)


@pytest.mark.parametrize("variant", ["supervised", "unsupervised"])
def test_conv_sensitivity_equals_per_example_autograd_on_tiny_cnn(digits, variant):
    """tiny-cnn (conv 8@3x3 pad 1, conv 16@3x3 pad 1, fc, fc) with sparse kernels and a partial
    area on conv2: every layer's S equals autograd one example and one class at a time."""
    from nestsynth.api import resolve_reference

    model = resolve_reference("tiny-cnn", digits).build(torch.Generator().manual_seed(12))
    gen = torch.Generator().manual_seed(13)
    with torch.no_grad():
        for layer in model.layers:
            layer.mask.copy_((torch.rand(layer.mask.shape, generator=gen) < 0.7).float())
            layer.weight.mul_(layer.mask)
        model.layers[1].area[:, 0, :] = 0  # conv2 computes no position of its first output row
        model.layers[1].area[3] = 0  # nor any position of channel 3
    X, y = digits.train.X[:6], digits.train.y[:6]
    got = sensitivity(model, X, y, variant)
    hand = _hand_sensitivity(model, X, y, variant)
    assert got[0].shape == (8, 1, 3, 3) and float(got[1][3].abs().sum()) == 0.0
    for s, h in zip(got, hand):
        torch.testing.assert_close(s, h, atol=1e-8, rtol=1e-5)


def test_conv_sensitivity_on_a_graph_with_strides_and_a_summed_output(monkeypatch):
    """A graph network whose conv has stride 2 and whose output is the sum of two linear layers
    (not its last layer's output): S equals per-example autograd of the network's output."""
    from torch import nn
    from nestsynth.baselines import regularized
    from nestsynth.graph import SparseGraph

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Conv2d(3, 4, 2)
            self.a, self.b = nn.Linear(64, 5), nn.Linear(64, 5)  # c2: 4 x 4 x 4

        def forward(self, x):
            h = torch.tanh(self.c2(torch.tanh(self.c1(x)))).flatten(1)
            return self.a(h) + self.b(h)

    monkeypatch.setattr(regularized, "CONV_CHUNK", 40)  # several chunks of examples
    torch.manual_seed(0)
    model = SparseGraph.from_module(Net(), (2, 9, 9))
    assert not model.output_is_last_layer
    gen = torch.Generator().manual_seed(14)
    X, y = torch.randn(5, 2, 9, 9, generator=gen), torch.randint(5, (5,), generator=gen)
    for variant in ("supervised", "unsupervised"):
        for s, h in zip(sensitivity(model, X, y, variant), _hand_sensitivity(model, X, y, variant)):
            torch.testing.assert_close(s, h, atol=1e-8, rtol=1e-5)


def test_insensitivity_decay_equals_update_formula():
    model = sparse_model(density=0.6, seed=7)
    gen = torch.Generator().manual_seed(7)
    sens = [torch.rand(layer.weight.shape, generator=gen) * 1.5 for layer in model.layers]  # some S > 1
    before = [layer.weight.detach().clone() for layer in model.layers]
    lam = 0.3
    insensitivity_decay(model, sens, lam)
    for layer, w, s in zip(model.layers, before, sens):
        for wv, sv, nv in zip(w.flatten().tolist(), s.flatten().tolist(), layer.weight.flatten().tolist()):
            assert nv == pytest.approx(wv - lam * wv * max(0.0, 1.0 - sv), abs=1e-7)
        assert float(layer.weight.detach()[layer.mask == 0].abs().sum()) == 0.0


def test_threshold_prune_removes_exactly_the_small_weights():
    model = sparse_model(density=0.8, seed=9)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(3, 6)).sum().backward()
    opt.step()
    model.zero_dormant()
    T = 0.2
    hand = sum(1 for layer in model.layers for w, m in zip(layer.weight.flatten().tolist(),
                                                           layer.mask.flatten().tolist()) if m and abs(w) < T)
    old = [(layer.weight.detach().clone(), layer.mask.clone()) for layer in model.layers]
    assert 0 < hand < model.active_weights()
    assert threshold_prune(model, T, opt) == hand
    for layer, (w, m) in zip(model.layers, old):
        keep = m * (w.abs() >= T).float()
        assert torch.equal(layer.mask, keep)
        assert torch.equal(layer.weight.detach(), w * keep)
        assert float(opt.state[layer.weight]["momentum_buffer"][keep == 0].abs().sum()) == 0.0


def test_sensitivity_without_decay_and_threshold_keeps_every_connection(digits):
    from nestsynth.baselines.regularized import run_sensitivity

    ctx = _context(digits, "sensitivity", {"lam": 0.0, "threshold": 0.0, "epochs": 1, "final_epochs": 0})
    model = run_sensitivity(ctx, ctx.cfg.methods.sensitivity)
    assert all(bool((layer.mask == 1).all()) for layer in model.layers)
    assert ctx.history[1]["phase"] == "threshold" and ctx.history[1]["pruned"] == 0


@pytest.mark.parametrize("variant,sgd_lr", [("supervised", 0.1), ("unsupervised", 0.0)])
def test_sensitivity_end_to_end_on_digits(digits, variant, sgd_lr):
    from nestsynth.baselines.regularized import run_sensitivity

    mcfg = {"lam": 0.05, "threshold": 0.02, "epochs": 1, "final_epochs": 1, "variant": variant, "sgd_lr": sgd_lr}
    ctx = _context(digits, "sensitivity", mcfg)
    model = run_sensitivity(ctx, ctx.cfg.methods.sensitivity)
    total = sum(layer.mask.numel() for layer in model.layers)
    phases = [r["phase"] for r in ctx.history]
    assert phases == ["regularize", "threshold", "final"]
    below = ctx.history[0]["below_threshold"]
    assert below > 0 and ctx.history[1]["pruned"] == below == total - ctx.history[1]["weights"]
    assert model.active_weights() == ctx.history[-1]["weights"] <= total - below  # retraining never revives
    for layer in model.layers:
        assert float(layer.weight.detach()[layer.mask == 0].abs().sum()) == 0.0
    assert ctx.epochs == 2


# ---------------------------------------------------------------------------------- config


@pytest.mark.parametrize("method,key,value", [
    ("l0", "init_droprate", 1.0), ("l0", "lam", -1.0), ("l0", "temperature", 0.0), ("l0", "target_release", 0.5),
    ("sensitivity", "variant", "both"), ("sensitivity", "lam", 1.0), ("sensitivity", "threshold", -0.1)])
def test_config_rejects_out_of_range_values(method, key, value):
    with pytest.raises(NestError, match=f"methods.{method}.{key}"):
        from_dict({"method": method, "methods": {method: {key: value}}})


def test_l0_size_control_raises_lam_above_the_goal_and_lowers_it_below():
    from nestsynth.pruning.gates import L0Gates, L0SizeControl
    from nestsynth.sparse import SparseMLP

    model = SparseMLP([6, 5, 3])
    open_ = L0Gates(model, [torch.full(layer.weight.shape, 5.0) for layer in model.layers])
    ctl = L0SizeControl(open_, 1.0, 10, steps=3, gain=0.1)  # goal falls from 45 to 10 over 2 steps
    assert [ctl.goal(t) for t in range(3)] == [cubic_count(t, 45, 10, 2) for t in range(3)]
    ctl()  # every gate open: E[L0] ~ 45 > goal -> lam *= exp(0.1 * clip(ratio - 1))
    ratio = float(open_.expected_l0().detach()) / ctl.goal(0)
    assert ctl.lam == pytest.approx(math.exp(0.1 * min(ratio - 1, 1.0)))
    shut = L0Gates(model, [torch.full(layer.weight.shape, -8.0) for layer in model.layers])
    low = L0SizeControl(shut, 1.0, 10, steps=3, gain=0.1, release=1.0)
    low()  # every gate nearly shut: E[L0] << goal -> lam falls, by at most exp(-0.1)
    assert math.exp(-0.1) <= low.lam < 1.0
    # below the goal lam falls release times as fast: exp(release * gain * (ratio - 1))
    fast = L0SizeControl(shut, 1.0, 10, steps=3, gain=0.1, release=25.0)
    fast()
    ratio = float(shut.expected_l0().detach()) / fast.goal(0)
    assert fast.lam == pytest.approx(math.exp(25.0 * 0.1 * (ratio - 1)))
    assert fast.lam < low.lam ** 20
    rise = L0SizeControl(open_, 1.0, 10, steps=3, gain=0.1, release=25.0)
    rise()  # above the goal the release does not apply
    assert rise.lam == pytest.approx(ctl.lam)


def test_keep_most_open_keeps_exactly_the_largest_log_alpha():
    from nestsynth.pruning.gates import L0Gates, deterministic_gate, keep_most_open
    from nestsynth.sparse import SparseMLP

    gen = torch.Generator().manual_seed(1)
    model = SparseMLP([4, 3, 2], generator=gen)
    w0 = [layer.weight.detach().clone() for layer in model.layers]
    la = [torch.randn(layer.weight.shape, generator=gen) * 3 for layer in model.layers]
    gates = L0Gates(model, la)
    keep_most_open(gates, 7)
    flat = torch.cat([a.flatten() for a in la])
    threshold = flat.sort(descending=True).values[6]
    for layer, a, w in zip(model.layers, la, w0):
        assert torch.equal(layer.mask.bool(), a >= threshold)
        z = deterministic_gate(a)
        expected = torch.where(z > 0, w * z, w) * layer.mask
        assert torch.allclose(layer.weight.detach(), expected)
    assert sum(int(layer.mask.sum()) for layer in model.layers) == 7


def test_the_configured_release_reaches_both_size_controllers(digits, monkeypatch):
    import nestsynth.baselines.regularized as regularized
    import nestsynth.synthesis as synthesis
    from nestsynth.config import PruningConfig
    from nestsynth.pruning import gates as G
    from test_size_target import _l0_cfg, _run

    # config.py imports nothing from the methods, so its default is a literal: it must equal RELEASE
    assert PruningConfig().gate_release == regularized.L0Config().target_release == G.RELEASE
    seen = []

    class Recorder(G.L0SizeControl):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen.append(self.release)

    monkeypatch.setattr(regularized, "L0SizeControl", Recorder)
    monkeypatch.setattr(synthesis, "L0SizeControl", Recorder)
    ctx = _context(digits, "l0", {"epochs": 2, "target_weights": 300, "target_release": 3.0})
    regularized.run_l0(ctx, ctx.cfg.methods.l0)
    _run(_l0_cfg(gate_release=7.0), digits)
    assert seen == [3.0, 7.0]
