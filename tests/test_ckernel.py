"""nestsynth.export.ckernel: generated C for compact layers against dense PyTorch oracles; the fallback."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from nestsynth.export import CompactMLP
from nestsynth.export.choose import choose_storage
from nestsynth.export.ckernel import CC_ENV, CACHE_ENV, CKernel, KernelUnavailable, build, find_compiler
from nestsynth.export.compact_base import CompactLinear
from nestsynth.export.compact_cnn import CompactCNN, CompactConv2d

try:
    find_compiler()
    HAVE_CC = True
except KernelUnavailable:
    HAVE_CC = False
needs_cc = pytest.mark.skipif(not HAVE_CC, reason="no C compiler")
BATCHES = (1, 5, 32, 70)  # one sample, a partial tile, one full tile, full tiles and a remainder


@pytest.fixture(autouse=True)
def kernel_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path_factory.getbasetemp() / "kernels"))


def patterned_weight(g: torch.Generator) -> torch.Tensor:
    """(9, 12): an empty row, a row with one non-zero, a fully dense row, random rows; an unread column."""
    w = torch.randn(9, 12, generator=g) * (torch.rand(9, 12, generator=g) < 0.3)
    w[0] = 0
    w[1] = 0
    w[1, 7] = 1.5
    w[2] = torch.randn(12, generator=g)
    w[:, 11] = 0
    return w


@needs_cc
@pytest.mark.parametrize("activation", ["relu", None, "leaky_relu:0.1"])
def test_linear_kernel_equals_dense_masked_layer(activation):
    g = torch.Generator().manual_seed(0)
    w, b = patterned_weight(g), torch.randn(9, generator=g)
    kernel = CKernel([CompactLinear(w, b, "ckernel", activation)], (12,))
    for n in BATCHES:
        x = torch.randn(n, 12, generator=g)
        want = F.linear(x, w, b)
        want = {"relu": F.relu, None: lambda t: t, "leaky_relu:0.1": lambda t: F.leaky_relu(t, 0.1)}[activation](want)
        assert (kernel(x) - want).abs().max() < 1e-5


@needs_cc
def test_fully_dense_and_all_zero_layers_chain_with_a_gather():
    g = torch.Generator().manual_seed(1)
    dense = CompactLinear(torch.randn(6, 5, generator=g), torch.randn(6, generator=g), "ckernel", "relu")
    empty = CompactLinear(torch.zeros(3, 6), torch.tensor([0.5, -1.0, 2.0]), "ckernel", None)
    model = CompactMLP([dense, empty], None, torch.tensor([0, 2, 3, 7, 9]), 10)
    for n in BATCHES:
        x = torch.randn(n, 10, generator=g)
        assert torch.equal(model(x), torch.tensor([[0.5, -1.0, 2.0]]).expand(n, 3))
    first = CompactMLP([CompactLinear(dense.dense_weight(), dense.bias, "ckernel", "relu")], None,
                       torch.tensor([0, 2, 3, 7, 9]), 10)
    x = torch.randn(40, 10, generator=g)
    assert model.kernel_status is None and len(first.segments()) == 1
    assert (first(x) - F.relu(F.linear(x[:, [0, 2, 3, 7, 9]], dense.dense_weight(), dense.bias))).abs().max() < 1e-5


def _cnn(storage: str, g: torch.Generator) -> CompactCNN:
    """3x9x9 -> conv 3->4 k3 pad1 stride2 (area, offset) -> max 2 -> conv 4->5 k2 pad1 -> avg 2 -> fc 20 -> 3."""
    choice = {"storage": storage}
    w1 = torch.randn(4, 3, 3, 3, generator=g) * (torch.rand(4, 3, 3, 3, generator=g) < 0.5)
    w1[1] = 0                                                       # an empty kernel
    area = (torch.rand(4, 5, 5, generator=g) < 0.7).float()
    c1 = CompactConv2d(w1, torch.randn(4, generator=g), 2, 1, (5, 5), area, torch.randn(4, 5, 5, generator=g),
                       "relu", "max:2:2", choice)
    w2 = torch.randn(5, 4, 2, 2, generator=g) * (torch.rand(5, 4, 2, 2, generator=g) < 0.6)
    c2 = CompactConv2d(w2, torch.randn(5, generator=g), 1, 1, (3, 3), None, None, "relu", "avg:2:1", choice)
    fc1 = CompactLinear(torch.randn(6, 20, generator=g) * (torch.rand(6, 20, generator=g) < 0.4),
                        torch.randn(6, generator=g), storage if storage != "dense" else "dense", "relu", choice)
    fc2 = CompactLinear(torch.randn(3, 6, generator=g), torch.randn(3, generator=g), storage, None, choice)
    return CompactCNN([c1, c2, fc1, fc2], [3, 9, 9]).eval()


@needs_cc
def test_conv_kernel_with_area_offset_padding_stride_and_pools_equals_pytorch():
    g = torch.Generator().manual_seed(2)
    in_c = _cnn("ckernel", g)
    dense = in_c.densified()                                       # nn.Conv2d and dense matrices: the oracle
    assert [seg[2] is not None for seg in in_c.segments()] == [True] and in_c.kernel_status is None
    for n in BATCHES:
        x = torch.randn(n, 3, 9, 9, generator=g)
        with torch.inference_mode():
            assert (in_c(x) - dense(x)).abs().max() < 1e-5
    assert in_c.executed_flops() == in_c.nonzero_flops() < dense.executed_flops()


@needs_cc
def test_a_kernel_run_after_pytorch_layers_and_the_compile_cache():
    g = torch.Generator().manual_seed(3)
    model = _cnn("ckernel", g)
    model.layers[0] = model.layers[0].as_dense()                   # conv1 in PyTorch, then a C run
    model.reset_kernels()
    assert [(s, e, k is not None) for s, e, k in model.segments()] == [(0, 1, False), (1, 4, True)]
    x = torch.randn(33, 3, 9, 9, generator=g)
    with torch.inference_mode():
        assert (model(x) - model.densified()(x)).abs().max() < 1e-5
    source = model.segments()[1][2].source
    assert build(source)[0] == model.segments()[1][2].path         # the same source is not compiled twice



@needs_cc
@pytest.mark.skipif(not hasattr(os, "getuid"), reason="no POSIX ownership")
def test_a_cached_library_others_could_write_is_not_loaded(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "private"))
    source = "int nest_probe(void) { return 7; }\n"
    path, _ = build(source)
    assert (tmp_path / "private").stat().st_mode & 0o777 == 0o700
    assert build(source)[0] == path                                # cached, trusted
    path.chmod(0o666)                                              # anyone could have replaced it
    with pytest.raises(KernelUnavailable, match="writable by others"):
        build(source)

def test_missing_compiler_falls_back_with_a_recorded_reason(monkeypatch):
    monkeypatch.setenv(CC_ENV, "/nonexistent/cc")
    g = torch.Generator().manual_seed(4)
    w, b = patterned_weight(g), torch.randn(9, generator=g)
    choice = choose_storage(w, b, batch_size=4, mode="auto", repeats=3, activation="relu")
    assert choice["storage"] in ("dense", "csr") and "ckernel_ms" not in choice
    assert "no C kernel: no C compiler: '/nonexistent/cc' not found" in choice["reason"]
    model = CompactMLP([CompactLinear(w, b, "ckernel", "relu")], None, None, 12)
    x = torch.randn(7, 12, generator=g)
    with pytest.warns(RuntimeWarning, match="no C compiler"):
        y = model(x)
    assert "layers 0-0 run in PyTorch" in model.kernel_status
    assert (y - F.relu(F.linear(x, w, b))).abs().max() < 1e-5


def test_failed_compilation_and_unsupported_activation_are_one_line_reasons(monkeypatch, tmp_path):
    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\necho 'cc: error: simulated failure' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv(CC_ENV, str(fake))
    with pytest.raises(KernelUnavailable, match="simulated failure") as info:
        CKernel([CompactLinear(torch.eye(3), torch.zeros(3), "ckernel", "relu")], (3,))
    assert "\n" not in str(info.value)
    with pytest.raises(KernelUnavailable, match="'tanh' has no C form"):
        CKernel([CompactLinear(torch.eye(3), torch.zeros(3), "ckernel", "tanh")], (3,))
