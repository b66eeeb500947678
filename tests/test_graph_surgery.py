"""nestsynth.graph masked copies and unit surgery on coupled groups (residual, concat, flatten)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nestsynth.errors import NestError
from nestsynth.graph import Slice, capture, graph_flops
from nestsynth.graph.masked import GraphMaskedConv2d, add_units, remove_units, to_masked
from nestsynth.graph.models import TinyResidualCNN, TinyResidualMLP, resnet20_cifar
from nestsynth.metrics import layer_table, totals
from nestsynth.sparse import MaskedConv2d, MaskedLinear, cnn_from_sequential


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every batch norm non-trivial statistics and affine weights; eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=gen) * 2 - 1)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(n, generator=gen) - 0.5)
    return model.eval()


class Odd(nn.Module):
    """Dilation, a rectangular kernel, stride 2 and convolutions without bias."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 6, 3, padding=2, dilation=2, bias=False)
        self.c2 = nn.Conv2d(6, 4, (1, 3), stride=(2, 1), padding=(0, 1))
        self.fc = nn.Linear(4 * 4 * 8, 3, bias=False)

    def forward(self, x):
        return self.fc(F.relu(self.c2(F.relu(self.c1(x)))).flatten(1))


@pytest.mark.parametrize("make, shape", [(TinyResidualCNN, (4, 1, 8, 8)), (TinyResidualMLP, (4, 1, 8, 8)),
                                         (Odd, (3, 2, 8, 8)), (resnet20_cifar, (2, 3, 32, 32))])
def test_masked_forward_equals_the_original(make, shape):
    torch.manual_seed(0)
    model = randomize_norms(make())
    x = torch.randn(*shape)
    masked = to_masked(capture(model, x)).eval()
    assert torch.equal(masked(x), model(x))
    graph = masked.nest_graph
    assert graph.module is masked and graph is not model
    for name, layer in graph.layers.items():
        module = masked.get_submodule(name)
        assert isinstance(module, (MaskedLinear, MaskedConv2d)) and layer.kind == type(module).__name__
        assert bool(module.mask.eq(1).all())
    assert all(not isinstance(m, MaskedLinear) for m in model.modules())  # the model is not changed


def test_masked_copy_keeps_conv_settings():
    masked = to_masked(capture(Odd(), torch.randn(1, 2, 8, 8)))
    c1, c2 = masked.c1, masked.c2
    assert isinstance(c1, GraphMaskedConv2d)
    assert (c1.dilation, c1.padding, c1.stride, c1.out_hw) == ((2, 2), 2, 1, (8, 8))
    assert (tuple(c2.weight.shape), c2.stride, c2.padding, c2.out_hw) == ((4, 6, 1, 3), (2, 1), (0, 1), (4, 8))
    assert bool(c1.bias.eq(0).all())  # the original had no bias


def lenet_5() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, 20, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(20, 50, 5), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(800, 500), nn.ReLU(), nn.Linear(500, 10))


def test_masked_flops_follow_masks_and_areas_like_metrics():
    seq = lenet_5()
    masked = to_masked(capture(seq, torch.randn(1, 1, 28, 28)))
    sparse = cnn_from_sequential(seq, (1, 28, 28))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, layer in zip(masked.nest_graph.layers, sparse.layers):
            mine = masked.get_submodule(name)
            layer.mask.copy_((torch.rand(layer.mask.shape, generator=gen) < 0.4).float())
            mine.mask.copy_(layer.mask)
            if isinstance(layer, MaskedConv2d):
                layer.area.copy_((torch.rand(layer.area.shape, generator=gen) < 0.5).float())
                mine.area.copy_(layer.area)
    expected = int(totals(layer_table(sparse))["flops"])
    assert graph_flops(masked.nest_graph) == expected < 4_586_000
    assert torch.allclose(masked.eval()(torch.ones(2, 1, 28, 28)), sparse.eval()(torch.ones(2, 1, 28, 28)),
                          atol=1e-5)


# ---- surgery -----------------------------------------------------------------------------

def silence(module: nn.Module, group, unit: int) -> None:
    """Make unit ``unit`` of the group constant zero: its rows, biases and batch-norm entries."""
    with torch.no_grad():
        for name in group.members:
            layer = module.get_submodule(name)
            layer.weight[unit] = 0
            if layer.bias is not None:
                layer.bias[unit] = 0
        for s in group.norms:
            norm = module.get_submodule(s.reader)
            idx = s.indices(torch.tensor([unit]))
            norm.weight[idx] = 0
            norm.bias[idx] = 0


def check_shapes(module: nn.Module) -> None:
    """Every tensor of every layer and norm agrees with the graph's unit counts."""
    graph = module.nest_graph
    for group in graph.groups():
        assert all(s.units == group.units for s in group.reads + group.norms)
    for name, layer in graph.layers.items():
        m = module.get_submodule(name)
        assert tuple(m.weight.shape[:2]) == (layer.out_units, layer.in_units)
        if m.bias is not None:
            assert m.bias.shape == (layer.out_units,)
        if hasattr(m, "mask"):
            assert m.mask.shape == m.weight.shape
        if hasattr(m, "area"):
            assert m.area.shape[0] == layer.out_units
        if isinstance(m, nn.Linear):
            assert (m.in_features, m.out_features) == (layer.in_units, layer.out_units)
        if isinstance(m, nn.Conv2d):
            assert (m.in_channels, m.out_channels) == (layer.in_units, layer.out_units)
    for name, norm in graph.norms.items():
        m = module.get_submodule(name)
        assert m.num_features == norm.num_features == m.running_mean.shape[0] == m.weight.shape[0] == \
            m.bias.shape[0] == m.running_var.shape[0]


def masked_tiny_cnn(seed: int = 0):
    torch.manual_seed(seed)
    model = randomize_norms(TinyResidualCNN())
    x = torch.randn(4, 1, 8, 8)
    return to_masked(capture(model, x)).eval(), x


@pytest.mark.parametrize("index, unit", [(0, 3), (1, 0), (2, 7), (3, 5), (4, 10)])
def test_removing_a_silent_unit_keeps_the_function(index, unit):
    # groups: 0 the residual stream (stem + block.conv2, read by block.conv1 and both branches),
    # 1 block.conv1, 2 branch_a and 3 branch_b (concatenated, flattened into fc), 4 fc (fc_bn, out)
    module, x = masked_tiny_cnn()
    group = module.nest_graph.groups()[index]
    live = module(x)
    silence(module, group, unit)
    before = module(x)
    assert not torch.allclose(before, live, atol=1e-4)  # the unit mattered before it was silenced
    old_rows = {name: module.get_submodule(name).weight.detach().clone() for name in group.members}
    keep = torch.ones(group.units, dtype=torch.bool)
    keep[unit] = False
    after = remove_units(module, group, keep)
    assert after.units == group.units - 1 and after.members == group.members
    assert torch.allclose(module(x), before, atol=1e-6, rtol=0)
    check_shapes(module)
    for name, rows in old_rows.items():
        assert torch.equal(module.get_submodule(name).weight, rows[keep])


def test_cat_offsets_and_flatten_expansion_follow_surgery():
    module, x = masked_tiny_cnn()
    graph = module.nest_graph
    a, b = graph.group_of("branch_a"), graph.group_of("branch_b")
    fc_old = module.fc.weight.detach().clone()
    silence(module, a, 2)
    before = module(x)
    keep = torch.ones(8, dtype=torch.bool)
    keep[2] = False
    remove_units(module, a, keep)
    # branch_a keeps 7 maps of 4x4 = 112 inputs; branch_b's block moves from offset 128 to 112
    assert graph.producers("fc") == (Slice("fc", ("branch_a",), 0, 7, 16), Slice("fc", ("branch_b",), 112, 8, 16))
    assert torch.equal(module.fc.weight[:, :32], fc_old[:, :32])
    assert torch.equal(module.fc.weight[:, 32:], fc_old[:, 48:])  # map 2's 16 inputs are gone
    b = add_units(module, b, 2)
    assert graph.producers("fc")[1] == Slice("fc", ("branch_b",), 112, 10, 16)
    assert module.fc.weight.shape == (32, 112 + 160)
    assert bool(module.fc.weight[:, 112 + 128:].eq(0).all())  # the new maps' inputs are zero
    assert torch.allclose(module(x), before, atol=1e-6, rtol=0)
    check_shapes(module)


@pytest.mark.parametrize("make", [TinyResidualCNN, TinyResidualMLP])
def test_adding_units_keeps_the_function(make):
    torch.manual_seed(0)
    model = randomize_norms(make())
    x = torch.randn(5, 1, 8, 8)
    module = to_masked(capture(model, x)).eval()
    before = module(x)
    gen = torch.Generator().manual_seed(3)
    for group in module.nest_graph.groups():
        if not group.resizable:
            continue
        grown = add_units(module, group, 3, generator=gen)
        assert grown.units == group.units + 3
        for s in grown.reads:  # what the new units feed is zero; their own rows are not
            new_inputs = s.indices(torch.arange(group.units, grown.units))
            assert bool(module.get_submodule(s.reader).weight.index_select(1, new_inputs).eq(0).all())
        for name in grown.members:
            assert module.get_submodule(name).weight[group.units:].abs().sum() > 0
        for s in grown.norms:
            norm = module.get_submodule(s.reader)
            new_entries = s.indices(torch.arange(group.units, grown.units))
            assert bool(norm.running_var[new_entries].eq(1).all()) and bool(norm.weight[new_entries].eq(1).all())
    assert torch.allclose(module(x), before, atol=1e-6, rtol=0)
    check_shapes(module)


def silenced(make, shape, member: str, unit: int, masked: bool = True):
    """The model ``make()`` with random batch norms, unit ``unit`` of the group of ``member``
    silenced: (module with a nest_graph, the model, the group, an input, the module's output)."""
    torch.manual_seed(0)
    model = randomize_norms(make())
    x = torch.randn(*shape)
    graph = capture(model, x)
    module = to_masked(graph).eval() if masked else graph.module
    group = module.nest_graph.group_of(member)
    silence(module, group, unit)
    return module, model, group, x, module(x)


def test_resnet20_stage_stream_surgery():
    module, _, stream, x, before = silenced(resnet20_cifar, (2, 3, 32, 32), "layer2.0.shortcut.0", 5)
    keep = torch.ones(32, dtype=torch.bool)
    keep[5] = False
    stream = remove_units(module, stream, keep)
    stream = add_units(module, stream, 4)
    assert stream.units == 35
    for name in ("layer2.0.conv2", "layer2.0.shortcut.0", "layer2.1.conv2", "layer2.2.conv2"):
        assert module.get_submodule(name).weight.shape[0] == 35
    for name in ("layer2.1.conv1", "layer2.2.conv1", "layer3.0.conv1", "layer3.0.shortcut.0"):
        assert module.get_submodule(name).weight.shape[1] == 35
    assert module.get_submodule("layer2.0.shortcut.1").num_features == 35
    assert torch.allclose(module(x), before, atol=1e-5, rtol=0)
    check_shapes(module)


def test_surgery_on_the_captured_plain_model():
    """Without to_masked: nn.Linear / nn.Conv2d size attributes follow the surgery."""
    module, model, group, x, before = silenced(TinyResidualCNN, (3, 1, 8, 8), "stem", 0, masked=False)
    graph = module.nest_graph
    remove_units(graph.module, group, torch.tensor([False] + [True] * 7))
    add_units(graph.module, graph.group_of("fc"), 2)
    assert (model.stem.out_channels, model.block.conv1.in_channels, model.branch_b.in_channels) == (7, 7, 7)
    assert (model.fc.out_features, model.out.in_features, model.fc_bn.num_features) == (34, 34, 34)
    assert torch.allclose(model(x), before, atol=1e-6, rtol=0)
    check_shapes(graph.module)


def test_optimizer_state_follows_surgery():
    module, x = masked_tiny_cnn()
    opt = torch.optim.Adam(module.parameters(), lr=1e-3)
    module.train()
    module(x).square().mean().backward()
    opt.step()
    group = module.nest_graph.group_of("branch_b")
    remove_units(module, group, torch.arange(8) % 2 == 0, optimizer=opt)
    add_units(module, module.nest_graph.group_of("block.conv1"), 2, optimizer=opt)
    for p in module.parameters():
        for value in opt.state[p].values():
            if torch.is_tensor(value) and value.dim():
                assert value.shape == p.shape
    module(x).square().mean().backward()
    opt.step()  # still works on the new shapes


def test_fixed_groups_and_bad_arguments_are_refused():
    module, _ = masked_tiny_cnn()
    groups = module.nest_graph.groups()
    with pytest.raises(NestError, match=r"^group 5 \(out\) cannot be resized because it feeds the network's output"):
        add_units(module, groups[5], 1)
    with pytest.raises(NestError, match="keep has 3 entries but group 1 has 8 units"):
        remove_units(module, groups[1], torch.ones(3, dtype=torch.bool))
    with pytest.raises(NestError, match="cannot remove every unit"):
        remove_units(module, groups[1], torch.zeros(8, dtype=torch.bool))
    with pytest.raises(NestError, match="made by capture"):
        add_units(nn.Linear(2, 2), groups[1], 1)
