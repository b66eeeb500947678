"""Size-targeted, budgeted pruning (pruning.target_weights / budget_epochs / scope / rewire)
and the global selector, against hand counts and a brute-force sort."""

from __future__ import annotations

import pytest
import torch

from nestsynth.api import resolve_reference
from nestsynth.pruning import cubic_count, erk_allocation, prune_smallest_global, split_removal
from nestsynth.run_context import RunContext
from nestsynth.synthesis import Synthesis, nest_report

from test_synthesis import small_cfg


def _run(cfg, digits):
    syn = Synthesis(RunContext(cfg, digits, resolve_reference(cfg.model, digits)))
    model = syn.run()
    report = nest_report(syn.ctx, model)
    return syn, model, report


def test_cubic_count_by_hand():
    assert [cubic_count(t, 1000, 100, 4) for t in range(6)] == [
        round(100 + 900 * (1 - k / 4) ** 3) for k in (1, 2, 3, 4)] + [100, 100]
    assert cubic_count(-1, 500, 50, 2) == 500  # before the schedule: the start
    assert cubic_count(0, 100, 100, 3) == 100


def test_split_removal_floors_and_proportion():
    assert split_removal(60, [100, 200, 300], [1, 1, 1]) == [10, 20, 30]
    assert split_removal(60, [100, 200, 3], [1, 1, 3]) == [20, 40, 0]
    assert split_removal(0, [5, 5], [1, 1]) == [0, 0]


def test_erk_allocation_by_hand():
    # counts proportional to the sum of each shape's dimensions: 1084 : 400 : 110
    assert erk_allocation(3000, [(300, 784), (100, 300), (10, 100)]) == [2040, 753, 207]
    assert erk_allocation(1594, [(300, 784), (100, 300), (10, 100)]) == [1084, 400, 110]
    # the small layer is full (100 of 100): the rest goes to the other one
    assert erk_allocation(2000, [(10, 100), (10, 10)]) == [1000, 100]
    assert erk_allocation(1050, [(10, 100), (10, 10)]) == [950, 100]
    assert erk_allocation(5000, [(10, 100), (10, 10)]) == [1000, 100]  # all there is
    # a conv kernel counts its height and width: (6 + 1 + 5 + 5) : (10 + 6)
    assert erk_allocation(33, [(6, 1, 5, 5), (10, 6)]) == [17, 16]
    for total in range(0, 1200, 37):
        assert sum(erk_allocation(total, [(10, 100), (10, 10), (3, 10)])) == min(total, 1130)


def test_global_selector_equals_brute_force_sort():
    gen = torch.Generator().manual_seed(3)
    scores = [torch.rand(4, 5, generator=gen), torch.rand(3, 4, generator=gen), torch.rand(2, 3, generator=gen)]
    masks = [(torch.rand(s.shape, generator=gen) > 0.3).float() for s in scores]
    floors = [2, 0, 3]
    for n in (0, 1, 7, 15, 100):
        new = prune_smallest_global(scores, masks, n, floors)
        # brute force: every live entry not among its layer's `floor` largest, sorted by score
        protected = set()
        for li, (s, m, f) in enumerate(zip(scores, masks, floors)):
            live = sorted(((float(s.flatten()[j]), j) for j in range(s.numel()) if m.flatten()[j] > 0), reverse=True)
            protected |= {(li, j) for _, j in live[:f]}
        cands = sorted((float(s.flatten()[j]), li, j) for li, (s, m) in enumerate(zip(scores, masks))
                       for j in range(s.numel()) if m.flatten()[j] > 0 and (li, j) not in protected)
        gone = {(li, j) for _, li, j in cands[:n]}
        for li, (m, nm) in enumerate(zip(masks, new)):
            for j in range(m.numel()):
                assert nm.flatten()[j] == (0.0 if (li, j) in gone or m.flatten()[j] == 0 else 1.0)
            assert int(nm.sum()) >= min(floors[li], int(m.sum()))


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_size_target_is_hit_exactly(digits, scope):
    cfg = small_cfg(pruning={"neurons": False, "target_weights": 700, "scope": scope, "schedule_steps": 4,
                             "schedule_share": 0.5, "tolerance": 0.0, "max_iterations": 10})
    syn, model, report = _run(cfg, digits)
    rows = [r for r in syn.state.history if r["phase"] == "pruning"]
    assert len(rows) == 4 and all(r["accepted"] for r in rows)  # guard "warn": the bound never rejects
    start = syn.state.prune_start
    goals = [cubic_count(t, start, 700, 2) for t in range(4)]
    assert goals[1:] == [700] * 3 and goals[0] < start
    if scope == "global":
        assert [r["weights"] for r in rows] == goals
    else:  # per-layer shares are rounded: within one connection per layer
        assert all(abs(r["weights"] - g) <= len(model.layers) for r, g in zip(rows, goals))
    assert abs(model.active_weights() - 700) <= (0 if scope == "global" else len(model.layers))
    assert report["pruning"]["stop_reason"] == "target"


@pytest.mark.parametrize("neurons", [False, True])
def test_erk_scope_holds_every_layer_at_its_share(digits, neurons):
    cfg = small_cfg(pruning={"neurons": neurons, "neuron_threshold": 0.3, "target_weights": 500, "scope": "erk",
                             "schedule_steps": 4, "schedule_share": 0.5, "max_iterations": 10})
    syn, model, report = _run(cfg, digits)
    rows = [r for r in syn.state.history if r["phase"] == "pruning"]
    assert len(rows) == 4 and rows[-1]["weights"] == 500 and model.active_weights() == 500
    shapes = [tuple(layer.mask.shape) for layer in model.layers]
    assert model.active_per_layer() == erk_allocation(500, shapes)
    assert report["pruning"]["stop_reason"] == "target"


def test_budget_is_spent_exactly(digits):
    cfg = small_cfg(growth={"target": "0.0", "max_iterations": 5, "epochs_per_iteration": 2, "max_epochs": 5},
                    dense={"epochs": 1, "train": False},
                    pruning={"target_weights": 600, "budget_epochs": 14, "final_epochs": 2, "retrain_epochs": 1,
                             "max_iterations": 100, "scope": "global"})
    syn, model, report = _run(cfg, digits)
    growth = [r for r in syn.state.history if r["phase"] == "growth"]
    assert len(growth) == 2  # 2 + 2 epochs; a third iteration would pass max_epochs = 5
    assert syn.state.prune_iterations == 14 - 4 - 2
    assert syn.state.epochs == 14
    assert report["budget"]["epochs"] == 14


def test_cubic_with_neuron_pruning_keeps_pruning(digits):
    # the first step removes the dead units of the grown net; the schedule must go on afterwards
    cfg = small_cfg(pruning={"schedule": "cubic", "final_sparsity": 0.8, "schedule_steps": 5, "tolerance": 1.0,
                             "max_iterations": 50, "neurons": True, "neuron_threshold": 0.3})
    syn, model, report = _run(cfg, digits)
    rows = [r for r in syn.state.history if r["phase"] == "pruning"]
    assert len(rows) == 5 and all(r["accepted"] for r in rows)
    start = syn.state.prune_start
    for t, r in enumerate(rows):  # never above the schedule's goal (neurons may take more)
        assert r["weights"] <= cubic_count(t, start, round(start * 0.2), 5)
    assert rows[-1]["weights"] <= round(start * 0.2)
    assert sum(r["pruned_connections"] > 0 for r in rows[1:]) >= 2
    assert report["pruning"]["stop_reason"] == "schedule"


def test_zero_removal_iteration_does_not_end_the_phase(digits):
    # a target above the start size: nothing to remove, but every planned iteration retrains
    cfg = small_cfg(pruning={"neurons": False, "target_weights": 10 ** 6, "schedule_steps": 3, "max_iterations": 10})
    syn, model, report = _run(cfg, digits)
    rows = [r for r in syn.state.history if r["phase"] == "pruning"]
    assert len(rows) == 3 and all(r["pruned_connections"] == 0 and r["accepted"] for r in rows)
    assert report["pruning"]["stop_reason"] == "target"


def test_guard_stop_keeps_the_last_model_within_the_bound(digits):
    cfg = small_cfg(pruning={"neurons": False, "target_weights": 30, "schedule_steps": 4, "schedule_share": 0.25,
                             "tolerance": 0.0, "guard": "stop", "max_iterations": 10})
    syn, model, report = _run(cfg, digits)
    rows = [r for r in syn.state.history if r["phase"] == "pruning"]
    assert not rows[-1]["accepted"] and report["pruning"]["stop_reason"] == "bound"
    kept = syn.state.kept_iteration
    assert model.active_weights() == (syn.state.weights["post_growth"] if kept is None else rows[kept]["weights"])


def test_rewiring_keeps_the_size_and_moves_connections(digits):
    cfg = small_cfg(pruning={"neurons": False, "target_weights": 600, "schedule_steps": 3, "schedule_share": 1.0,
                             "rewire": 0.2, "scope": "global", "max_iterations": 10})
    syn, model, report = _run(cfg, digits)
    rows = [r for r in syn.state.history if r["phase"] == "pruning"]
    start = syn.state.prune_start
    assert [r["weights"] for r in rows] == [cubic_count(t, start, 600, 3) for t in range(3)]
    assert rows[0]["rewired"] == round(0.2 * cubic_count(0, start, 600, 3))
    assert "rewired" not in rows[-1] or rows[-1]["rewired"] < rows[0]["rewired"]


def test_cnn_size_target_is_hit_with_feature_map_removal(digits):
    from test_synthesis_cnn import small_cnn_cfg

    cfg = small_cnn_cfg(pruning={"target_weights": 400, "scope": "global", "schedule_steps": 4, "schedule_share": 0.5,
                                 "neuron_threshold": 0.2, "max_iterations": 10})
    syn = Synthesis(RunContext(cfg, digits, resolve_reference(cfg.model, digits)))
    model = syn.run()
    report = nest_report(syn.ctx, model)
    live = sum(layer.active_connections() for layer in model.layers)
    assert live == 400 and report["pruning"]["stop_reason"] == "target"
    assert model.active_weights() <= 400


def test_rewire_step_drops_smallest_and_regrows_other_dormant_connections(digits):
    # _rewire alone (no top-up behind it): same live count, the dropped were the smallest |W*|
    # among the live, and as many previously dormant connections (none of the dropped) are live now
    cfg = small_cfg(pruning={"neurons": False, "target_weights": 600, "schedule_steps": 3, "schedule_share": 1.0,
                             "rewire": 0.2, "scope": "global", "max_iterations": 10})
    syn, model, _ = _run(cfg, digits)
    syn.state.iteration = 0  # the cosine share is rewire * 1 at the schedule's start
    before = [layer.mask.clone().bool() for layer in syn.model.layers]
    scores = torch.cat([syn.model.effective_weight(i).abs()[b] for i, b in enumerate(before)])
    n = syn._rewire()
    after = [layer.mask.bool() for layer in syn.model.layers]
    dropped = torch.cat([(b & ~a).flatten() for b, a in zip(before, after)])
    grown = [a & ~b for b, a in zip(before, after)]
    assert n == round(0.2 * sum(int(b.sum()) for b in before)) and int(dropped.sum()) == n
    assert sum(int(g.sum()) for g in grown) == n
    kept_scores = torch.cat([syn.model.effective_weight(i).abs()[b & a] for i, (b, a) in enumerate(zip(before, after))])
    assert float(scores.sort().values[n - 1]) <= float(kept_scores.min())  # the n smallest went
    assert all(float(layer.weight.detach()[g].abs().sum()) == 0.0 for layer, g in zip(syn.model.layers, grown))


def test_final_regrow_prunes_below_the_target_and_grows_back(digits):
    cfg = small_cfg(pruning={"neurons": False, "target_weights": 600, "final_regrow": 0.25, "final_epochs": 1,
                             "scope": "global", "schedule_steps": 4, "schedule_share": 0.5, "max_iterations": 10})
    syn, model, report = _run(cfg, digits)
    rows = [r for r in syn.state.history if r["phase"] == "pruning"]
    assert [r["weights"] for r in rows[1:]] == [450] * 3  # 600 - 150 held back
    fine = [r for r in syn.state.history if r["phase"] == "finetune"]
    assert len(fine) == 1 and fine[0]["regrown"] == 150 and fine[0]["accepted"]
    assert sum(layer.active_connections() for layer in model.layers) == 600


# ------------------------------------------------------------------ pruning.criterion = "l0"
def _l0_cfg(**pruning):
    return small_cfg(growth={"target": "0.0", "max_iterations": 5, "epochs_per_iteration": 2, "max_epochs": 4},
                     dense={"epochs": 1, "train": False},
                     pruning={"criterion": "l0", "target_weights": 600, "budget_epochs": 12, "final_epochs": 1,
                              "final_lr_scale": 1.0, "lr_schedule": "phase", "schedule_share": 0.7, "max_iterations": 100,
                              **pruning})


def test_l0_criterion_ends_at_the_target_within_the_budget(digits):
    syn, model, report = _run(_l0_cfg(), digits)
    h = syn.state.history
    prune = [r for r in h if r["phase"] == "pruning"]
    assert len(prune) == syn.state.prune_iterations == 12 - 4 - 1
    # nothing is removed while the gates train: every row counts the open test-time gates of the full model
    assert all(r["accepted"] and r["lam"] > 0 for r in prune)
    assert prune[-1]["expected_l0"] < prune[0]["expected_l0"]
    project = [r for r in h if r["phase"] == "project"]
    assert len(project) == 1 and project[0]["weights"] <= 600  # grown-back connections start at weight 0
    assert [r["phase"] for r in h][-1] == "finetune" and h[-1]["accepted"]
    assert sum(layer.active_connections() for layer in model.layers) == 600
    assert syn.state.epochs == 12 and report["pruning"]["stop_reason"] == "target"
    assert syn.gates is None and all(len(g["params"]) > 0 for g in syn.optimizer.param_groups)
    assert len(syn.optimizer.param_groups) == 1  # the gates' group left with the gates


def test_l0_criterion_projection_keeps_the_most_open_gates(digits):
    """At the projection the kept connections are exactly the target's largest log_alpha
    (checked against a sort of the gates the last pruning iteration left)."""
    cfg = _l0_cfg(neurons=False)
    syn = Synthesis(RunContext(cfg, digits, resolve_reference(cfg.model, digits)))
    seen = {}
    real = syn._project_gates

    def spy():
        seen["la"] = [syn.gates.log_alpha(i).detach().clone() * layer.mask for i, layer in
                      enumerate(syn.model.layers)]
        seen["mask"] = [layer.mask.clone() for layer in syn.model.layers]
        units = real()
        seen["after"] = [layer.mask.clone() for layer in syn.model.layers]
        return units

    syn._project_gates = spy
    syn.run()
    live = torch.cat([la[m > 0] for la, m in zip(seen["la"], seen["mask"])])
    cut = float(live.sort(descending=True).values[599])
    kept = torch.cat([la[a > 0] for la, a in zip(seen["la"], seen["after"])])
    assert len(kept) == 600 and float(kept.min()) >= cut


@pytest.mark.parametrize("flops", [0, 1000])
def test_l0_criterion_resume_is_exact(digits, tmp_path, flops):
    from nestsynth import checkpoint as ckpt
    from nestsynth.baselines.runner import run_method
    from nest_helpers import interrupt_after

    cfg = _l0_cfg(target_flops=flops)
    ref = resolve_reference(cfg.model, digits)
    model_a, _ = run_method(cfg, digits, ref, tmp_path / "A")
    with pytest.raises(KeyboardInterrupt):  # seed, 2 growth steps, then 2 gated iterations
        run_method(cfg, digits, ref, tmp_path / "B", on_iteration=interrupt_after(5))
    gates = torch.load(ckpt.checkpoint_path(tmp_path / "B"), weights_only=True)["gates"]
    assert gates is not None and (gates["flops"] is not None) == (flops > 0)
    model_b, _ = run_method(cfg, digits, ref, tmp_path / "B", resume=True)
    sa, sb = model_a.state_dict(), model_b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("flops", [0, 2000])
def test_l0_criterion_on_a_cnn_hits_the_target(digits, flops):
    from test_synthesis_cnn import small_cnn_cfg

    cfg = small_cnn_cfg(pruning={"criterion": "l0", "target_weights": 400, "schedule_steps": 4,
                                 "schedule_share": 0.5, "final_epochs": 1, "max_iterations": 4,
                                 "target_flops": flops})
    syn, model, report = _run(cfg, digits)
    assert sum(layer.active_connections() for layer in model.layers) == 400
    assert report["pruning"]["stop_reason"] == "target"
    # partial-area convolution goes on under the gates: every gated iteration switches positions off
    prune = [r for r in syn.state.history if r["phase"] == "pruning"]
    assert prune and all(r["pruned_area"] > 0 for r in prune)
    assert all(("mu" in r) == (flops > 0) for r in prune)
    if flops:  # a binding target (the net's ~5K expected FLOPs are above it): the controller ran
        # every optimizer step and raised the price (unwired, mu would stay at its start)
        from nestsynth.pruning.gates import FLOPS_MU
        assert prune[-1]["mu"] > FLOPS_MU and all(r["expected_flops"] > 2000 for r in prune)


def _conv_fc():
    from nestsynth.sparse import set_mask
    from nestsynth.sparse.conv import MaskedConv2d
    from nestsynth.sparse.mlp import MaskedLinear

    conv = MaskedConv2d(1, 2, 3, (4, 4), generator=torch.Generator().manual_seed(0))
    conv.area[0, :2] = 0  # kernel 0 computes 8 of its 16 positions
    fc = MaskedLinear(5, 3, generator=torch.Generator().manual_seed(0))
    set_mask(fc, (torch.arange(15).view(3, 5) < 12).float())  # 12 live

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([conv, fc])
    return Net()


def test_macs_per_weight_hand_counts():
    """A conv weight costs the positions its kernel computes (metrics.conv_macs is the
    oracle), a linear weight 1."""
    from nestsynth.metrics import conv_macs
    from nestsynth.pruning.gates import macs_per_weight

    conv, fc = _conv_fc().layers
    m = macs_per_weight(conv)
    assert m.shape == conv.weight.shape and m[0].unique().tolist() == [8.0] and m[1].unique().tolist() == [16.0]
    assert float((m * conv.mask).sum()) == conv_macs(conv) == 9 * 8 + 9 * 16
    assert torch.equal(macs_per_weight(fc), torch.ones(3, 5))


def test_flops_control_prices_and_steers():
    """cost = (1 + mu * m / m_bar) / c (m_bar the live mean at the start, c the P-weighted mean
    of the numerator, so sum P * cost = sum P: the penalty's total is the plain one);
    E[F] = 2 * sum P * m; mu rises while E[F] is above its goal and falls below it."""
    from nestsynth.pruning.gates import BETA, FlopsControl, L0Gates, prob_nonzero

    net = _conv_fc()
    conv, fc = net.layers
    gates = L0Gates(net, [torch.zeros_like(conv.weight), torch.zeros_like(fc.weight)], BETA, 1.0)
    macs = 9 * 8 + 9 * 16 + 12
    ctl = FlopsControl(gates, target=100.0, steps=10, gain=0.1, share=1.0, mu=0.5)
    m_bar = macs / 30
    assert ctl.start == 2 * macs and ctl.scale == pytest.approx(m_bar)
    # equal gates: the P-weighted mean of the numerator is its live mean, 1 + mu
    assert torch.allclose(gates.cost[0][0], torch.full((1, 3, 3), (1 + 0.5 * 8 / m_bar) / 1.5))
    assert torch.allclose(gates.cost[1], torch.full((3, 5), (1 + 0.5 / m_bar) / 1.5))
    live = float(sum((c * layer.mask).sum() for c, layer in zip(gates.cost, net.layers)))
    assert live == pytest.approx(30.0)
    p0 = float(prob_nonzero(torch.zeros(()), BETA))
    assert ctl.expected_flops() == pytest.approx(2 * macs * p0)
    ctl()  # E[F] = 2 * 228 * p0 > goal(0) = 100 + (456 - 100) * 0.9^3 ~ 360: mu rises
    assert ctl.mu > 0.5 and ctl.step == 1
    assert float(gates.cost[1][0, 0]) == pytest.approx((1 + ctl.mu / m_bar) / (1 + ctl.mu))
    with torch.no_grad():
        for t in gates.theta:
            t.fill_(-20.0)  # every gate shut: E[F] ~ 0, below any goal
    mu = ctl.mu
    ctl()
    assert ctl.mu < mu
    again = FlopsControl(gates, 100.0, 10, 0.1, 1.0, **ctl.state())  # a resumed phase
    assert again.state() == ctl.state() and again.goal(3) == ctl.goal(3)


def test_gate_penalty_prices_each_weight_by_its_cost():
    """d penalty / d theta of a gate is its cost times that of a unit-cost gate at the same
    log_alpha (autograd, against the closed form)."""
    from nestsynth.pruning.gates import BETA, L0Gates, prob_nonzero
    from nestsynth.sparse import SparseMLP

    model = SparseMLP([3, 2], "relu", generator=torch.Generator().manual_seed(0))
    la = [torch.zeros(2, 3)]
    cost = [torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.0, 1.0]])]
    gates = L0Gates(model, la, BETA, 1.0, cost=cost)
    gates.penalty(0.3, 10).backward()
    p = prob_nonzero(torch.zeros(()), BETA)
    expect = 0.3 / 10 * p * (1 - p) * cost[0]
    assert torch.allclose(gates.theta[0].grad, expect)
    plain = L0Gates(model, la, BETA, 1.0)
    assert float(plain.penalty(0.3, 10).detach()) == pytest.approx(0.3 / 10 * 6 * float(p))


@pytest.mark.parametrize("bad, words", [({"target_weights": 0}, "pruning.target_weights"),
                                        ({"rewire": 0.1}, "pruning.rewire"),
                                        ({"criterion": "taylor"}, "magnitude or l0"),
                                        ({"target_flops": -1}, ">= 0"),
                                        ({"gate_release": 0.5}, "pruning.gate_release"),
                                        ({"criterion": "magnitude", "target_flops": 9000}, "pruning.target_flops")])
def test_l0_criterion_refuses_what_it_cannot_do(bad, words):
    from nestsynth.errors import NestError

    with pytest.raises(NestError, match=words):
        _l0_cfg(**bad)


def test_l0_criterion_overrides_are_validated_together(tmp_path):
    """The criterion needs a size target: setting the criterion before the target in one
    command line must work (the checks that tie keys together see every override)."""
    from nestsynth import config as C
    from nestsynth.errors import NestError

    cfg = C.load(None, ['pruning.criterion="l0"', "pruning.target_weights=3000"])
    assert (cfg.pruning.criterion, cfg.pruning.target_weights) == ("l0", 3000)
    with pytest.raises(NestError, match="pruning.target_weights"):
        C.load(None, ['pruning.criterion="l0"'])


@pytest.mark.parametrize("flops", [0, 20000])
def test_grow_back_under_a_flop_target_ranks_gradient_per_mac(digits, monkeypatch, flops):
    """With equal |dL/dw| everywhere, Policy 1's grow-back takes the first dormant positions
    (conv1: the selector's tie rule); under a FLOP target |dL/dw| / MACs puts every grown
    connection in the fully connected layers (1 MAC each)."""
    from types import SimpleNamespace

    import nestsynth.synthesis as S
    from test_synthesis_cnn import small_cnn_cfg

    cfg = small_cnn_cfg(pruning={"criterion": "l0", "target_weights": 400, "target_flops": flops})
    syn = Synthesis(RunContext(cfg, digits, resolve_reference(cfg.model, digits)))
    monkeypatch.setattr(S, "gradient_scan", lambda model, *a, **k: SimpleNamespace(
        grads=[torch.ones_like(layer.weight) for layer in model.layers]))
    before = [layer.active_connections() for layer in syn.model.layers]
    syn._grow_by_gradient(5)
    grown = [layer.active_connections() - b for layer, b in zip(syn.model.layers, before)]
    convs = sum(g for g, layer in zip(grown, syn.model.layers) if layer.weight.dim() == 4)
    assert sum(grown) == 5 and convs == (0 if flops else 5)


def test_gates_start_from_the_target_when_growth_stopped_below_it(digits):
    """A capped growth phase that ends below target_weights: Policy 1 grows the shortfall
    before the gates are attached, so the gated phase starts at the target (gates can only
    close) and the run ends there."""
    cfg = _l0_cfg(target_weights=2500)
    syn, model, report = _run(cfg, digits)
    h = syn.state.history
    post = syn.state.weights["post_growth"]
    assert post < 2500  # the oracle's premise: growth (4 epochs) stopped below the target
    first = next(r for r in h if r["phase"] == "pruning")
    assert first["grown_connections"] == 2500 - post
    assert all("grown_connections" not in r for r in h if r["phase"] == "pruning" and r is not first)
    assert first["weights"] <= 2500 and sum(layer.active_connections() for layer in model.layers) == 2500
