"""N2PS (nestsynth.baselines.n2ps) on CNN chains and graph networks.

Oracles: the significance of every unit computed by brute force (an explicit forward
pass with torch.nn.functional, then loops over every live weight that reads the unit and,
for a convolution, every output position that weight is applied at); the network's own
output before and after removing units that are dead by construction; the command line
and the Python API end to end on digits.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nestsynth
from cli_helpers import call
from nestsynth.baselines.n2ps import mean_activations, prune_round, significance, streams
from nestsynth.graph import SparseGraph
from nestsynth.sparse import SparseCNN, set_mask


def _term(a: float, w: float, measure: str) -> float:
    z = a * w
    return 1 / (1 + math.exp(-z)) if measure == "sigmoid" else abs(z)


def _conv_terms(x: torch.Tensor, layer, measure: str) -> list[float]:
    """Per input channel c of a conv reader: sum over live (k, c, u, v) of term(a, w), a the mean
    over patterns and output positions of the zero-padded input that (c, u, v) multiplies."""
    k, s, p = layer.kernel_size, layer.stride, layer.padding
    xp = F.pad(x.double(), (p, p, p, p))
    oh, ow = (xp.shape[2] - k) // s + 1, (xp.shape[3] - k) // s + 1
    w, m = layer.weight.detach().double(), layer.mask
    out = []
    for c in range(x.shape[1]):
        total = 0.0
        for u in range(k):
            for v in range(k):
                seen = [xp[:, c, y * s + u, q * s + v] for y in range(oh) for q in range(ow)]
                a = float(torch.stack(seen).mean())
                total += sum(_term(a, float(w[o, c, u, v]), measure) for o in range(w.shape[0]) if m[o, c, u, v])
        out.append(total)
    return out


def _linear_terms(x: torch.Tensor, layer, units: int, offset: int, expansion: int, measure: str) -> list[float]:
    """Per unit c read by a Linear layer through columns offset + c * expansion + q: sum over live
    (o, column) of term(a, w), a the pattern mean of that input column."""
    w, m = layer.weight.detach().double(), layer.mask
    out = []
    for c in range(units):
        total = 0.0
        for q in range(expansion):
            col = offset + c * expansion + q
            a = float(x[:, col].double().mean())
            total += sum(_term(a, float(w[o, col]), measure) for o in range(w.shape[0]) if m[o, col])
        out.append(total)
    return out


def _bn(x: torch.Tensor, bn: nn.Module) -> torch.Tensor:
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return (x - bn.running_mean.view(shape)) / torch.sqrt(bn.running_var.view(shape) + bn.eps) * \
        bn.weight.detach().view(shape) + bn.bias.detach().view(shape)


def _conv(x, layer):
    return F.conv2d(x, layer.weight.detach() * layer.mask, layer.bias.detach(), layer.stride, layer.padding)


def _randomize(model: nn.Module, seed: int, density: float = 0.7) -> None:
    """Random masks on every weight layer and non-trivial batch-norm statistics, eval mode."""
    g = torch.Generator().manual_seed(seed)
    for layer in model.layers:
        set_mask(layer, (torch.rand(layer.mask.shape, generator=g) < density).float())
    with torch.no_grad():
        for norm in [mod for mod in model.modules() if isinstance(mod, nn.modules.batchnorm._BatchNorm)]:
            n = norm.num_features
            norm.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
            norm.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            norm.weight.copy_(torch.rand(n, generator=g) + 0.5)
            norm.bias.copy_(torch.randn(n, generator=g) * 0.3)
    model.eval()


# ---- a chain CNN: conv (pool) -> conv (stride 2, padding 1) -> flatten -> fc -> fc ---------------
def _chain_cnn(density: float = 0.7) -> SparseCNN:
    model = SparseCNN((1, 6, 6), [dict(out=3, kernel=3, padding=1, pool="max:2:2"),
                                  dict(out=4, kernel=2, stride=2, padding=1)],
                      [dict(out=5), dict(out=3)], batch_norm=True, generator=torch.Generator().manual_seed(0))
    _randomize(model, 1, density)
    return model


def _chain_brute(model: SparseCNN, X: torch.Tensor, measure: str) -> list[list[float]]:
    conv1, conv2, fc1, fc2 = model.layers
    x1 = F.max_pool2d(torch.relu(_bn(_conv(X.view(-1, 1, 6, 6), conv1), model.norms[0])), 2)  # conv2's input
    x2 = torch.relu(_bn(_conv(x1, conv2), model.norms[1])).flatten(1)  # fc1's input: 4 channels x 2x2
    x3 = torch.relu(_bn(x2 @ (fc1.weight.detach() * fc1.mask).T + fc1.bias.detach(), model.norms[2]))
    return [_conv_terms(x1, conv2, measure), _linear_terms(x2, fc1, 4, 0, 4, measure),
            _linear_terms(x3, fc2, 5, 0, 1, measure)]


# ---- a residual graph: stem + c2 summed (one stream of 4 units) read by c1, down and fc -----------
class TinyRes(nn.Module):
    """(1, 6, 6) -> stem 4@3x3 -> [c1 4@3x3 + bn1 -> c2 4@3x3] + identity -> down 3@2x2 stride 2;
    fc reads cat(max_pool(stream), down) flattened (7 channels x 3x3).  The stream {stem, c2}
    is read three times: by c1 (before the sum), by down and by fc (after it)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.c1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.down = nn.Conv2d(4, 3, 2, stride=2)
        self.fc = nn.Linear(7 * 9, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(x + self.c2(F.relu(self.bn1(self.c1(x)))))
        return self.fc(torch.cat([F.max_pool2d(x, 2), F.relu(self.down(x))], 1).flatten(1))


def _graph(density: float = 0.7) -> SparseGraph:
    torch.manual_seed(0)
    model = SparseGraph.from_module(TinyRes(), (1, 6, 6), torch.Generator().manual_seed(0))
    _randomize(model, 2, density)
    return model


def _graph_brute(model: SparseGraph, X: torch.Tensor, measure: str) -> dict[tuple[str, ...], list[float]]:
    L = dict(zip(model.layer_names, model.layers))
    bn1 = model.net.get_submodule("bn1")
    x0 = torch.relu(_conv(X.view(-1, 1, 6, 6), L["stem"]))  # c1 reads the stream before the sum
    h = torch.relu(_bn(_conv(x0, L["c1"]), bn1))  # c2's input
    x = torch.relu(x0 + _conv(h, L["c2"]))  # down reads it after the sum, fc after the sum and a pool
    fc_in = torch.cat([F.max_pool2d(x, 2), torch.relu(_conv(x, L["down"]))], 1).flatten(1)
    stream = [a + b + c for a, b, c in zip(_conv_terms(x0, L["c1"], measure), _conv_terms(x, L["down"], measure),
                                           _linear_terms(fc_in, L["fc"], 4, 0, 9, measure))]
    return {("stem", "c2"): stream, ("c1",): _conv_terms(h, L["c2"], measure),
            ("down",): _linear_terms(fc_in, L["fc"], 3, 4 * 9, 9, measure)}


X = torch.rand(12, 36, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("measure", ["sigmoid", "abs"])
def test_chain_cnn_significance_equals_brute_force(measure):
    model = _chain_cnn()
    assert [(st.members, [(i, s.units, s.expansion) for i, s in st.reads]) for st in streams(model)] == \
        [((0,), [(1, 3, 1)]), ((1,), [(2, 4, 4)]), ((2,), [(3, 5, 1)])]
    sig = significance(model, mean_activations(model, X, chunk=5), measure)
    with torch.no_grad():
        brute = _chain_brute(model, X, measure)
    for s, b in zip(sig, brute):
        torch.testing.assert_close(s, torch.tensor(b, dtype=torch.float64), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("measure", ["sigmoid", "abs"])
def test_residual_graph_significance_equals_brute_force(measure):
    model = _graph()
    found = streams(model)
    names = [tuple(model.layer_names[i] for i in st.members) for st in found]
    assert names == [("stem", "c2"), ("c1",), ("down",)]  # fc is the output: not pruned
    assert [model.layer_names[i] for i, _ in found[0].reads] == ["c1", "down", "fc"]
    sig = significance(model, mean_activations(model, X, chunk=5), measure)
    with torch.no_grad():
        brute = _graph_brute(model, X, measure)
    for key, s in zip(names, sig):
        torch.testing.assert_close(s, torch.tensor(brute[key], dtype=torch.float64), rtol=1e-6, atol=1e-6)


# ---- removing dead units keeps the function ---------------------------------------------------
@torch.no_grad()
def _kill(layer, unit: int, norm: nn.Module | None = None) -> None:
    """Mask every incoming weight of ``unit`` and give it a negative constant (after its batch
    norm, if any): its ReLU output is exactly zero on every input."""
    mask = layer.mask.clone()
    mask[unit] = 0
    set_mask(layer, mask)
    layer.bias[unit] = -1.0
    if norm is not None:
        norm.running_mean[unit], norm.weight[unit], norm.bias[unit] = 0.0, 1.0, -0.5


@torch.no_grad()
def _lift(*params) -> None:
    """Add 2 to these biases: the units they feed are positive on these inputs (not dead by chance)."""
    for p in params:
        p += 2.0


def _check_dead_units_removed(model, dead: list[list[int]]) -> None:
    """prune_round with a threshold just above zero ("abs": a dead unit scores exactly 0, the least)
    removes exactly the dead units, and the smaller network computes what the masked one did."""
    masked = copy.deepcopy(model).eval()
    sig, removed = prune_round(model, X, "abs", 1e-6, 1)
    for s, r, d in zip(sig, removed, dead):
        assert r.nonzero().flatten().tolist() == d
        assert all(float(s[u]) == 0.0 for u in d) and bool((s[~r] > 0).all())
    model.eval()
    Xt = torch.rand(30, 36, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        torch.testing.assert_close(model(Xt), masked(Xt), rtol=0, atol=1e-5)


def test_removing_dead_units_of_a_chain_cnn_keeps_its_function():
    model = _chain_cnn(density=1.0)
    _lift(*(norm.bias for norm in model.norms))
    _kill(model.layers[0], 1, model.norms[0])  # a feature map read by conv2
    _kill(model.layers[1], 0, model.norms[1])  # a feature map read by fc1 through the flatten
    _kill(model.layers[1], 3, model.norms[1])
    _kill(model.layers[2], 2, model.norms[2])  # a neuron
    _check_dead_units_removed(model, [[1], [0, 3], [2]])
    assert model.widths == [1, 2, 2, 4, 3]
    assert [layer.weight.shape[1] for layer in model.layers] == [1, 2, 2 * 4, 4]


def test_removing_dead_units_of_a_residual_graph_keeps_its_function():
    model = _graph(density=1.0)
    L = dict(zip(model.layer_names, model.layers))
    _lift(L["stem"].bias, model.net.get_submodule("bn1").bias, L["down"].bias)
    _kill(L["stem"], 2)  # stream unit 2: zero out of stem, and c2 adds nothing to it
    with torch.no_grad():
        mask = L["c2"].mask.clone()
        mask[2] = 0
        set_mask(L["c2"], mask)
        L["c2"].bias[2] = 0.0
    _kill(L["c1"], 0, model.net.get_submodule("bn1"))
    _kill(L["down"], 1)
    _check_dead_units_removed(model, [[2], [0], [1]])
    assert model.widths == [1, 3, 3, 3, 2, 10]
    assert model.layers[-1].weight.shape[1] == (3 + 2) * 9


# ---- end to end on digits ---------------------------------------------------------------------
FAST = ["--set", "methods.n2ps.dense_epochs=1", "--set", "methods.n2ps.retrain_epochs=1"]


@pytest.mark.parametrize("model", ["tiny-cnn", "resnet-mnist"])
def test_cli_prune_n2ps_on_a_cnn_and_a_residual_graph(tmp_path, model):
    run = tmp_path / "run"
    rc, _, err = call(["prune", "--method", "n2ps", "--model", model, "--dataset", "digits", "--out", run,
                       "--quiet", "--device", "cpu", "--set", "train.min_steps_per_epoch=0", *FAST])
    assert rc == 0, err
    report = json.loads((run / "report.json").read_text())
    widths, dense = report["widths"]["final"], report["dense_reference"]
    assert len(widths) == len(dense["widths"]) and widths != dense["widths"]
    assert all(w <= d for w, d in zip(widths, dense["widths"])) and widths[-1] == 10
    assert 0 < report["weights"]["final"] < dense["weights"]
    assert report["flops"]["final"] < dense["flops"]
    saved = nestsynth.load_model(run / "model.pt")
    assert saved.widths == widths


class TinyResDigits(TinyRes):
    """TinyRes on the 8x8 digits (fc reads 7 channels x 4x4)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(7 * 16, 10)


def test_api_prune_n2ps_on_a_user_residual_network(digits):
    config = {"train": {"batch_size": 64, "min_steps_per_epoch": 0},
              "methods": {"n2ps": {"dense_epochs": 1, "retrain_epochs": 1}}}
    model, report = nestsynth.prune(TinyResDigits(), (digits.train.X, digits.train.y), (digits.val.X, digits.val.y),
                                    method="n2ps", config=config)
    assert isinstance(model, SparseGraph)
    assert model.active_weights() == report["weights"]["final"] < report["dense_reference"]["weights"]
    assert model.widths[1:-1] != report["dense_reference"]["widths"][1:-1] and model.widths[-1] == 10
    for layer in model.layers:
        assert float(layer.weight.detach()[layer.mask == 0].abs().sum()) == 0.0
