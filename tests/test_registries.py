"""Smoke tests parametrized over the registries (as timm does for its models): a model or a
method that is registered is tested without a line added here.

* every registered reference architecture (:func:`nestsynth.registry.list_models`) builds,
  fitted to other data, with exactly the spec's dense weights, and runs a forward pass
  of the right shape; the large ones (AlexNet, VGG-16) at their full size only under
  the ``slow`` marker;
* every registered method (:func:`nestsynth.baselines.list_methods`: NeST, registered
  first, and each baseline) runs on digits through
  :func:`~nestsynth.baselines.runner.run_method` (what ``nestsynth synthesize``,
  ``prune --method`` and ``compare`` call) with a few optimizer steps, into a run
  directory: the model has the connections its config asks for, the report's fields
  agree with the model, and the files reload to the same network; a checkpointed method
  (NeST) interrupted and resumed through it ends exactly where an uninterrupted run does.

The methods' own rules are tested in tests/test_baselines_*.py and their defaults in
tests/test_defaults.py; here each run is far too short to learn, only the contract is
checked.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from nestsynth import config as config_mod
from nestsynth.api import resolve_reference
from nest_helpers import interrupt_after
from nestsynth.baselines import NEST, get_method, list_methods, method_names
from nestsynth.baselines.runner import run_method
from nestsynth.graph import SparseGraph
from nestsynth.registry import get_model, is_cnn, is_graph, list_models
from nestsynth.report.summary import load_model, read_history
from nestsynth.sparse import SparseCNN, SparseMLP

# ---- models --------------------------------------------------------------------------------
MODELS = [spec.name for spec in list_models()]
SHRINK_ABOVE = 2_000_000  # dense weights above which the default suite builds the layout at 1/16 of the widths
SLOW_ABOVE = 50_000_000  # a full-size build above this takes seconds and GBs (AlexNet, VGG-16)
CLASSES = 7  # not the spec's own: the output layer must follow the data


def build(spec, generator: torch.Generator) -> SparseMLP | SparseCNN | SparseGraph:
    """The dense model of a fitted spec, as a method's ``ctx.dense_model()`` builds it."""
    if is_cnn(spec) or is_graph(spec):
        return spec.build(generator)
    return SparseMLP(list(spec.widths), spec.activation, spec.batch_norm, generator=generator)


def check_model(spec, batch: int) -> None:
    """Build ``spec``: its weights, layers and widths are the spec's, and a forward pass of
    ``batch`` random inputs gives finite (batch, classes) logits."""
    model = build(spec, torch.Generator().manual_seed(0)).eval()
    assert isinstance(model, SparseCNN if is_cnn(spec) else SparseGraph if is_graph(spec) else SparseMLP)
    # every mask entry on, and as many as the registry counts (not active_weights(): at 138M weights a
    # few are drawn exactly 0.0 at initialization and are not counted as active)
    assert all(bool(layer.mask.all()) for layer in model.layers)
    assert sum(layer.mask.numel() for layer in model.layers) == spec.dense_weights()
    assert len(model.layers) == len(spec.widths) - 1 and list(model.widths) == list(spec.widths)
    shape = spec.input_shape if is_cnn(spec) or is_graph(spec) else (spec.widths[0],)
    with torch.no_grad():
        out = model(torch.rand(batch, *shape, generator=torch.Generator().manual_seed(1)))
    assert out.shape == (batch, spec.widths[-1]) and bool(torch.isfinite(out).all())


def test_every_model_is_parametrized():
    assert len(MODELS) == len(set(MODELS)) >= 7
    assert {"lenet-300-100", "lenet-5", "tiny-cnn", "vgg-16"} <= set(MODELS)


@pytest.mark.parametrize("name", MODELS)
def test_registered_model_fits_other_data_and_runs(name):
    spec = get_model(name)
    if is_cnn(spec) or is_graph(spec):  # two input channels and CLASSES outputs; the spatial size is the model's
        fitted = spec.for_data((2, *spec.input_shape[1:]), CLASSES)
        assert fitted.widths[0] == 2
        if fitted.dense_weights() > SHRINK_ABOVE and is_cnn(spec):  # (a graph network is built at full size)  # the same layout (kernels, strides, pooling), thinner
            fitted = fitted.with_widths((2, *(max(1, w // 16) for w in fitted.hidden), CLASSES))
    else:
        fitted = spec.for_data(64, CLASSES)
        assert fitted.hidden == spec.hidden
    assert fitted.widths[-1] == CLASSES
    check_model(fitted, batch=3)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow)
                                  if get_model(n).dense_weights() > SLOW_ABOVE else n
                                  for n in MODELS if get_model(n).dense_weights() > SHRINK_ABOVE])
def test_large_registered_model_at_full_size(name):
    check_model(get_model(name), batch=2)


# ---- methods -------------------------------------------------------------------------------
MODEL = "mlp:64-24-16-10"
LAYER_WEIGHTS = [64 * 24, 24 * 16, 16 * 10]  # 1536, 384, 160
DENSE = sum(LAYER_WEIGHTS)  # 2080
HALF = DENSE // 2  # every layer has an even number of weights: half of each is exact


def _section(name: str, options: dict) -> dict:
    return {"methods": {name: options}}


# method -> (config overrides that make it a few optimizer steps, the active weights that config
# asks for, or None where only "fewer than dense" is known in advance)
FAST = {
    NEST: ({"dense": {"epochs": 1}, "growth": {"max_iterations": 1, "epochs_per_iteration": 1},
            "pruning": {"max_iterations": 2, "retrain_epochs": 1, "recover_epochs": 0, "rate": 0.3,
                        "tolerance": 1.0}}, None),
    "dense": (_section("dense", {"epochs": 1}), DENSE),
    "random": (_section("random", {"sparsity": 0.5, "epochs": 1}), HALF),
    "han": (_section("han", {"dense_epochs": 1, "iterations": 1, "retrain_epochs": 1}), None),
    "oneshot": (_section("oneshot", {"dense_epochs": 1, "sparsity": 0.5, "finetune_epochs": 1}), HALF),
    "gradual": (_section("gradual", {"epochs": 2, "begin_epoch": 0, "end_epoch": 1, "frequency": 2,
                                     "final_sparsity": 0.5}), HALF),
    # one round: half of each hidden layer's weights, a quarter of the output layer's
    "lottery": (_section("lottery", {"epochs_per_round": 1, "rounds": 1, "rate": 0.5, "output_rate": 0.25}),
                LAYER_WEIGHTS[0] // 2 + LAYER_WEIGHTS[1] // 2 + LAYER_WEIGHTS[2] * 3 // 4),
    "snip": (_section("snip", {"sparsity": 0.5, "batch_size": 100, "epochs": 1}), HALF),
    "grasp": (_section("grasp", {"sparsity": 0.5, "batch_size": 100, "epochs": 1}), HALF),
    "l0": (_section("l0", {"epochs": 1, "target_weights": 300}), 300),
    "sensitivity": (_section("sensitivity", {"epochs": 1, "final_epochs": 0, "lam": 0.05}), None),
    "lobs": (_section("lobs", {"dense_epochs": 1, "sparsity": 0.5, "samples": 200, "retrain_epochs": 1}), HALF),
    "n2ps": (_section("n2ps", {"dense_epochs": 1, "iterations": 1, "retrain_epochs": 1}), None),
    # radix 2 in every layer at density 0.5: half of each layer's connections (all widths are even)
    "radix": (_section("radix", {"density": 0.5, "epochs": 1}), HALF),
}
REPORT_KEYS = {"method", "model", "dataset", "seed", "test_error", "val_error", "weights", "flops", "widths",
               "dense_reference", "compression", "layers", "budget", "warnings", "environment"}


METHODS = [m.name for m in list_methods()]


def _fast_cfg(name: str):
    """The config of a few optimizer steps of method ``name`` on the small MLP."""
    overrides, _ = FAST[name]
    return config_mod.from_dict({"model": MODEL, "method": name, "device": "cpu",
                                 "train": {"batch_size": 64, "min_steps_per_epoch": 0}, **overrides})


def test_every_method_is_registered_and_parametrized():
    assert METHODS == method_names()  # the registry and the config's sections agree, NeST first
    assert METHODS[0] == NEST and len(METHODS) == len(set(METHODS)) >= 14
    assert set(FAST) <= set(METHODS), f"FAST names methods that are not registered: {set(FAST) - set(METHODS)}"
    nest = get_method(NEST)
    assert nest.config is None and nest.checkpointed and nest.report is not None
    assert not any(m.checkpointed or m.config is None for m in list_methods()[1:])


@pytest.mark.parametrize("name", METHODS)
def test_registered_method_runs_a_few_steps_into_a_run_directory(digits, tmp_path, name):
    assert name in FAST, f"method {name!r} is registered but has no fast setting in FAST (tests/test_registries.py)"
    overrides, expected = FAST[name]
    cfg = _fast_cfg(name)
    out = tmp_path / "run"
    model, report = run_method(cfg, digits, resolve_reference(cfg.model, digits), out)

    # the connections the config asks for; never more than the dense reference
    active = model.active_weights()
    assert (active == expected) if expected is not None else (0 < active < DENSE)
    for layer in model.layers:
        assert set(layer.mask.unique().tolist()) <= {0.0, 1.0}
        assert float(layer.weight.detach()[layer.mask == 0].abs().sum()) == 0.0  # dormant weights are zero
    widths = model.widths
    assert widths[0] == 64 and widths[-1] == 10 and all(w <= r for w, r in zip(widths, [64, 24, 16, 10]))
    if name == "n2ps":  # neuron pruning: fewer neurons, each kept layer fully connected
        assert widths[1:-1] != [24, 16]
        assert active == sum(a * b for a, b in zip(widths[:-1], widths[1:]))

    # the report: every field, agreeing with the model
    assert REPORT_KEYS <= set(report) and report["method"] == name and report["model"] == MODEL
    assert report["dataset"] == "digits" and report["seed"] == cfg.seed
    assert 0.0 <= report["test_error"] <= 1.0 and 0.0 <= report["val_error"] <= 1.0
    assert report["weights"]["final"] == active == sum(row["weights"] for row in report["layers"])
    assert len(report["layers"]) == len(model.layers) and report["widths"]["final"] == widths
    assert report["dense_reference"]["weights"] == DENSE
    assert report["compression"]["weights"] == pytest.approx(DENSE / active)
    assert 0 < report["flops"]["final"] <= report["dense_reference"]["flops"]
    assert isinstance(report["warnings"], list) and all(isinstance(w, str) for w in report["warnings"])
    assert report["environment"]["config_digest"] == cfg.digest()
    if name == NEST:
        assert report["growth"]["iterations"] == 1 and report["pruning"]["iterations"] <= 2
        assert active <= report["weights"]["post_growth"]
    else:
        assert report["method_config"] == json.loads(json.dumps(dataclasses.asdict(getattr(cfg.methods, name))))
        assert overrides["methods"][name].items() <= report["method_config"].items()

    # the run directory: the same report and config, and a model file that is the same network
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report))
    assert config_mod.load(out / "config.toml").digest() == cfg.digest()
    assert read_history(out)  # metrics.jsonl: rows with the keys the plots read
    assert (out / "plots" / "connections.png").is_file()
    saved = load_model(out / "model.pt").eval()
    model.eval()
    assert saved.widths == widths and saved.active_weights() == active
    with torch.no_grad():
        assert torch.equal(saved(digits.test.X), model(digits.test.X))


@pytest.mark.parametrize("name", [m.name for m in list_methods() if m.checkpointed])
def test_checkpointed_method_resumes_exactly_through_run_method(digits, tmp_path, name):
    """Interrupted after its third checkpoint and resumed in the same directory, the run
    ends with the same model, history and report as one uninterrupted run."""
    cfg = _fast_cfg(name)
    reference = resolve_reference(cfg.model, digits)
    model_a, report_a = run_method(cfg, digits, reference, tmp_path / "A")
    with pytest.raises(KeyboardInterrupt):
        run_method(cfg, digits, reference, tmp_path / "B", on_iteration=interrupt_after(3))
    assert not (tmp_path / "B" / "report.json").exists()
    model_b, report_b = run_method(cfg, digits, reference, tmp_path / "B", resume=True)
    sa, sb = model_a.state_dict(), model_b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    rows_a, rows_b = (read_history(tmp_path / run) for run in ("A", "B"))
    for rows in (rows_a, rows_b):
        for row in rows:
            row.pop("seconds")
    assert rows_a == rows_b and rows_a[-1]["epochs"] == report_a["budget"]["epochs"]
    for r in (report_a, report_b):
        r.pop("wall_seconds")
        r["dense_reference"].pop("seconds", None)
        r["growth"].pop("seconds", None)
    assert json.loads(json.dumps(report_a)) == json.loads(json.dumps(report_b))
