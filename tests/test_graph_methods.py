"""Every method on graph references (SparseGraph), end to end on the 8x8 digits.

* every registered method (NeST and each baseline) on a user's residual CNN and on a
  user's residual MLP: it runs and keeps the connections its config asks for (NeST: fewer
  than dense), with a
  report that agrees with the model and a model file that reloads to the same network,
  or it refuses with its one sentence before anything is written;
* the Python API (:func:`nestsynth.baselines.prune`, :func:`nestsynth.api.resolve_reference`):
  plain chains stay SparseMLP / SparseCNN, a Sequential with batch norm on some layers
  only and any other module become graph references, unsupported operations are
  refused with capture's sentence;
* the command line: ``nestsynth prune --model resnet-mnist``, report, export, compress, models;
* export of a graph run: dead units physically removed (hand-built cases), the
  artifacts (PyTorch weights-only, safetensors, ONNX) checked against the masked model,
  bench-infer of the PyTorch artifact.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nestsynth import checkpoint as ckpt
from nestsynth import config as config_mod
from nestsynth.api import resolve_reference
from nestsynth.baselines import method_names, prune
from nestsynth.baselines.runner import run_method
from nestsynth.errors import NestError
from nestsynth.export.compact_graph import CompactGraph, compact_graph_from_sparse
from nestsynth.export.formats import load_artifact
from nestsynth.export.pipeline import evaluate_artifact, export_run
from nestsynth.graph import SparseGraph
from nestsynth.registry import GraphSpec, get_model
from nestsynth.report.summary import load_model, read_history
from nestsynth.sparse import SparseCNN, SparseMLP, set_mask

from cli_helpers import call, one_error_line
from test_registries import FAST, REPORT_KEYS


class UserResNet(nn.Module):
    """A user's residual CNN for (1, 8, 8): stem, a residual block with batch norm on its
    first conv only, a side branch concatenated along channels, max pool, two Linear layers.

    Weights: stem 1*6*9 = 54, c1 6*6*9 = 324, c2 324, side 6*4 = 24, fc (6+4)*16*20 = 3,200,
    out 20*10 = 200: 4,126.  MACs on 8x8: 54*64 + 324*64 + 324*64 + 24*64 + 3,200 + 200 = 49,864.
    """

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 6, 3, padding=1)
        self.c1, self.bn1 = nn.Conv2d(6, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.c2 = nn.Conv2d(6, 6, 3, padding=1)
        self.side = nn.Conv2d(6, 4, 1)
        self.fc, self.out = nn.Linear(10 * 16, 20), nn.Linear(20, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(x + self.c2(F.relu(self.bn1(self.c1(x)))))
        x = torch.cat([x, F.relu(self.side(x))], 1)
        return self.out(F.relu(self.fc(F.max_pool2d(x, 2).flatten(1))))


class UserResMLP(nn.Module):
    """A user's residual MLP: 64 -> 24, a residual pair of 24 -> 24 layers (batch norm on the
    first only), 24 -> 10.  Weights 1,536 + 576 + 576 + 240 = 2,928."""

    def __init__(self):
        super().__init__()
        self.fc_in, self.fc1, self.bn = nn.Linear(64, 24), nn.Linear(24, 24), nn.BatchNorm1d(24)
        self.fc2, self.out = nn.Linear(24, 24), nn.Linear(24, 10)

    def forward(self, x):
        h = F.relu(self.fc_in(x.flatten(1)))
        h = F.relu(h + self.fc2(F.relu(self.bn(self.fc1(h)))))
        return self.out(h)


CNN_LAYERS = {"stem": 54, "c1": 324, "c2": 324, "side": 24, "fc": 3_200, "out": 200}
MLP_LAYERS = {"fc_in": 1_536, "fc1": 576, "fc2": 576, "out": 240}
NETS = {"resnet": (UserResNet, CNN_LAYERS), "resmlp": (UserResMLP, MLP_LAYERS)}
CHAIN_ONLY = "chain references \\(an MLP or a sequential CNN\\)"
# method -> the sentence pattern it refuses a net with (nets that are absent: it runs)
REFUSED = {"radix": {"resnet": CHAIN_ONLY, "resmlp": CHAIN_ONLY}}


def expected_weights(method: str, layers: dict[str, int]) -> int | None:
    """The connections ``method`` keeps with its FAST config (tests/test_registries.py); every
    layer has an even number of weights, so every per-layer or global half is exact."""
    dense = sum(layers.values())
    if method in ("random", "oneshot", "gradual", "snip", "grasp", "lobs"):
        return dense // 2
    if method == "lottery":  # half of each hidden layer, three quarters of the output layer
        *hidden, out = layers.values()
        return sum(n // 2 for n in hidden) + out * 3 // 4
    return {"dense": dense, "l0": 300}.get(method)


def _cfg(method: str, **extra) -> config_mod.Config:
    overrides, _ = FAST[method]
    return config_mod.from_dict({"method": method, "device": "cpu",
                                 "train": {"batch_size": 64, "min_steps_per_epoch": 0}, **overrides, **extra})


@pytest.mark.parametrize("net", list(NETS))
@pytest.mark.parametrize("method", method_names())
def test_every_method_runs_on_a_graph_or_refuses_in_one_sentence(digits, tmp_path, method, net):
    make, layers = NETS[net]
    reference = resolve_reference(make(), digits)
    assert isinstance(reference, GraphSpec) and reference.dense_weights() == sum(layers.values())
    out = tmp_path / "run"
    if net in REFUSED.get(method, {}):
        with pytest.raises(NestError, match=f"^method {method} supports {REFUSED[method][net]} only; [^.]+[.]$"):
            run_method(_cfg(method), digits, reference, out)
        assert not out.exists()
        return
    model, report = run_method(_cfg(method), digits, reference, out)
    assert isinstance(model, SparseGraph) and model.layer_names == list(layers)
    active = model.active_weights()
    expected = expected_weights(method, layers)
    assert active == expected if expected is not None else 0 < active < sum(layers.values())
    for layer in model.layers:
        assert set(layer.mask.unique().tolist()) <= {0.0, 1.0}
        assert float(layer.weight.detach()[layer.mask == 0].abs().sum()) == 0.0
    assert REPORT_KEYS <= set(report) and report["model"] == "custom" and report["method"] == method
    assert report["weights"]["final"] == active == sum(row["weights"] for row in report["layers"])
    assert [row["name"] for row in report["layers"]] == list(layers)
    assert report["dense_reference"]["weights"] == sum(layers.values())
    assert 0 < report["flops"]["final"] <= report["dense_reference"]["flops"]
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report))
    assert read_history(out)
    saved = load_model(out / "model.pt").eval()
    model.eval()
    assert isinstance(saved, SparseGraph) and saved.widths == model.widths
    with torch.no_grad():
        assert torch.equal(saved(digits.test.X), model(digits.test.X))


def test_api_prune_a_user_residual_network_end_to_end(digits, tmp_path):
    X, y = digits.train.X, digits.train.y
    cfg = {"device": "cpu", "train": {"batch_size": 64},
           "methods": {"gradual": {"epochs": 3, "begin_epoch": 0, "end_epoch": 2, "frequency": 4,
                                   "final_sparsity": 0.5}}}
    model, report = prune(UserResNet(), (X, y), test=(digits.test.X, digits.test.y), method="gradual",
                          config=cfg, out=tmp_path / "run")
    assert isinstance(model, SparseGraph) and model.active_weights() == 4_126 // 2
    assert report["method"] == "gradual" and report["model"] == "custom"
    assert report["dense_reference"]["weights"] == 4_126
    assert report["dense_reference"]["flops"] == 2 * 49_864  # see UserResNet
    assert report["dense_reference"]["widths"] == [1, 6, 6, 6, 4, 20, 10]
    # the final FLOPs: every layer's non-zero weights x its output positions, x2
    positions = {"stem": 64, "c1": 64, "c2": 64, "side": 64, "fc": 1, "out": 1}
    flops = 2 * sum(int(torch.count_nonzero(layer.weight * layer.mask)) * positions[name]
                    for name, layer in zip(model.layer_names, model.layers))
    assert report["flops"]["final"] == flops and report["test_error"] is not None
    assert (tmp_path / "run" / "report.json").is_file() and (tmp_path / "run" / "config.toml").is_file()
    blob = ckpt.safe_load(tmp_path / "run" / "model.pt")  # tensors and plain data only
    assert blob["arch"]["kind"] == "graph"


def test_chains_stay_chains_and_partial_batch_norm_becomes_a_graph(digits, tmp_path):
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    assert isinstance(resolve_reference(mlp, digits), SparseMLP)
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))
    assert resolve_reference(cnn, digits).name == "custom" and type(resolve_reference(cnn, digits)).__name__ == \
        "CNNSpec"
    # batch norm after the first conv only: refused as a SparseCNN before, a graph reference now
    partial = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                            nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 16),
                            nn.ReLU(), nn.Linear(16, 10))
    reference = resolve_reference(partial, digits)
    assert isinstance(reference, GraphSpec)
    layers = [36, 288, 2_048, 160]  # 1*4*9, 4*8*9, 128*16, 16*10
    assert reference.dense_weights() == sum(layers) == 2_532
    assert reference.dense_flops() == 2 * (36 * 64 + 288 * 16 + 2_048 + 160)  # conv2 runs on the 4x4 pooled map
    model, report = run_method(_cfg("oneshot"), digits, reference, tmp_path / "run")
    assert model.active_weights() == sum(n // 2 for n in layers)
    assert len(model.norms) == 1 and model.norm_entries(0) is not None and model.norm_entries(1) is None


def test_a_network_that_reads_flat_vectors_gets_the_samples_flattened(digits):
    class Flat(nn.Module):  # no flatten of its own: reads (N, 64)
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(64, 16), nn.Linear(16, 16), nn.Linear(16, 10)

        def forward(self, x):
            h = torch.relu(self.a(x))
            return self.c(h + torch.relu(self.b(h)))

    reference = resolve_reference(Flat(), digits)
    assert reference.input_shape == (64,) and reference.is_mlp
    model = reference.build(torch.Generator().manual_seed(0))
    assert model(digits.test.X[:3]).shape == (3, 10)


def test_unsupported_networks_are_refused_in_one_sentence(digits):
    class Recurrent(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.fc = nn.LSTM(8, 4), nn.Linear(4, 10)

        def forward(self, x):
            return self.fc(self.rnn(x.flatten(2))[0][:, -1])

    with pytest.raises(NestError, match=r"^unsupported operation nn\.LSTM at module 'rnn'; nestsynth supports"):
        resolve_reference(Recurrent(), digits)

    class TooFew(UserResNet):
        def __init__(self):
            super().__init__()
            self.out = nn.Linear(20, 3)

    with pytest.raises(NestError, match="^model 'custom' has 3 outputs, but the data has 10 classes[.]$"):
        resolve_reference(TooFew(), digits)
    with pytest.raises(NestError, match="^model 'resnet20' needs image inputs"):
        get_model("resnet20").for_data((64,), 10)


def test_cli_prune_report_export_and_models_with_resnet_mnist(tmp_path):
    run = tmp_path / "run"
    rc, out, err = call(["prune", "--method", "gradual", "--model", "resnet-mnist", "--dataset", "digits",
                         "--out", run, "--quiet", "--device", "cpu", "--set", "train.batch_size=64",
                         "--set", "train.min_steps_per_epoch=0", "--set", "methods.gradual.begin_epoch=0",
                         "--set", "methods.gradual.end_epoch=1", "--set", "methods.gradual.epochs=2",
                         "--set", "methods.gradual.frequency=2", "--set", "methods.gradual.final_sparsity=0.5"])
    assert rc == 0, err
    report = json.loads((run / "report.json").read_text())
    # ResNet-8 on 1x8x8 digits: the weights of tests/test_graph_network.py (19,464, every layer even),
    # MACs 72*64 + 1,152*64 + 3,584*16 + 14,336*4 + 320 = 193,344 (stages at 8x8, 4x4, 2x2)
    assert report["model"] == "resnet-mnist" and report["dense_reference"]["weights"] == 19_464
    assert report["dense_reference"]["flops"] == 2 * 193_344
    assert report["weights"]["final"] == 19_464 // 2
    assert report["layers"][0]["name"] == "conv1" and report["layers"][5]["name"] == "layer2.0.shortcut.0"
    assert "layer2.0.shortcut.0" in out and "run directory" in out
    rc, out, _ = call(["report", run])
    assert rc == 0 and "resnet-mnist" in out
    rc, out, err = call(["export", run, "--format", "onnx"])
    assert rc == 0 and "check on 360 test set" in out, err
    rc, out, _ = call(["evaluate", run / "export" / "compact.onnx", "--json"])
    assert rc == 0 and json.loads(out)["test_error"] == pytest.approx(report["test_error"])
    rc, out, err = call(["compress", run, "--bits", "3", "--finetune-epochs", "0", "--json"])
    assert rc == 0, err
    assert [layer["name"] for layer in json.loads(out)["layers"]][5] == "layer2.0.shortcut.0"
    rc, out, _ = call(["models"])
    assert rc == 0 and any(line.startswith("resnet20 ") and "270,896" in line for line in out.splitlines())
    rc, _, err = call(["prune", "--method", "radix", "--model", "resnet-mnist", "--dataset", "digits",
                       "--out", tmp_path / "r2", "--quiet", "--device", "cpu"])
    assert rc == 2 and "method radix supports chain references" in one_error_line(err)
    assert not (tmp_path / "r2").exists()


# ---- export ---------------------------------------------------------------------------------
def _dead_unit_net() -> SparseGraph:
    """UserResNet with hand-made dead units (eval mode, fixed weights):

    * side (group of its own, 4 units): unit 1 is read by no live weight of fc (its 16 flattened
      columns masked); unit 2 has no live weight and a bias of -1, so relu(-1) = 0 reaches fc;
      unit 3 has no live weight and a bias of +1: the constant relu(1) = 1 reaches fc, kept;
    * fc (20 units): unit 7 is read by no live weight of out;
    * the residual stream (stem + c2, 6 units): unit 4 has no live weight in c2 but a live one
      in stem: kept.
    """
    torch.manual_seed(0)
    model = SparseGraph.from_module(UserResNet(), (1, 8, 8)).eval()
    layers = dict(zip(model.layer_names, model.layers))
    with torch.no_grad():
        mask = layers["fc"].mask.clone()
        mask[:, (6 + 1) * 16:(6 + 2) * 16] = 0  # side's unit 1 after the stream's 6 channels, 4x4 each
        set_mask(layers["fc"], mask)
        for unit, bias in ((2, -1.0), (3, 1.0)):
            m = layers["side"].mask.clone()
            m[unit] = 0
            set_mask(layers["side"], m)
            layers["side"].bias[unit] = bias
        m = layers["out"].mask.clone()
        m[:, 7] = 0
        set_mask(layers["out"], m)
        m = layers["c2"].mask.clone()
        m[4] = 0
        set_mask(layers["c2"], m)
    return model


def test_export_removes_exactly_the_dead_units():
    model = _dead_unit_net()
    compact, info = compact_graph_from_sparse(model)
    assert info["widths_masked"] == [1, 6, 6, 6, 4, 20, 10]
    assert info["widths_compact"] == [1, 6, 6, 6, 2, 19, 10]  # side: units 1 and 2 gone; fc: unit 7 gone
    assert info["removed_neurons"]["dead"] == [0, 0, 0, 2, 1, 0]
    # gone: side's live row 1 (6 weights), fc's live columns of side unit 2 (16 positions x 20 rows)
    # and fc's row 7 (160 columns, less side unit 1's 16 masked ones and unit 2's 16 counted before)
    assert compact.nnz() == model.active_weights() - 6 - 16 * 20 - (160 - 16 - 16)
    assert isinstance(compact.net.get_submodule("fc"), nn.Linear)  # plain layers: W * M
    x = torch.randn(50, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(compact(x), model(x), rtol=0, atol=1e-6)
    again = CompactGraph.from_state(compact.arch(), compact.tensors())
    with torch.no_grad():
        assert torch.equal(again(x), compact(x))
    with pytest.raises(NestError, match="dense layers only"):
        compact_graph_from_sparse(model, "csr")


@pytest.mark.parametrize("fmt", ["pytorch", "safetensors", "onnx"])
def test_export_artifacts_of_a_graph_run(digits, tmp_path, fmt):
    run = tmp_path / "run"
    run_method(_cfg("oneshot"), digits, resolve_reference(UserResNet(), digits), run)
    result = export_run(run, fmt)
    assert result["check_passed"] and result["max_abs_diff"] < 1e-5
    assert result["test_error_compact"] == result["test_error_masked"]
    artifact = load_artifact(result["artifact"])
    masked = load_model(run / "model.pt").eval()
    with torch.no_grad():
        torch.testing.assert_close(artifact(digits.test.X), masked(digits.test.X), rtol=0, atol=1e-5)
    assert evaluate_artifact(result["artifact"])["test_error"] == pytest.approx(result["test_error_masked"])
    if fmt == "pytorch":
        blob = ckpt.safe_load(run / "export" / "compact.pt")  # weights_only
        assert blob["arch"]["kind"] == "graph"
        from nestsynth.export.pipeline import bench_inference  # times the compact dense graph model
        timed = bench_inference(result["artifact"], batch_sizes=(4,), repeats=3, warmup=1)
        assert [row["name"] for row in timed["variants"]][:3] == ["dense reference", "masked", "compact (PyTorch)"]
        assert timed["variants"][2]["max_abs_diff_vs_masked"] < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("method", method_names())
def test_every_method_on_registered_resnet_mnist(digits, tmp_path, method):
    """The same contract on the registered ResNet-8 (2,2 MFLOPs on 8x8 digits, 10 weight layers)."""
    reference = resolve_reference("resnet-mnist", digits)
    if method in REFUSED:
        with pytest.raises(NestError, match=f"^method {method} supports"):
            run_method(_cfg(method), digits, reference, tmp_path / "run")
        return
    model, report = run_method(_cfg(method), digits, reference, tmp_path / "run")
    assert report["weights"]["final"] == model.active_weights() < 19_464 or method == "dense"
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "run" / "model.pt").eval()(digits.test.X),
                           model.eval()(digits.test.X))
    assert isinstance(model, SparseGraph) and not isinstance(model, (SparseMLP, SparseCNN))


@pytest.mark.slow
def test_resnet20_at_cifar_size_prunes_and_exports(tmp_path):
    """ResNet-20 on 32x32x3 (random images): the hand-counted dense reference, every layer at
    half its weights (all 22 layer sizes are even), and an ONNX export checked on random inputs."""
    g = torch.Generator().manual_seed(0)
    X, y = torch.rand(192, 3, 32, 32, generator=g), torch.randint(0, 10, (192,), generator=g)
    cfg = {"device": "cpu", "train": {"batch_size": 64, "min_steps_per_epoch": 0},
           "methods": {"gradual": {"epochs": 1, "begin_epoch": 0, "end_epoch": 1, "frequency": 1,
                                   "final_sparsity": 0.5}}}
    model, report = prune("resnet20", (X, y), method="gradual", config=cfg, out=tmp_path / "run")
    assert report["dense_reference"]["weights"] == 270_896 and report["dense_reference"]["flops"] == 81_626_368
    assert report["weights"]["final"] == model.active_weights() == 270_896 // 2
    assert len(report["layers"]) == 22 and report["layers"][-1]["name"] == "fc"
    result = export_run(tmp_path / "run", "onnx", check="random")
    assert result["check_passed"] and result["widths_compact"][-1] == 10


@pytest.mark.parametrize("target", [0, 300])
def test_l0_folds_the_gates_with_batch_norm_statistics_of_the_folded_network(digits, target):
    """l0 on a batch-norm network: without a target the returned model's running statistics
    are those of the folded network (recomputing them changes nothing), not those gathered
    under noisy gates; the projection row of a sized run is logged with them too."""
    from nestsynth.baselines.regularized import CALIBRATION_SAMPLES, run_l0
    from nestsynth.run_context import RunContext
    from nestsynth.training import recalibrate_batch_norm

    partial = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                            nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))
    reference = resolve_reference(partial, digits)
    cfg = config_mod.from_dict({"method": "l0", "device": "cpu", "train": {"batch_size": 64, "min_steps_per_epoch": 0},
                                "methods": {"l0": {"epochs": 2, "target_weights": target, "init_droprate": 0.5}}})
    ctx = RunContext(cfg, digits, reference, device=torch.device("cpu"))
    model = run_l0(ctx, cfg.methods.l0)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(norms) == 2
    if target:
        assert [r["phase"] for r in ctx.history][-2:] == ["project", "final"]
        return
    saved = [(m.running_mean.clone(), m.running_var.clone()) for m in norms]
    recalibrate_batch_norm(model, ctx.X[:CALIBRATION_SAMPLES], cfg.train.eval_batch_size)
    for m, (mean, var) in zip(norms, saved):
        torch.testing.assert_close(m.running_mean, mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m.running_var, var, rtol=1e-5, atol=1e-6)
