"""nestsynth.graph capture: layouts, producers/consumers, coupled groups and refusals."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nestsynth.errors import NestError
from nestsynth.graph import INPUT, Slice, capture


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
