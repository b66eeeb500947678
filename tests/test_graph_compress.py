"""Deep Compression (nestsynth compress) and bench-infer on graph runs (SparseGraph).

Oracles: the storage count of a chain expressed as a graph equals the chain path's
count layer by layer (same masks and weights); a residual graph with a batch norm of
a sum counted by hand; on a digits graph run, at most 2**bits distinct non-zero values
per layer, the dense bytes computed from the layers' shapes by hand and the reported
error equal to the shared model's error measured again.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nestsynth.api import resolve_reference
from nestsynth.baselines.runner import run_method
from nestsynth.compress import CentroidModel, apply_sharing, compress_run, share_weights, storage_report
from nestsynth.errors import NestError
from nestsynth.export.pipeline import (Source, bench_inference, export_run, format_inference_table,
                                       reference_graph)
from nestsynth.graph import SparseGraph
from nestsynth.report.summary import load_model
from nestsynth.sparse import set_mask
from nestsynth.training import evaluate

from cli_helpers import call, one_error_line
from nest_helpers import sparse_model
from test_graph_methods import UserResMLP, UserResNet, _cfg


def _chain_as_graph(mlp) -> SparseGraph:
    """The SparseMLP ``mlp`` (6-5-4, batch norm) as a captured nn.Sequential, same weights and masks."""
    net = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 4))
    graph = SparseGraph.from_module(net, (6,))
    with torch.no_grad():
        for g, c in zip(graph.layers, mlp.layers):
            g.weight.copy_(c.weight)
            g.bias.copy_(c.bias)
            set_mask(g, c.mask.clone())
        graph.norms[0].load_state_dict(mlp.norms[0].state_dict())
    return graph.eval()


def test_storage_of_a_chain_as_a_graph_equals_the_chain_count():
    mlp = sparse_model((6, 5, 4), density=0.5, seed=7, batch_norm=True).eval()
    graph = _chain_as_graph(mlp)
    x = torch.randn(20, 6)
    with torch.no_grad():
        torch.testing.assert_close(graph(x), mlp(x))  # the same function
    for bits in (1, 2):
        chain = storage_report(mlp, share_weights(mlp, bits=bits), index_bits=2)
        as_graph = storage_report(graph, share_weights(graph, bits=bits), index_bits=2)
        assert [layer["name"] for layer in as_graph["layers"]] == ["0", "3"]  # the module paths
        for a, b in zip(chain["layers"], as_graph["layers"]):
            assert {k: v for k, v in a.items() if k != "name"} == {k: v for k, v in b.items() if k != "name"}
        assert chain["bytes"] == as_graph["bytes"] and chain["ratio"] == as_graph["ratio"]
    # and the chain's own hand count (tests/test_compress.py): dense = 32-bit weights, bias, BN scale
    assert [layer["bytes"]["dense"] for layer in as_graph["layers"]] == [4 * (30 + 2 * 5), 4 * (20 + 4)]


class SumNorm(nn.Module):
    """4 -> two Linear layers a, b (3 each) summed and batch-normalized -> relu -> out (2)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.bn, self.out = nn.Linear(4, 3), nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2)

    def forward(self, x):
        return self.out(F.relu(self.bn(self.a(x) + self.b(x))))


def test_storage_of_a_residual_graph_by_hand():
    model = SparseGraph.from_module(SumNorm(), (4,)).eval()
    with torch.no_grad():
        model.layers[2].weight.copy_(torch.tensor([[1.0, -1.0, 1.0], [-1.0, 1.0, 1.0]]))
    rep = storage_report(model, share_weights(model, bits=1), index_bits=5)
    a, b, out = rep["layers"]
    assert [a["name"], b["name"], out["name"]] == ["a", "b", "out"]
    # a and b feed the batch norm of their sum: 12 weights + 3 biases + 3 scales at 32 bits = 576 bits
    assert a["bytes"]["dense"] == b["bytes"]["dense"] == 72
    # out: 6 weights, 2 biases: dense 8 * 32 = 256 bits -> 32 bytes.  Shared (1 bit, 2 values, no
    # gaps): 6 entries * (1 + 5) + codebook 64 + biases 64 = 164 bits -> 21 bytes.  Huffman: indices
    # [1, 0, 1, 0, 1, 1] at 1 bit = 6, gaps all 0 at 1 bit = 6, tables (8 + 2 * 1) + (8 + 32 * 1) = 50,
    # codebook 64, biases 64: 190 bits -> 24 bytes
    assert out["bytes"]["dense"] == 32 and out["bytes"]["shared"] == 21 and out["bytes"]["huffman"] == 24
    assert out["huffman_bits"] == {"weights": 6, "gaps": 6, "codebook": 64, "tables": 50, "biases": 64}
    assert rep["bytes"]["dense"] == 72 + 72 + 32


def test_centroid_model_of_a_graph_trains_the_graph_weights():
    torch.manual_seed(0)
    model = SparseGraph.from_module(UserResNet(), (1, 8, 8)).eval()
    shared = share_weights(model, bits=2)
    apply_sharing(model, shared)
    net = CentroidModel(model, shared)
    assert net.weight_names[0] == "net.stem.weight"
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    with torch.no_grad():
        torch.testing.assert_close(net(x), model(x), rtol=0, atol=1e-6)
    F.cross_entropy(net(x), y).backward()
    assert all(c.grad is not None and bool(c.grad.ne(0).any()) for c in net.centroids)


@pytest.fixture(scope="module")
def graph_run(tmp_path_factory, digits):
    """A finished one-shot run of the user residual MLP on digits (a graph run, seconds)."""
    run = tmp_path_factory.mktemp("graph_compress") / "run"
    run_method(_cfg("oneshot"), digits, resolve_reference(UserResMLP(), digits), run)
    return run


def test_compress_a_graph_run(graph_run, digits):
    report = json.loads((graph_run / "report.json").read_text())
    result = compress_run(graph_run, bits=2, finetune_epochs=1)
    masked = load_model(graph_run / "model.pt")
    assert isinstance(masked, SparseGraph)
    assert [layer["name"] for layer in result["layers"]] == masked.layer_names == ["fc_in", "fc1", "fc2", "out"]
    assert result["error"]["test_before"] == report["test_error"]
    assert result["error"]["test_after"] is not None
    shared = load_model(graph_run / "model_shared.pt").eval()
    assert isinstance(shared, SparseGraph)
    assert evaluate(shared, digits.test.X, digits.test.y)[0] == result["error"]["test_after"]
    for layer, info in zip(shared.layers, result["layers"]):
        w = (layer.weight * layer.mask).detach()
        assert len(torch.unique(w[w != 0])) <= info["clusters"] <= 4
    # dense bytes by hand from the layers: 32-bit weights and biases, plus fc1's batch-norm scale
    assert result["bytes"]["dense"] == 4 * ((64 * 24 + 24) + (24 * 24 + 2 * 24) + (24 * 24 + 24) + (24 * 10 + 10))
    for form, total in result["bytes"].items():
        assert total == sum(layer["bytes"][form] for layer in result["layers"])
    assert sum(layer["active"] for layer in result["layers"]) == report["weights"]["final"]
    assert "conv_bits" not in result  # no conv layer


def test_cli_compress_a_graph_run(graph_run):
    rc, out, err = call(["compress", graph_run, "--bits", "2", "--finetune-epochs", "0"])
    assert rc == 0, err
    assert "fc_in" in out and "2-bit weight sharing: test error" in out
    rc, out, err = call(["compress", graph_run, "--bits", "2", "--finetune-epochs", "0", "--json"])
    assert rc == 0 and json.loads(out)["clusters_max"] == 4
    rc, _, err = call(["compress", graph_run, "--bits", "0"])
    assert rc == 2 and "bits = 0 is out of range" in one_error_line(err)


def test_bench_infer_a_graph_export(graph_run):
    artifact = export_run(graph_run, "pytorch")["artifact"]
    result = bench_inference(artifact, batch_sizes=(1, 8), repeats=3, warmup=1)
    chain_keys = {"artifact", "run", "input_shape", "batch_sizes", "threads", "repeats", "warmup", "flops",
                  "storage", "onnx", "ckernel", "variants", "file_bytes", "deep_compression", "environment",
                  "output_file"}
    assert chain_keys <= set(result)
    names = [row["name"] for row in result["variants"]]
    assert names[:3] == ["dense reference", "masked", "compact (PyTorch)"]
    report = json.loads((graph_run / "report.json").read_text())
    ref, masked, compact = result["variants"][:3]
    assert ref["widths"] == report["dense_reference"]["widths"]
    assert result["flops"]["dense_reference"] == report["dense_reference"]["flops"]
    assert compact["max_abs_diff_vs_masked"] < 1e-5 and masked["max_abs_diff_vs_masked"] == 0.0
    # the C kernel and CSR are for chains: said, not timed
    assert "sequential CNN exports only" in result["ckernel"] and "compact dense PyTorch" in result["ckernel"]
    assert [row["name"] for row in result["storage"]] == ["fc_in", "fc1", "fc2", "out"]
    for row in result["variants"]:
        assert set(row["latency"]) == {"1", "8"} and all(v["median_ms"] > 0 for v in row["latency"].values())
    text = format_inference_table(result)
    assert "compact (PyTorch)" in text and "C kernel:" in text
    rc, out, err = call(["bench-infer", artifact, "--batch-sizes", "1", "--repeats", "3", "--warmup", "1"])
    assert rc == 0 and "dense reference" in out, err


def test_the_dense_reference_of_a_graph_run_has_the_reference_widths(tmp_path):
    """A final model narrower than its reference (as after NeST's seed and pruning): the
    reference graph gets the reference widths back, full masks and the dense weight count."""
    torch.manual_seed(0)
    full = SparseGraph.from_module(UserResNet(), (1, 8, 8)).eval()
    narrow = SparseGraph.from_module(UserResNet(), (1, 8, 8)).eval()
    for name, keep in (("stem", 4), ("side", 3), ("fc", 15)):  # the residual stream, side, fc
        group = narrow.graph.group_of(name)
        narrow.remove_units(group, torch.arange(group.units) < keep)
    assert narrow.widths == [1, 4, 6, 4, 3, 15, 10]
    src = Source(narrow, tmp_path / "model.pt", None, report={"dense_reference": {"widths": full.widths}})
    ref = reference_graph(src)
    assert ref.widths == full.widths == [1, 6, 6, 6, 4, 20, 10]
    assert ref.dense_weights() == ref.active_weights() == 4_126  # UserResNet's dense count
    assert narrow.widths == [1, 4, 6, 4, 3, 15, 10]  # the final model is not changed
    src.report["dense_reference"]["widths"] = [1, 6, 6]
    with pytest.raises(NestError, match="do not fit the layout of its final model"):
        reference_graph(src)
