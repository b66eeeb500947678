"""Batch-norm folding in the export of graph networks (compact_graph.fold_batch_norms).

A batch norm that reads a plain layer's output, and nothing else reads that output, is
folded into the layer and leaves the exported module; every other batch norm stays.
Oracles: the masked model's outputs in eval mode (after a few training steps in train
mode, so the running statistics are the network's own, on top of random affine weights
and statistics), and the batch norms counted by hand for each model.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nestsynth.export.compact_graph import CompactGraph, compact_graph_from_sparse
from nestsynth.export.formats import load_artifact
from nestsynth.export.pipeline import export_run, format_export
from nestsynth.graph import SparseGraph
from nestsynth.graph.models import TinyResidualCNN
from nestsynth.report.run_files import save_model

from nest_helpers import randomize_masks
from test_graph_network import Mixed
from test_graph_surgery import randomize_norms


class SharedOutput(nn.Module):
    """(1, 8, 8): a conv whose output is read by its batch norm *and* by a residual ``+``
    (not foldable), then a Linear layer with its own BatchNorm1d (foldable) and the classifier."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.fc, self.fc_bn = nn.Linear(4 * 16, 12), nn.BatchNorm1d(12)
        self.out = nn.Linear(12, 10)

    def forward(self, x):
        u = self.conv(x)
        x = F.max_pool2d(F.relu(self.bn(u)) + u, 2).flatten(1)
        return self.out(F.relu(self.fc_bn(self.fc(x))))


def _norms(module: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def _trained(make, shape, digits, seed: int = 0) -> SparseGraph:
    """The masked network of ``make()`` with random masks (density 0.6), random batch-norm
    statistics and affine weights, then 5 Adam steps in train mode on the digits (random
    inputs and labels for another input shape): the running statistics move towards the
    batches'; eval mode."""
    torch.manual_seed(seed)
    model = SparseGraph.from_module(make(), shape)
    randomize_masks(model, torch.Generator().manual_seed(seed), 0.6)
    randomize_norms(model.net, seed)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    if tuple(shape) == (1, 8, 8):
        X, y = digits.train.X[:320], digits.train.y[:320]
    else:  # random inputs and labels of the model's shape
        g = torch.Generator().manual_seed(seed)
        X, y = torch.rand(320, *shape, generator=g), torch.randint(0, model.widths[-1], (320,), generator=g)
    for start in range(0, 320, 64):
        opt.zero_grad()
        F.cross_entropy(model(X[start:start + 64]), y[start:start + 64]).backward()
        opt.step()
        model.zero_dormant()
    return model.eval()


# model, input shape, batch norms in the source, (folded, kept) by hand
CASES = {
    # stem->bn, block.conv1->block.bn1, block.conv2->block.bn2 (before the residual +), fc->fc_bn: all own
    "tiny-residual-cnn": (TinyResidualCNN, (1, 8, 8), 4, (["bn", "block.bn1", "block.bn2", "fc_bn"], [])),
    # bn0 reads stem alone; bn_cat a concatenation, bn_sum a residual sum, bn_flat a flatten: kept
    "mixed": (Mixed, (2, 6, 6), 4, (["bn0"], ["bn_cat", "bn_sum", "bn_flat"])),
    # conv's output is also read by the residual +: bn kept; fc_bn folded
    "shared-output": (SharedOutput, (1, 8, 8), 2, (["fc_bn"], ["bn"])),
}


@pytest.mark.parametrize("case", list(CASES))
def test_folded_export_equals_the_masked_model(digits, case):
    make, shape, n_norms, (folded, kept) = CASES[case]
    model = _trained(make, shape, digits)
    assert _norms(model.net) == n_norms
    stats = [bn.running_mean.clone() for bn in model.norms]
    compact, info = compact_graph_from_sparse(model)
    assert list(info["batch_norm"]["folded"]) == folded and info["batch_norm"]["kept"] == kept
    assert _norms(compact) == n_norms - len(folded) and _norms(compact) < n_norms
    assert _norms(model.net) == n_norms  # the masked model is not changed
    assert all(torch.equal(a, bn.running_mean) for a, bn in zip(stats, model.norms))
    x = torch.randn(200, *shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(compact(x), model(x), rtol=0, atol=1e-5)
        for bn, layer in info["batch_norm"]["folded"].items():
            assert bn not in dict(compact.net.named_modules()) and layer in dict(compact.net.named_modules())
    again = CompactGraph.from_state(compact.arch(), compact.tensors())  # the description has no folded norm
    with torch.no_grad():
        assert torch.equal(again(x), compact(x))
    assert _norms(again) == n_norms - len(folded)


def test_the_folded_weights_are_the_hand_formula():
    """One Linear + BatchNorm1d (the fold of the module docstring, computed here in float64)."""
    net = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2), nn.ReLU(), nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    model = SparseGraph.from_module(net, (3,))
    randomize_norms(model.net, 3)
    model.eval()
    layer, bn = model.layers[0], model.norms[0]
    w, b = layer.weight.detach().double(), layer.bias.detach().double()
    s = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
    compact, info = compact_graph_from_sparse(model)
    assert info["batch_norm"] == {"folded": {"1": "0"}, "kept": []}
    got = compact.net.get_submodule("0")
    torch.testing.assert_close(got.weight.detach().double(), w * s[:, None], rtol=0, atol=1e-7)
    torch.testing.assert_close(got.bias.detach().double(), (b - bn.running_mean.double()) * s
                               + bn.bias.detach().double(), rtol=0, atol=1e-7)


@pytest.mark.parametrize("fmt", ["pytorch", "onnx"])
def test_export_run_folds_and_reports_it(digits, tmp_path, fmt):
    model = _trained(TinyResidualCNN, (1, 8, 8), digits, seed=2)
    save_model(model, tmp_path / "model.pt", "custom", [1, 8, 8])
    result = export_run(tmp_path / "model.pt", fmt, check="random")
    assert result["check_passed"] and result["max_abs_diff"] < 1e-5
    assert len(result["batch_norm"]["folded"]) == 4 and result["batch_norm"]["kept"] == []
    assert "batch norm folded into the layer before it: bn, block.bn1, block.bn2, fc_bn" in format_export(result)
    if fmt == "onnx":
        assert result["max_abs_diff_onnx_vs_masked"] < 1e-5
        return
    artifact = load_artifact(result["artifact"])
    assert _norms(artifact) == 0
    with torch.no_grad():
        torch.testing.assert_close(artifact(digits.test.X), model(digits.test.X), rtol=0, atol=1e-5)
