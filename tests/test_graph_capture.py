"""nestsynth.graph capture: layouts, producers/consumers, coupled groups and refusals."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nestsynth.errors import NestError
from nestsynth.graph import INPUT, Slice, capture
from nestsynth.graph.models import resnet18_cifar, resnet20_cifar
from nestsynth.graph.ops import graph_flops, graph_weights, layer_costs
from nestsynth.metrics import layer_table, reference_flops, reference_weights, totals
from nestsynth.registry import get_model
from nestsynth.sparse import cnn_from_sequential


def one_sentence(message: str) -> bool:
    """One line, ending with a period, and no sentence break inside."""
    return "\n" not in message and message.endswith(".") and not re.search(r"[.!?]\s", message[:-1])


class Block(nn.Module):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + x)."""

    def __init__(self, c: int):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(self.b2(self.c2(F.relu(self.b1(self.c1(x))))) + x)


class CatNet(nn.Module):
    """(1, 8, 8) -> stem 4 -> residual block -> cat(a: 3, b: 5) -> max pool 2 -> view -> fc 10."""

    def __init__(self):
        super().__init__()
        self.stem, self.blk = nn.Conv2d(1, 4, 3, padding=1), Block(4)
        self.a, self.b = nn.Conv2d(4, 3, 1), nn.Conv2d(4, 5, 1)
        self.pool, self.fc = nn.MaxPool2d(2), nn.Linear(8 * 16, 10)

    def forward(self, x):
        x = self.blk(F.relu(self.stem(x)))
        y = torch.cat([self.a(x), self.b(x)], 1)
        y = self.pool(y)
        return self.fc(y.view(y.size(0), -1))


def test_layers_producers_and_consumers():
    graph = capture(CatNet(), torch.randn(2, 1, 8, 8))
    assert list(graph.layers) == ["stem", "blk.c1", "blk.c2", "a", "b", "fc"]
    assert list(graph.norms) == ["blk.b1", "blk.b2"]
    # the block's output stream is stem + blk.c2 (summed by the residual +)
    assert graph.producers("a") == (Slice("a", ("stem", "blk.c2"), 0, 4, 1),)
    # fc reads the 4x4-pooled cat: a's 3 channels x 16 positions, then b's 5 x 16 at offset 48
    assert graph.producers("fc") == (Slice("fc", ("a",), 0, 3, 16), Slice("fc", ("b",), 48, 5, 16))
    assert graph.producers("stem") == (Slice("stem", (INPUT,), 0, 1, 1),)
    assert graph.consumers("stem") == ("blk.c1", "a", "b")
    assert graph.consumers("blk.c2") == ("a", "b")
    assert graph.consumers("fc") == ()
    fc, stem = graph.layers["fc"], graph.layers["stem"]
    assert (fc.in_units, fc.out_units, fc.in_hw) == (128, 10, None)
    assert (stem.in_units, stem.out_units, stem.in_hw, stem.out_hw) == (1, 4, (8, 8), (8, 8))
    # unit 1 of b feeds fc inputs 48 + 16 .. 48 + 31
    assert graph.producers("fc")[1].indices(torch.tensor([1])).tolist() == list(range(64, 80))
    assert graph.module.nest_graph is graph


def test_groups_couple_the_residual_stream():
    graph = capture(CatNet(), torch.randn(2, 1, 8, 8))
    groups = graph.groups()
    assert [g.members for g in groups] == [("stem", "blk.c2"), ("blk.c1",), ("a",), ("b",), ("fc",)]
    assert [g.units for g in groups] == [4, 4, 3, 5, 10]
    assert [g.resizable for g in groups] == [True, True, True, True, False]  # fc is the output
    stream = groups[0]
    assert [s.reader for s in stream.norms] == ["blk.b2"]
    assert stream.consumers == ("blk.c1", "a", "b")
    assert [s.reader for s in groups[1].norms] == ["blk.b1"]
    assert groups[3].reads == (Slice("fc", ("b",), 48, 5, 16),)
    assert graph.group_of("blk.c2") == stream


class FunctionalNet(nn.Module):
    """The functional and method forms: F.relu, +=, torch.add, Tensor.add, cat on dim -3,
    F.max_pool2d, F.adaptive_avg_pool2d, reshape with x.shape[0], F.dropout, torch.flatten."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(2, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=2, dilation=2), \
            nn.Conv2d(6, 6, (1, 3), padding=(0, 1), bias=False)
        self.c4 = nn.Conv2d(12, 4, 1)
        self.fc1, self.fc2, self.bn = nn.Linear(16, 8), nn.Linear(8, 8), nn.BatchNorm1d(8)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        h = F.relu(self.c1(x))
        y = self.c2(h)
        y += h
        z = torch.add(self.c3(y).tanh(), y)
        u = torch.cat((z, y), dim=-3)
        u = F.max_pool2d(self.c4(u), 2)
        u = F.adaptive_avg_pool2d(u, 2)
        v = F.dropout(u.reshape(u.shape[0], -1), 0.1, self.training)
        v = F.gelu(self.bn(self.fc1(v)))
        v = torch.flatten(v, 1).add(torch.sigmoid(self.fc2(v)))
        return self.out(v)


def test_functional_forms():
    model = FunctionalNet()
    graph = capture(model, torch.randn(3, 2, 8, 8))
    groups = {g.members: g for g in graph.groups()}
    assert set(groups) == {("c1", "c2", "c3"), ("c4",), ("fc1", "fc2"), ("out",)}
    assert graph.producers("c4") == (Slice("c4", ("c1", "c2", "c3"), 0, 6, 1), Slice("c4", ("c1", "c2"), 6, 6, 1))
    assert graph.producers("fc1") == (Slice("fc1", ("c4",), 0, 4, 4),)  # 4 channels x 2x2 positions
    assert [s.reader for s in groups[("fc1", "fc2")].norms] == ["bn"]
    assert graph.layers["c2"].out_hw == (8, 8) and graph.layers["c4"].out_hw == (8, 8)
    x = torch.randn(3, 2, 8, 8)
    model.eval()
    graph.module.eval()  # F.dropout follows the traced module's own flag
    assert torch.equal(graph.module(x), model(x))
    graph.module.train()
    torch.manual_seed(0)
    dropped = graph.module(x)
    torch.manual_seed(0)
    assert torch.equal(dropped, model.train()(x))


def test_capture_leaves_the_model_alone():
    model = CatNet().train()
    model.blk.b1.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    capture(model, torch.randn(1, 1, 8, 8))  # batch 1: the shape pass must run in eval mode
    assert model.training and not model.blk.b1.training and model.blk.b2.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_stream_summed_with_the_input_is_fixed():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.fc3 = nn.Linear(5, 7), nn.Linear(7, 5), nn.Linear(5, 2)

        def forward(self, x):
            return self.fc3(x + self.fc2(torch.relu(self.fc1(x))))

    graph = capture(Net(), torch.randn(2, 5))
    assert [(g.members, g.resizable) for g in graph.groups()] == [(("fc1",), True), (("fc2",), False),
                                                                  (("fc3",), False)]


class Wrapper(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.inner = inner

    def forward(self, x):
        return self.inner(self.conv(x))


class Sort(nn.Module):
    def forward(self, x):
        return torch.sort(x, dim=1)[0]


class Times(nn.Module):
    def forward(self, x):
        return x * 2


class CatDim2(nn.Module):
    def forward(self, x):
        return torch.cat([x, x], dim=2)


class Branchy(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


class SharedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.c(self.c(x))


class PartialFlatten(nn.Module):
    def forward(self, x):
        return x.flatten(2)


class SeqLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(36, 4)

    def forward(self, x):
        return self.rnn(x.flatten(2))[0]


@pytest.mark.parametrize("inner, words", [
    (Sort(), ["unsupported operation torch.sort", "in module 'inner'"]),
    (Times(), ["unsupported operation operator.mul", "in module 'inner'"]),
    (CatDim2(), ["torch.cat along dim 2"]),
    (SeqLSTM(), ["unsupported operation nn.LSTM at module 'inner.rnn'"]),
    (PartialFlatten(), ["unsupported operation Tensor.flatten from shape (2, 4, 6, 6) to (2, 4, 36)"]),
    (nn.Conv2d(4, 4, 3, groups=2), ["unsupported operation nn.Conv2d with groups=2 at module 'inner'"]),
    (nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), ["padding_mode='reflect'"]),
    (nn.Conv1d(4, 4, 3), ["unsupported operation nn.Conv1d at module 'inner'"]),
    (SharedConv(), ["nn.Conv2d called a second time", "module 'inner.c'"]),
    (nn.Linear(6, 2), ["nn.Linear on a 4-d input"]),
    (Branchy(), ["torch.fx cannot trace module 'inner' (Branchy)", "control flow"]),
])
def test_refusals_are_one_sentence_naming_the_op(inner, words):
    with pytest.raises(NestError) as err:
        capture(Wrapper(inner), torch.randn(2, 1, 8, 8))
    message = str(err.value)
    assert one_sentence(message), message
    for w in words:
        assert w in message, message


def test_lstm_module_is_refused_by_name():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(8, 4)

        def forward(self, x):
            return self.rnn(x)

    with pytest.raises(NestError, match=r"^unsupported operation nn\.LSTM .*at module 'rnn'; nestsynth supports"):
        capture(Net(), torch.randn(3, 2, 8))


def test_example_that_does_not_fit_is_one_sentence():
    with pytest.raises(NestError) as err:
        capture(nn.Sequential(nn.Flatten(), nn.Linear(10, 2)), torch.randn(2, 1, 3, 3))
    assert one_sentence(str(err.value)) and "example input of shape (2, 1, 3, 3)" in str(err.value)


# ---- weight and FLOP counts (the nestsynth.metrics convention: 2 FLOPs per MAC) ----------------

def lenet_300_100() -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),
                         nn.Linear(100, 10))


def lenet_5() -> nn.Sequential:
    """Caffe's LeNet-5 (the paper's Table 2)."""
    return nn.Sequential(nn.Conv2d(1, 20, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(20, 50, 5), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(800, 500), nn.ReLU(), nn.Linear(500, 10))


def test_lenet_300_100_counts():
    graph = capture(lenet_300_100(), torch.randn(2, 1, 28, 28))
    # 784*300 + 300*100 + 100*10 = 235,200 + 30,000 + 1,000
    assert graph_weights(graph) == 266_200
    assert graph_flops(graph) == 2 * 266_200 == 532_400
    spec = get_model("lenet-300-100")
    assert (graph_weights(graph), graph_flops(graph)) == (reference_weights(spec), reference_flops(spec))
    assert graph.producers("1") == (Slice("1", (INPUT,), 0, 1, 784),)  # the flattened 1x28x28 input


def test_lenet_5_counts_and_masks_match_metrics():
    seq = lenet_5()
    graph = capture(seq, torch.randn(2, 1, 28, 28))
    rows = {r["name"]: r for r in layer_costs(graph)}
    # conv1: 1*20*5*5 = 500 weights x 24*24 outputs = 288,000 MACs
    # conv2: 20*50*5*5 = 25,000 weights x 8*8 outputs = 1,600,000 MACs
    # fc1: 50*4*4 = 800 inputs x 500 = 400,000; fc2: 500 x 10 = 5,000
    assert [(r["weights"], r["macs"]) for r in rows.values()] == [(500, 288_000), (25_000, 1_600_000),
                                                                  (400_000, 400_000), (5_000, 5_000)]
    assert graph_weights(graph) == 430_500
    assert graph_flops(graph) == 2 * 2_293_000 == 4_586_000
    spec = get_model("lenet-5")
    assert (graph_weights(graph), graph_flops(graph)) == (reference_weights(spec), reference_flops(spec))
    assert graph.producers("7") == (Slice("7", ("3",), 0, 50, 16),)
    # masks reduce the count exactly as nestsynth.metrics does for the SparseCNN with the same weights
    sparse = cnn_from_sequential(seq, (1, 28, 28))
    gen = torch.Generator().manual_seed(0)
    masks = {}
    for name, layer in zip(graph.layers, sparse.layers):
        layer.mask.copy_((torch.rand(layer.mask.shape, generator=gen) < 0.3).float())
        masks[name] = layer.mask.clone()
    sparse.zero_dormant()
    assert graph_flops(graph, masks) == int(totals(layer_table(sparse))["flops"]) < 4_586_000


def resnet20_hand_counts() -> tuple[int, int]:
    """(weights, MACs) of ResNet-20 with projection shortcuts on 32x32 inputs, layer by layer."""
    layers = [(3 * 16 * 9, 32 * 32)]                                 # stem 3x3, 3 -> 16
    layers += [(16 * 16 * 9, 32 * 32)] * 6                           # stage 1: 3 blocks x 2 convs 16 -> 16
    layers += [(16 * 32 * 9, 16 * 16), (32 * 32 * 9, 16 * 16)]       # stage 2 block 1 (stride 2)
    layers += [(16 * 32, 16 * 16)]                                   # its 1x1 projection 16 -> 32
    layers += [(32 * 32 * 9, 16 * 16)] * 4                           # stage 2 blocks 2, 3
    layers += [(32 * 64 * 9, 8 * 8), (64 * 64 * 9, 8 * 8)]           # stage 3 block 1 (stride 2)
    layers += [(32 * 64, 8 * 8)]                                     # its 1x1 projection 32 -> 64
    layers += [(64 * 64 * 9, 8 * 8)] * 4                             # stage 3 blocks 2, 3
    layers += [(64 * 10, 1)]                                         # classifier
    return sum(w for w, _ in layers), sum(w * p for w, p in layers)


def test_resnet20_counts():
    graph = capture(resnet20_cifar(), torch.randn(1, 3, 32, 32))
    weights, macs = resnet20_hand_counts()
    assert (weights, macs) == (270_896, 40_813_184)
    assert weights - (16 * 32 + 32 * 64) == 268_336  # without the 2,560 projection weights
    assert graph_weights(graph) == weights
    assert graph_flops(graph) == 2 * macs == 81_626_368
    assert len(graph.layers) == 22 and len(graph.norms) == 21


def test_resnet18_cifar_counts():
    graph = capture(resnet18_cifar(), torch.randn(1, 3, 32, 32))
    stem = (3 * 64 * 9, 32 * 32)
    stage1 = [(64 * 64 * 9, 32 * 32)] * 4                            # 2 blocks x 2 convs, 32x32
    stages = []
    for c_in, c, hw in ((64, 128, 16), (128, 256, 8), (256, 512, 4)):  # first conv strides 2
        stages += [(c_in * c * 9, hw * hw), (c_in * c, hw * hw)]       # conv 3x3 and 1x1 projection
        stages += [(c * c * 9, hw * hw)] * 3                           # the other three 3x3 convs
    layers = [stem, *stage1, *stages, (512 * 10, 1)]
    weights, macs = sum(w for w, _ in layers), sum(w * p for w, p in layers)
    assert (weights, macs) == (11_164_352, 555_422_720)
    assert graph_weights(graph) == weights
    assert graph_flops(graph) == 2 * macs == 1_110_845_440
    assert len(graph.layers) == 21


def test_resnet20_groups_are_the_stage_streams():
    graph = capture(resnet20_cifar(), torch.randn(1, 3, 32, 32))
    groups = graph.groups()
    streams = [g for g in groups if len(g.members) > 1]
    assert [g.members for g in streams] == [
        ("conv1", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2"),
        ("layer2.0.conv2", "layer2.0.shortcut.0", "layer2.1.conv2", "layer2.2.conv2"),
        ("layer3.0.conv2", "layer3.0.shortcut.0", "layer3.1.conv2", "layer3.2.conv2")]
    assert [g.units for g in streams] == [16, 32, 64]
    assert [s.reader for s in streams[0].norms] == ["bn1", "layer1.0.bn2", "layer1.1.bn2", "layer1.2.bn2"]
    assert [s.reader for s in streams[1].norms] == ["layer2.0.bn2", "layer2.0.shortcut.1", "layer2.1.bn2",
                                                    "layer2.2.bn2"]
    assert streams[0].consumers == ("layer1.0.conv1", "layer1.1.conv1", "layer1.2.conv1", "layer2.0.conv1",
                                    "layer2.0.shortcut.0")
    assert streams[2].consumers == ("layer3.1.conv1", "layer3.2.conv1", "fc")
    assert streams[2].reads[-1] == Slice("fc", ("layer3.0.conv2", "layer3.0.shortcut.0", "layer3.1.conv2",
                                                "layer3.2.conv2"), 0, 64, 1)  # pooled to 1x1
    singles = [g for g in groups if len(g.members) == 1]
    assert [g.members[0] for g in singles] == [f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in (0, 1, 2)] + ["fc"]
    assert all(g.resizable for g in groups[:-1]) and not groups[-1].resizable
    assert len(groups) == 13
    assert graph.consumers("layer1.0.conv2") == ("layer1.1.conv1", "layer1.2.conv1", "layer2.0.conv1",
                                                 "layer2.0.shortcut.0")
