"""The NeST loop end to end on digits: report consistency, monotone phases, determinism,
resume after an interruption, safe model files and NaN rollback."""

from __future__ import annotations

import inspect
import json
import os
import pickle

import pytest
import torch

import nestsynth
from nestsynth import checkpoint as ckpt
from nestsynth import config as C
from nestsynth import run_context
from nestsynth import synthesis as synthesis_mod
from nestsynth.api import resolve_reference
from nestsynth.baselines.runner import run_method
from nestsynth.errors import NestError
from nestsynth.metrics import activation_density
from nestsynth.run_context import RunContext
from nestsynth.seeds import make_seed
from nestsynth.sparse import SparseMLP
from nestsynth.synthesis import Synthesis, nest_report
from nestsynth.training import NonFiniteLoss


def small_cfg(**sections):
    raw = {"model": "lenet-300-100", "device": "cpu", "seed": 0,
           "data": {"dataset": "digits", "val_fraction": 0.2},
           "seed_net": {"ratio": 0.2},
           "dense": {"epochs": 3},
           "growth": {"max_iterations": 3, "epochs_per_iteration": 2},
           "pruning": {"rate": 0.2, "max_iterations": 3, "retrain_epochs": 1}}
    for key, value in sections.items():
        if isinstance(value, dict):
            raw.setdefault(key, {}).update(value)
        else:
            raw[key] = value
    return C.from_dict(raw)


def _run(cfg, data, out=None, **kw):
    return run_method(cfg, data, resolve_reference(cfg.model, data), out, **kw)


def _same_model(a: SparseMLP, b: SparseMLP) -> None:
    assert a.widths == b.widths
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _strip_times(report: dict) -> dict:
    r = json.loads(json.dumps(report))
    r.pop("wall_seconds")
    r["dense_reference"].pop("seconds", None)
    r["growth"].pop("seconds", None)
    return r


@pytest.fixture(scope="module")
def job(digits):
    cfg = small_cfg()
    syn = Synthesis(RunContext(cfg, digits, resolve_reference(cfg.model, digits)))
    model = syn.run()
    report = nest_report(syn.ctx, model)
    return cfg, syn, model, report


# ----------------------------------------------------------------------------- report


def test_report_has_required_keys_and_consistent_numbers(job, digits):
    cfg, syn, model, report = job
    for key in ("model", "dataset", "seed", "test_error", "val_error", "weights", "parameters_final", "flops",
                "dense_reference", "compression", "layers", "wall_seconds"):
        assert key in report, key
    assert report["model"] == "lenet-300-100" and report["dataset"] == "digits" and report["seed"] == 0
    assert set(report["weights"]) >= {"seed", "post_growth", "final"}
    assert set(report["flops"]) >= {"final", "final_act"}
    assert set(report["dense_reference"]) >= {"weights", "flops"}
    assert set(report["compression"]) >= {"weights", "flops"}
    for row in report["layers"]:
        assert set(row) >= {"name", "in", "out", "weights", "flops", "act_pct"}
    json.dumps(report)  # plain data

    # reference: LeNet-300-100 fitted to 8x8 digits
    assert report["dense_reference"]["weights"] == 64 * 300 + 300 * 100 + 100 * 10 == 50_200
    assert report["dense_reference"]["flops"] == 100_400
    w = report["weights"]
    assert w["final"] == sum(r["weights"] for r in report["layers"]) == model.active_weights()
    assert [r["weights"] for r in report["layers"]] == model.active_per_layer()
    assert report["compression"]["weights"] == pytest.approx(50_200 / w["final"])
    assert report["flops"]["final"] == 2 * w["final"]
    assert all(r["flops"] == 2 * r["weights"] for r in report["layers"])
    assert report["flops"]["final_act"] == round(sum(r["flops_act"] for r in report["layers"]))
    assert report["compression"]["flops"] == pytest.approx(100_400 / sum(r["flops_act"] for r in report["layers"]))
    # widths
    assert report["widths"]["final"] == model.widths
    assert [r["in"] for r in report["layers"]] == model.widths[:-1]
    assert [r["out"] for r in report["layers"]] == model.widths[1:]
    assert [r["name"] for r in report["layers"]] == ["fc1", "fc2", "fc3"]
    assert report["widths"]["seed"] == [64, 60, 20, 10]
    # seed weights: the seed drawn by hand from the same generator
    seed = make_seed([64, 300, 100, 10], 0.2, cfg.seed_net.density, torch.Generator().manual_seed(0))
    assert w["seed"] == seed.active_weights()
    # parameters: weights + non-zero biases
    nz_bias = sum(int(torch.count_nonzero(layer.bias.detach())) for layer in model.layers)
    assert report["parameters_final"] == w["final"] + nz_bias
    # test error and Act% recomputed on the test split
    model.eval()
    with torch.no_grad():
        pred = model(digits.test.X).argmax(1)
    assert report["test_error"] == pytest.approx(float((pred != digits.test.y).float().mean()))
    act = activation_density(model, digits.test.X)
    assert [r["act_pct"] for r in report["layers"]] == pytest.approx([100 * a for a in act])
    assert 0 <= report["val_error"] <= 1


def test_growth_never_removes_and_pruning_never_revives(job):
    cfg, syn, model, report = job
    hist = syn.state.history
    phases = [r["phase"] for r in hist]
    assert phases[0] == "seed" and phases[1] == "dense"
    growth = [r for r in hist if r["phase"] == "growth"]
    pruning = [r for r in hist if r["phase"] == "pruning"]
    assert [r["iteration"] for r in growth] == list(range(cfg.growth.max_iterations))
    assert len(pruning) >= 2
    seq = [hist[0]] + growth
    for prev, cur in zip(seq, seq[1:]):
        assert all(c >= p for p, c in zip(prev["layer_weights"], cur["layer_weights"])), (prev, cur)
        assert all(c >= p for p, c in zip(prev["neurons"], cur["neurons"]))
    assert growth[-1]["weights"] == report["weights"]["post_growth"] > report["weights"]["seed"]
    seq = [growth[-1]] + pruning
    for prev, cur in zip(seq, seq[1:]):
        assert all(c <= p for p, c in zip(prev["layer_weights"], cur["layer_weights"])), (prev, cur)
        assert all(c <= p for p, c in zip(prev["neurons"], cur["neurons"]))
    assert report["weights"]["final"] <= report["weights"]["post_growth"]
    assert report["growth"]["iterations"] == len(growth)
    # every growth step but the last grows k = sum round(fraction * in * out) connections (global
    # ranking) and neurons_per_step neurons per hidden layer
    g = cfg.growth
    widths = [64] + hist[0]["neurons"] + [10]
    for row in growth[:-1]:
        k = sum(round(g.connection_fraction * a * b) for a, b in zip(widths[:-1], widths[1:]))
        assert row["grown_connections"] == k
        assert row["grown_neurons"] == [g.neurons_per_step] * 2
        assert row["neurons"] == [w + g.neurons_per_step for w in widths[1:-1]]
        widths = [64] + row["neurons"] + [10]
    assert "grown_connections" not in growth[-1]
    assert report["pruning"]["iterations"] == len(pruning)


def test_same_seed_same_result_other_seed_differs(job, digits):
    cfg, syn, model, report = job
    model2, report2 = _run(cfg, digits)
    _same_model(model, model2)
    for a, b in zip(model.layers, model2.layers):
        assert torch.equal(a.mask, b.mask)
    assert _strip_times(report) == _strip_times(report2)
    model3, _ = _run(small_cfg(seed=1), digits)
    assert any(a.mask.shape != b.mask.shape or not torch.equal(a.mask, b.mask)
               for a, b in zip(model.layers, model3.layers))


def test_synthesize_api_with_user_sequential():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(300, 12, generator=gen)
    y = (X[:, 0] > 0).long() + (X[:, 1] > 0).long()
    seq = torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.Tanh(), torch.nn.Linear(20, 3))
    cfg = {"device": "cpu", "dense": {"epochs": 2}, "growth": {"max_iterations": 2, "epochs_per_iteration": 1},
           "pruning": {"max_iterations": 2, "rate": 0.1}}
    net, report = nestsynth.synthesize(seq, (X, y), config=cfg)
    assert report["model"] == "custom"
    assert report["dense_reference"]["weights"] == 12 * 20 + 20 * 3
    assert net.activation_specs == ["tanh"] and net.widths[0] == 12 and net.widths[-1] == 3
    assert report["weights"]["final"] == net.active_weights()
    with pytest.raises(NestError):
        nestsynth.synthesize(seq, (torch.randn(10, 5), torch.zeros(10, dtype=torch.long)), config=cfg)


@pytest.mark.parametrize("schedule", ["constant", "cubic"])
def test_pruning_schedule_wiring(digits, schedule):
    from nestsynth.pruning import constant_rate_removal

    cfg = small_cfg(pruning={"neurons": False, "schedule": schedule, "final_sparsity": 0.6, "schedule_steps": 3,
                             "tolerance": 1.0, "max_iterations": 3})
    syn = Synthesis(RunContext(cfg, digits, resolve_reference(cfg.model, digits)))
    syn.run()
    hist = syn.state.history
    post = syn.state.post_growth_layers
    prev = [r for r in hist if r["phase"] == "growth"][-1]["layer_weights"]
    assert prev == post
    pruning = [r for r in hist if r["phase"] == "pruning"]
    assert len(pruning) == 3 and all(r["accepted"] for r in pruning)  # tolerance 1.0 accepts all
    for t, row in enumerate(pruning):
        if schedule == "cubic":  # the whole network falls to 40% of its start, shared in proportion
            goal = round(sum(post) * (1 - (0.6 - 0.6 * (1 - (t + 1) / 3) ** 3)))
            share = sum(prev) - goal
            expected = [a - round(share * a / sum(prev)) for a in prev]
        else:
            expected = [a - constant_rate_removal(a, cfg.pruning.rate) for a in prev]
        assert row["layer_weights"] == expected
        assert row["pruned_connections"] == sum(prev) - sum(expected)
        prev = row["layer_weights"]


def test_growth_disabled_goes_straight_to_pruning(digits):
    cfg = small_cfg(growth={"enabled": False}, pruning={"max_iterations": 2})
    syn = Synthesis(RunContext(cfg, digits, resolve_reference(cfg.model, digits)))
    model = syn.run()
    report = nest_report(syn.ctx, model)
    phases = [r["phase"] for r in syn.state.history]
    assert "dense" not in phases and "growth" not in phases and phases[0] == "seed"
    assert report["weights"]["post_growth"] == report["weights"]["seed"]
    assert report["widths"]["post_growth"] == report["widths"]["seed"] == [64, 60, 20, 10]


# ----------------------------------------------------------------------------- resume


@pytest.mark.parametrize("stop_after", [3, 6])
def test_resume_after_interrupt_equals_uninterrupted(digits, tmp_path, stop_after):
    cfg = small_cfg()
    model_a, report_a = _run(cfg, digits, tmp_path / "A")

    calls = []

    def interrupt(state):
        calls.append(state.phase)
        if len(calls) == stop_after:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(cfg, digits, tmp_path / "B", on_iteration=interrupt)
    assert not (tmp_path / "B" / "report.json").exists()
    assert ckpt.checkpoint_path(tmp_path / "B").is_file()
    model_b, report_b = _run(cfg, digits, tmp_path / "B", resume=True)  # a fresh Synthesis, as the CLI does

    _same_model(model_a, model_b)
    assert _strip_times(report_a) == _strip_times(report_b)
    rows_a = ckpt.read_jsonl(tmp_path / "A" / "metrics.jsonl")
    rows_b = ckpt.read_jsonl(tmp_path / "B" / "metrics.jsonl")
    for r in rows_a + rows_b:
        r.pop("seconds")
    assert rows_a == rows_b
    # final model files hold identical tensors
    fa = torch.load(tmp_path / "A" / "model.pt", weights_only=True)
    fb = torch.load(tmp_path / "B" / "model.pt", weights_only=True)
    for k in fa["model"]:
        assert torch.equal(fa["model"][k], fb["model"][k])


def test_resume_variant_options_batchnorm_reference(digits, tmp_path):
    """SGD, cubic schedule, per-layer growth quota, score subsets, the paper's sign rule,
    fine-tuning and a batch-normalised user reference: resume is still exact."""
    cfg = small_cfg(train={"optimizer": "sgd", "lr": 0.05},
                    growth={"connection_scope": "layer", "score_samples": 300, "sign": "paper"},
                    pruning={"schedule": "cubic", "schedule_steps": 3, "final_sparsity": 0.5,
                             "tolerance": 0.5, "final_epochs": 1})
    ref = SparseMLP([64, 100, 50, 10], "relu", batch_norm=True)
    model_a, report_a = run_method(cfg, digits, resolve_reference(ref, digits), tmp_path / "A")
    assert model_a.batch_norm and report_a["model"] == "custom"
    calls = []

    def interrupt(state):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_method(cfg, digits, resolve_reference(ref, digits), tmp_path / "B", on_iteration=interrupt)
    model_b, report_b = run_method(cfg, digits, resolve_reference(ref, digits), tmp_path / "B", resume=True)
    _same_model(model_a, model_b)
    assert _strip_times(report_a) == _strip_times(report_b)


def test_resume_with_other_config_is_refused(digits, tmp_path):
    cfg = small_cfg(growth={"max_iterations": 1}, pruning={"max_iterations": 1})
    _run(cfg, digits, tmp_path / "run")
    with pytest.raises(NestError):
        _run(small_cfg(seed=7, growth={"max_iterations": 1}, pruning={"max_iterations": 1}), digits,
             tmp_path / "run", resume=True)
    with pytest.raises(NestError):
        _run(cfg, digits, tmp_path / "empty", resume=True)
    with pytest.raises(NestError, match="already holds a run"):
        _run(cfg, digits, tmp_path / "run")


# ----------------------------------------------------------------------------- model files


def test_model_file_loads_safely_and_refuses_code(digits, tmp_path):
    cfg = small_cfg(growth={"max_iterations": 2}, pruning={"max_iterations": 2})
    model, report = _run(cfg, digits, tmp_path / "run")
    path = tmp_path / "run" / "model.pt"
    blob = torch.load(path, weights_only=True)
    assert blob["arch"]["widths"] == model.widths
    rebuilt = SparseMLP.from_arch(blob["arch"])
    rebuilt.load_state_dict(blob["model"])
    loaded = nestsynth.load_model(path)
    X = digits.test.X[:50]
    model.eval(), rebuilt.eval(), loaded.eval()
    with torch.no_grad():
        expected = model(X)
        assert torch.equal(rebuilt(X), expected)
        assert torch.equal(loaded(X), expected)
    for a, b in zip(model.layers, loaded.layers):
        assert torch.equal(a.mask, b.mask)

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    raw = tmp_path / "evil.pkl"
    raw.write_bytes(pickle.dumps({"arch": blob["arch"], "model": Evil()}, protocol=2))
    with pytest.raises(NestError):
        nestsynth.load_model(raw)
    zipped = tmp_path / "evil.pt"
    torch.save({"arch": blob["arch"], "model": Evil()}, zipped)
    with pytest.raises(NestError):
        nestsynth.load_model(zipped)
    assert not marker.exists()
    # garbage and plain data that is not a model
    (tmp_path / "garbage.pt").write_bytes(b"\x00\x01garbage" * 10)
    with pytest.raises(NestError):
        nestsynth.load_model(tmp_path / "garbage.pt")
    torch.save({"x": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(NestError):
        nestsynth.load_model(tmp_path / "plain.pt")
    with pytest.raises(NestError):
        nestsynth.load_model(tmp_path / "missing.pt")


@pytest.mark.parametrize("blob", [
    {"arch": {"widths": [4, 3]}, "model": {}},
    {"arch": {"widths": [4, 3], "activations": [], "batch_norm": False}, "model": {"x": torch.zeros(1)}},
])
def test_load_model_plain_data_that_is_not_a_model(tmp_path, blob):
    path = tmp_path / "odd.pt"
    torch.save(blob, path)
    with pytest.raises(NestError):
        nestsynth.load_model(path)


# ----------------------------------------------------------------------------- NaN rollback


def test_nan_in_first_growth_epoch_rolls_back_and_halves_lr(digits, tmp_path, monkeypatch):
    cfg = small_cfg(train={"schedule": "constant"})
    real = run_context.train_epoch
    sig = inspect.signature(real)
    calls, lrs = [0], []

    def flaky(*args, **kwargs):
        calls[0] += 1
        if calls[0] == cfg.dense.epochs + 1:  # the first epoch of the growth phase
            raise NonFiniteLoss("training loss became nan")
        out = real(*args, **kwargs)
        lrs.append(sig.bind(*args, **kwargs).arguments["optimizer"].param_groups[0]["lr"])
        return out

    monkeypatch.setattr(run_context, "train_epoch", flaky)
    model, report = _run(cfg, digits, tmp_path / "run")
    assert calls[0] > cfg.dense.epochs + 1
    assert (tmp_path / "run" / "report.json").is_file()
    assert json.loads((tmp_path / "run" / "report.json").read_text())["weights"]["final"] == model.active_weights()
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert last["state"]["lr_scale"] == 0.5
    assert last["state"]["rollbacks"] == 1
    # the dense reference trained at the full rate, everything after the rollback at half
    assert lrs[: cfg.dense.epochs] == pytest.approx([cfg.train.lr] * cfg.dense.epochs)
    assert lrs[cfg.dense.epochs:] == pytest.approx([0.5 * cfg.train.lr] * (len(lrs) - cfg.dense.epochs))
    # the rolled-back step is not logged twice
    growth = [r["iteration"] for r in last["state"]["history"] if r["phase"] == "growth"]
    assert growth == list(range(cfg.growth.max_iterations))


def test_nan_every_time_gives_up_with_nest_error(digits, monkeypatch):
    calls = [0]

    def always_nan(*args, **kwargs):
        calls[0] += 1
        raise NonFiniteLoss("training loss became nan")

    monkeypatch.setattr(run_context, "train_epoch", always_nan)
    with pytest.raises(NestError, match="NaN"):
        _run(small_cfg(), digits)
    assert calls[0] == synthesis_mod.MAX_ROLLBACKS + 1


def test_dense_train_with_numeric_target_reports_dense_but_keeps_target(digits):
    cfg = small_cfg(growth={"target": "0.5", "max_iterations": 2, "epochs_per_iteration": 1},
                    dense={"epochs": 2, "train": True})
    syn = Synthesis(RunContext(cfg, digits, resolve_reference(cfg.model, digits)))
    report = nest_report(syn.ctx, syn.run())
    phases = [r["phase"] for r in syn.state.history]
    assert phases[:2] == ["seed", "dense"]
    assert report["growth"]["target_val_error"] == 0.5  # the number, not the dense error
    dense_row = syn.state.history[1]
    assert report["dense_reference"]["val_error"] == dense_row["val_error"]
    assert 0 <= report["dense_reference"]["test_error"] <= 1
    # the target is reached at the first check (error <= 0.5 after one epoch on digits)
    growth_rows = [r for r in syn.state.history if r["phase"] == "growth"]
    assert report["growth"]["reached"] == (growth_rows[-1]["val_error"] <= 0.5)
    assert len(growth_rows) == 1 or growth_rows[0]["val_error"] > 0.5


def test_dense_reference_does_not_perturb_the_synthesis(digits):
    """The dense reference trains with its own generator: training it (dense.train) must not
    change the masks the synthesis reaches with a numeric target."""
    def masks(train_dense):
        cfg = small_cfg(data={"augment": True}, growth={"target": "0.01", "max_iterations": 2,
                                                         "epochs_per_iteration": 1},
                        dense={"epochs": 1, "train": train_dense})
        model = Synthesis(RunContext(cfg, digits, resolve_reference(cfg.model, digits))).run()
        return [layer.mask for layer in model.layers]
    for a, b in zip(masks(False), masks(True)):
        assert torch.equal(a, b)


def test_layer_rest_freezes_the_smallest_layer_and_keeps_pruning_the_others(digits):
    cfg = small_cfg(growth={"target": "0.0", "max_iterations": 2, "epochs_per_iteration": 2},
                    pruning={"rate": 0.3, "max_iterations": 40, "retrain_epochs": 1, "recover_epochs": 0,
                             "tolerance": 0.0, "layer_rest": True, "neurons": False})
    syn = Synthesis(RunContext(cfg, digits, resolve_reference(cfg.model, digits)))
    model = syn.run()
    report = nest_report(syn.ctx, model)
    rows = [r for r in syn.state.history if r["phase"] == "pruning"]
    rejected = [r for r in rows if not r["accepted"]]
    assert rejected, "the tight bound must reject some iteration"
    frozen_seen = []
    accepted_weights = syn.state.post_growth_layers
    for r in rows:
        if r["accepted"]:
            for k in frozen_seen:  # a frozen layer never changes again
                assert r["layer_weights"][k] == accepted_weights[k]
            accepted_weights = r["layer_weights"]
        else:
            new = r.get("frozen", frozen_seen)
            if new != frozen_seen:
                k = new[-1]
                assert k not in frozen_seen
                live = [i for i in range(3) if i not in frozen_seen]
                assert accepted_weights[k] == min(accepted_weights[i] for i in live)  # the smallest live layer
                frozen_seen = list(new)
    # the phase ended because every layer but the last came to rest (or the iteration limit)
    assert len(frozen_seen) == 2 or len(rows) == 40
    assert report["weights"]["final"] == sum(accepted_weights)


def test_backoff_halves_the_rate_after_each_rejection_then_comes_to_rest(digits):
    cfg = small_cfg(growth={"target": "0.0", "max_iterations": 2, "epochs_per_iteration": 2},
                    pruning={"rate": 0.4, "max_iterations": 40, "retrain_epochs": 1, "recover_epochs": 0,
                             "tolerance": 0.0, "backoff": 2, "neurons": False})
    syn = Synthesis(RunContext(cfg, digits, resolve_reference(cfg.model, digits)))
    model = syn.run()
    report = nest_report(syn.ctx, model)
    rows = [r for r in syn.state.history if r["phase"] == "pruning"]
    scale, weights = 1.0, syn.state.post_growth_layers
    for r in rows:
        assert r["rate_scale"] == scale
        # every layer lost round(rate * scale * active) of the last accepted model's weights
        expected = [w - max(0, min(max(1, round(0.4 * scale * w)), w - 1)) for w in weights]
        assert r["layer_weights"] == expected
        if r["accepted"]:
            weights = r["layer_weights"]
        else:
            scale /= 2
    rejected = [r for r in rows if not r["accepted"]]
    assert len(rejected) == 3 and not rows[-1]["accepted"]  # two back-offs, then at rest
    assert [r["rate_scale"] for r in rejected] == [1.0, 0.5, 0.25]
    assert report["weights"]["final"] == sum(weights)
