"""nestsynth.graph.SparseGraph: a captured network with masked layers, as the methods see it.

Forward and trace against the original module, widths and groups, effective weights and
batch-norm folding against hand computations (own, concatenated and residual-sum batch
norms), the plain-data architecture and its round trip (also through the model file),
dense counts against hand counts, reproducible re-initialization and unit surgery.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nestsynth import checkpoint as ckpt
from nestsynth.errors import NestError
from nestsynth.graph import SparseGraph, describe, rebuild
from nestsynth.graph.models import TinyResidualCNN, TinyResidualMLP, resnet8_mnist, resnet20_cifar
from nestsynth.metrics import layer_table, reference_flops, reference_weights, totals
from nestsynth.report.run_files import load_model, save_model
from nestsynth.sparse import MaskedLinear, set_mask
from test_graph_surgery import randomize_norms


class Mixed(nn.Module):
    """(2, 6, 6) -> stem conv 4 + own BN -> two branches a (3) and b (5), concatenated and
    normalized by one BN over 8 channels -> residual pair c (8) + d (8) normalized by a BN of
    the sum -> conv e (4, no BN, no bias) -> flatten -> fc 6 + BatchNorm1d over the flattened
    e (no per-unit scale for e) ... -> out 3."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.a, self.b = nn.Conv2d(4, 3, 1), nn.Conv2d(4, 5, 3, padding=1)
        self.bn_cat = nn.BatchNorm2d(8)
        self.c, self.d = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3, padding=1)
        self.bn_sum = nn.BatchNorm2d(8)
        self.e = nn.Conv2d(8, 4, 3, stride=2, padding=1, bias=False)
        self.bn_flat = nn.BatchNorm1d(4 * 9)
        self.fc, self.out = nn.Linear(4 * 9, 6), nn.Linear(6, 3)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        x = F.relu(self.bn_cat(torch.cat([self.a(x), self.b(x)], 1)))
        x = F.relu(self.bn_sum(self.c(x) + self.d(x)))
        x = self.bn_flat(torch.flatten(self.e(x), 1))
        return self.out(F.relu(self.fc(x)))


def sparse_of(model: nn.Module, shape) -> SparseGraph:
    return SparseGraph.from_module(model, shape).eval()


MODELS = [(Mixed, (2, 6, 6)), (TinyResidualCNN, (1, 8, 8)), (TinyResidualMLP, (1, 8, 8))]


@pytest.mark.parametrize("make,shape", MODELS)
def test_forward_and_trace_are_the_original_network(make, shape):
    torch.manual_seed(0)
    model = randomize_norms(make())
    sparse = sparse_of(model, shape)
    x = torch.randn(5, *shape)
    seen = {}  # the original layers' inputs and outputs, by hooks on the original module
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            m.register_forward_hook(lambda mod, args, out, name=name: seen.__setitem__(name, (args[0], out)))
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(sparse(x), expected)
        inputs, outputs = sparse.trace(x)
    assert sparse.layer_names == list(seen)  # graph order is the order the forward calls them
    for name, i, o in zip(sparse.layer_names, inputs, outputs):
        assert torch.equal(i, seen[name][0]) and torch.equal(o, seen[name][1])
    assert sparse.layer_outputs(x)[-1].shape == expected.shape


def test_structure_widths_groups_and_consumers():
    sparse = sparse_of(Mixed(), (2, 6, 6))
    assert sparse.layer_names == ["stem", "a", "b", "c", "d", "e", "fc", "out"]
    assert sparse.widths == [2, 4, 3, 5, 8, 8, 4, 6, 3]
    assert [type(n).__name__ for n in sparse.norms] == ["BatchNorm2d", "BatchNorm2d", "BatchNorm2d", "BatchNorm1d"]
    assert [g.members for g in sparse.groups()] == [("stem",), ("a",), ("b",), ("c", "d"), ("e",), ("fc",), ("out",)]
    assert sparse.consumers(0) == [1, 2] and sparse.consumers(1) == [3, 4] and sparse.consumers(5) == [6]
    assert sparse.group_of(4).members == ("c", "d")
    assert sparse.has_conv and sparse.output_is_last_layer
    assert not sparse_of(TinyResidualMLP(), (1, 8, 8)).has_conv


def test_effective_weight_and_folding_against_hand_computation():
    torch.manual_seed(1)
    model = randomize_norms(Mixed(), seed=2)
    sparse = sparse_of(model, (2, 6, 6))
    layers = dict(zip(sparse.layer_names, sparse.layers))
    g = torch.Generator().manual_seed(3)
    for layer in layers.values():  # some connections pruned
        set_mask(layer, (torch.rand(layer.mask.shape, generator=g) > 0.3).float())
    masked = {n: (l.weight.detach() * l.mask) for n, l in layers.items()}

    def per_unit(v):
        return v.view(-1, 1, 1, 1)

    # stem: its own BatchNorm2d(4)
    bn = model.bn0
    s = torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(sparse.effective_weight(0), masked["stem"] / per_unit(s), rtol=0, atol=0)
    w, b = sparse.folded_layer(0)
    scale = bn.weight.detach() / s
    torch.testing.assert_close(w, masked["stem"] * per_unit(scale))
    torch.testing.assert_close(b, (layers["stem"].bias.detach() - bn.running_mean) * scale + bn.bias.detach())
    # a and b: entries 0..2 and 3..7 of the BN over their concatenation
    bn = model.bn_cat
    for i, name, entries in ((1, "a", slice(0, 3)), (2, "b", slice(3, 8))):
        s = torch.sqrt(bn.running_var[entries] + bn.eps)
        torch.testing.assert_close(sparse.effective_weight(i), masked[name] / per_unit(s), rtol=0, atol=0)
        w, b = sparse.folded_layer(i)
        scale = bn.weight.detach()[entries] / s
        torch.testing.assert_close(w, masked[name] * per_unit(scale))
        torch.testing.assert_close(b, (layers[name].bias.detach() - bn.running_mean[entries]) * scale
                                   + bn.bias.detach()[entries])
    # c and d: the BN of their sum scales both, but folds into neither
    bn = model.bn_sum
    for i, name in ((3, "c"), (4, "d")):
        s = torch.sqrt(bn.running_var + bn.eps)
        torch.testing.assert_close(sparse.effective_weight(i), masked[name] / per_unit(s), rtol=0, atol=0)
        w, b = sparse.folded_layer(i)
        assert torch.equal(w, masked[name]) and torch.equal(b, layers[name].bias.detach())
    # e is flattened into a BatchNorm1d (9 entries per channel): no per-unit scale; out has no BN
    assert sparse.norm_entries(5) is None and torch.equal(sparse.effective_weight(5), masked["e"])
    assert sparse.norm_entries(7) is None and torch.equal(sparse.effective_weight(7), masked["out"])
    assert torch.equal(layers["e"].bias, torch.zeros(4))  # built without a bias: zero
    assert sparse.nonzero_biases(5) == 0 and sparse.nonzero_biases(0) == 4


def test_arch_is_plain_data_and_rebuilds_the_same_network(tmp_path):
    torch.manual_seed(4)
    sparse = sparse_of(randomize_norms(Mixed()), (2, 6, 6))
    g = torch.Generator().manual_seed(5)
    for layer in sparse.layers:
        set_mask(layer, (torch.rand(layer.mask.shape, generator=g) > 0.5).float())
    group = sparse.group_of(3)  # c + d: remove 3 of their 8 units everywhere they are used
    sparse.remove_units(group, torch.tensor([1, 0, 1, 1, 0, 1, 0, 1], dtype=torch.bool))
    assert sparse.widths == [2, 4, 3, 5, 5, 5, 4, 6, 3] and sparse.layers[5].weight.shape == (4, 5, 3, 3)
    arch = sparse.arch()
    assert json.loads(json.dumps(arch)) == arch  # lists, strings and numbers only
    again = SparseGraph.from_arch(arch)
    again.load_state_dict(sparse.state_dict())
    again.eval()
    x = torch.randn(7, 2, 6, 6)
    with torch.no_grad():
        assert torch.equal(again(x), sparse(x))
    assert again.arch() == arch and again.widths == sparse.widths
    assert [g.members for g in again.groups()] == [g.members for g in sparse.groups()]
    # the model file: tensors and plain data only, read back with weights_only=True
    save_model(sparse, tmp_path / "model.pt", "mixed", [2, 6, 6])
    blob = ckpt.safe_load(tmp_path / "model.pt")
    assert blob["arch"]["kind"] == "graph" and blob["name"] == "mixed"
    loaded = load_model(tmp_path / "model.pt").eval()
    assert isinstance(loaded, SparseGraph) and loaded.active_weights() == sparse.active_weights()
    with torch.no_grad():
        assert torch.equal(loaded(x), sparse(x))


def test_descriptions_naming_other_code_are_refused():
    arch = sparse_of(TinyResidualCNN(), (1, 8, 8)).arch()["graph"]
    bad = json.loads(json.dumps(arch))
    next(n for n in bad["nodes"] if n["op"] == "call_function")["target"] = "os.system"
    with pytest.raises(NestError, match="unknown function 'os.system'"):
        rebuild(bad)
    bad = json.loads(json.dumps(arch))
    bad["modules"]["stem"]["type"] = "LSTM"
    with pytest.raises(NestError, match="unknown module type 'LSTM'"):
        rebuild(bad)
    with pytest.raises(NestError, match="version"):
        rebuild({**arch, "version": 99})
    with pytest.raises(NestError, match="damaged"):
        rebuild({"version": 1, "modules": {}})


def test_a_module_type_without_a_description_is_refused_at_once():
    class MyMasked(MaskedLinear):  # capture keeps it whole (a masked layer), plain data cannot name it
        pass

    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), MyMasked(3, 2))
    with pytest.raises(NestError, match="a MyMasked module cannot be described as plain data"):
        SparseGraph.from_module(model, (4,))
    assert describe(SparseGraph.from_module(nn.Sequential(nn.Linear(4, 3), nn.ReLU()), (4,)).net)["modules"]


def test_dense_counts_match_hand_counts():
    # ResNet-20 (tests/test_graph_capture.py): 270,896 weights, 2 x 40,813,184 FLOPs at 32x32x3
    sparse = SparseGraph.from_module(resnet20_cifar(), (3, 32, 32))
    assert sparse.dense_weights() == reference_weights(sparse) == 270_896
    assert sparse.flops() == reference_flops(sparse) == 81_626_368
    # ResNet-8 for MNIST at 28x28x1: stem 1*8*9 = 72; stage 1 (28x28): 2 x 8*8*9 = 1,152;
    # stage 2 (14x14): 8*16*9 + 16*16*9 + 8*16 = 3,584; stage 3 (7x7): 16*32*9 + 32*32*9 + 16*32
    # = 14,336; fc 32*10 = 320.  MACs: 72*784 + 1,152*784 + 3,584*196 + 14,336*49 + 320.
    sparse = SparseGraph.from_module(resnet8_mnist(), (1, 28, 28))
    assert sparse.dense_weights() == 72 + 1_152 + 3_584 + 14_336 + 320 == 19_464
    macs = 72 * 784 + 1_152 * 784 + 3_584 * 196 + 14_336 * 49 + 320
    assert sparse.flops() == reference_flops(sparse) == 2 * macs == 4_729_728
    rows = layer_table(sparse)
    assert [r["name"] for r in rows][:3] == ["conv1", "layer1.0.conv1", "layer1.0.conv2"]
    assert totals(rows)["flops"] == 2 * macs and totals(rows)["weights"] == sparse.active_weights()


def test_reset_parameters_is_reproducible_and_in_the_default_range():
    a = SparseGraph.from_module(Mixed(), (2, 6, 6), torch.Generator().manual_seed(7))
    b = SparseGraph.from_module(Mixed(), (2, 6, 6), torch.Generator().manual_seed(7))
    for name, la, lb in zip(a.layer_names, a.layers, b.layers):
        assert torch.equal(la.weight, lb.weight) and torch.equal(la.bias, lb.bias)
        bound = 1.0 / la.weight[0].numel() ** 0.5
        top = float(la.weight.detach().abs().max())
        assert 0.5 * bound < top <= bound
        assert (float(la.bias.detach().abs().max()) == 0.0) == (name == "e")  # e was built without a bias
    assert all(torch.equal(n.running_var, torch.ones_like(n.running_var)) for n in a.norms)


def test_surgery_keeps_the_function_when_removing_silent_units():
    torch.manual_seed(8)
    sparse = sparse_of(randomize_norms(TinyResidualCNN()), (1, 8, 8))
    x = torch.randn(4, 1, 8, 8)
    group = sparse.group_of(sparse.layer_names.index("fc"))
    fc_out = sparse.layers[sparse.layer_names.index("out")]
    with torch.no_grad():  # units 0 and 5 of fc are read by nobody: removing them changes nothing
        fc_out.weight[:, [0, 5]] = 0
        fc_out.mask[:, [0, 5]] = 0
        before = sparse(x).detach()
    keep = torch.ones(group.units, dtype=torch.bool)
    keep[[0, 5]] = False
    after_group = sparse.remove_units(group, keep)
    assert after_group.units == group.units - 2 and sparse.widths[-2] == group.units - 2
    torch.testing.assert_close(sparse(x), before)
    assert sparse.add_units(after_group, 3).units == group.units + 1
    torch.testing.assert_close(sparse(x), before)
