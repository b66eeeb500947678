"""Deep Compression stages 2-3: Huffman coding, k-means sharing, centroid retraining, storage, compress_run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from nest_helpers import sparse_model
from nestsynth.compress import (CentroidModel, HuffmanCode, apply_sharing, build_code, compress_run, entropy_bits,
                                finetune_centroids, huffman_lengths, kmeans_1d, relative_entries, share_weights,
                                storage_report)
from nestsynth.compress.sharing import assign
from nestsynth.errors import NestError
from nestsynth.sparse import SparseMLP

# ----------------------------------------------------------------------------- Huffman


def _random_sequences():
    g = torch.Generator().manual_seed(0)
    for alphabet, n in ((2, 50), (5, 300), (17, 1000), (64, 2000)):
        probs = torch.rand(alphabet, generator=g) ** 3 + 1e-3  # skewed distributions
        yield torch.multinomial(probs, n, replacement=True, generator=g).tolist()


def test_huffman_round_trip_random_sequences():
    for seq in _random_sequences():
        code = build_code(seq)
        data = code.encode(seq)
        assert len(data) == math.ceil(code.size_bits(seq) / 8)
        assert code.decode(data, len(seq)) == seq


def test_huffman_size_within_one_bit_of_entropy():
    for seq in _random_sequences():
        avg = build_code(seq).size_bits(seq) / len(seq)
        h = entropy_bits(seq)
        assert h - 1e-9 <= avg < h + 1


def test_huffman_hand_example():
    # frequencies 5, 2, 1, 1: merge 1+1, then 2+2, then 4+5 -> lengths 1, 2, 3, 3; 5+4+3+3 = 15 bits
    seq = [0] * 5 + [1] * 2 + [2, 3]
    code = build_code(seq)
    assert code.lengths == {0: 1, 1: 2, 2: 3, 3: 3}
    assert code.size_bits(seq) == 15
    assert code.codes() == {0: (0b0, 1), 1: (0b10, 2), 2: (0b110, 3), 3: (0b111, 3)}  # canonical
    assert code.encode([0, 1, 2, 3]) == bytes([0b01011011, 0b10000000])  # 0 10 110 111, zero-padded
    assert code.table_bits(4) == 8 + 4 * 2  # header + 4 lengths of bit_length(3) = 2 bits


def test_huffman_single_symbol_empty_and_bad_data():
    code = build_code([7] * 5)
    assert code.lengths == {7: 1} and code.size_bits([7] * 5) == 5
    assert code.decode(code.encode([7] * 5), 5) == [7] * 5
    empty = build_code([])
    assert empty.encode([]) == b"" and empty.decode(b"", 0) == [] and empty.table_bits(4) == 0
    with pytest.raises(ValueError):
        HuffmanCode(huffman_lengths({0: 5, 1: 2, 2: 1, 3: 1})).decode(b"\x00", 9)  # 8 bits, 9 symbols


# ----------------------------------------------------------------------------- k-means


def test_kmeans_hand_solution():
    # k=3, linear init 0, 10, 20; boundaries 5, 15 -> {0,1,5} {6,7} {20} (5 ties low) -> 2, 6.5, 20;
    # boundaries 4.25, 13.25 -> {0,1} {5,6,7} {20} -> 0.5, 6, 20; stable.
    c, idx, it = kmeans_1d(torch.tensor([0.0, 1, 5, 6, 7, 20]), 3)
    assert c.tolist() == [0.5, 6.0, 20.0] and idx.tolist() == [0, 0, 1, 1, 1, 2] and it == 2
    c, idx, _ = kmeans_1d(torch.tensor([0.0, 1, 2, 10, 11, 12]), 2)
    assert c.tolist() == [1.0, 11.0] and idx.tolist() == [0, 0, 0, 1, 1, 1]


def test_kmeans_is_a_lloyd_fixed_point():
    x = torch.randn(3000, generator=torch.Generator().manual_seed(1)).double() ** 3
    c, idx, it = kmeans_1d(x, 16, max_iter=1000)
    assert it < 1000 and len(c) <= 16 and bool((c[1:] > c[:-1]).all())
    for j in range(len(c)):  # every centroid is the mean of its cluster (no empty cluster kept)
        assert torch.allclose(x[idx == j].mean(), c[j], rtol=0, atol=1e-12)
    nearest = (x[:, None] - c[None, :]).abs().min(1).values  # every value sits at a nearest centroid
    assert torch.allclose((x - c[idx]).abs(), nearest, rtol=0, atol=1e-12)


def test_kmeans_few_distinct_values_are_kept_exactly():
    x = torch.tensor([0.5, -0.25, 0.5, 3.0, -0.25])
    c, idx, _ = kmeans_1d(x, 8)
    assert c.tolist() == [-0.25, 0.5, 3.0] and torch.equal(c[idx].float(), x)
    assert assign(torch.tensor([1.75, 1.76]), c).tolist() == [1, 2]  # midpoint ties go to the lower centroid


def test_share_weights_keeps_masks_zeros_and_cluster_count():
    model = sparse_model((20, 15, 10, 5), density=0.6, seed=3)
    with torch.no_grad():
        active = torch.nonzero(model.layers[0].mask)[0]
        model.layers[0].weight[active[0], active[1]] = 0.0  # switched on but zero: not clustered
    before = [layer.weight.detach().clone() for layer in model.layers]
    masks = [layer.mask.clone() for layer in model.layers]
    shared = share_weights(model, bits=2)
    apply_sharing(model, shared)
    for layer, w0, m0, s in zip(model.layers, before, masks, shared):
        w = layer.weight.detach()
        assert torch.equal(layer.mask, m0)
        assert torch.equal(w == 0, w0 == 0)  # same zero pattern: dormant and zero weights stay exactly zero
        assert len(torch.unique(w[w != 0])) <= 4 and len(s.centroids) <= 4
        # each weight took the centroid nearest to its original value
        vals = w0.flatten()[s.positions].double()
        err = (vals - s.centroids.double()[s.index]).abs()
        assert torch.allclose(err, (vals[:, None] - s.centroids.double()[None]).abs().min(1).values, atol=1e-6)


# ----------------------------------------------------------------------------- centroid retraining


def test_centroid_gradient_is_the_sum_of_its_weight_gradients():
    model = sparse_model((8, 6, 4), density=0.7, seed=4)
    shared = share_weights(model, bits=2)
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(32, 8, generator=g), torch.randint(0, 4, (32,), generator=g)
    net = CentroidModel(model, shared)
    F.cross_entropy(net(X), y).backward()
    assert all(p.grad is None for p in model.parameters())  # only the centroids get gradients
    # oracle: the plain weights C[I] as leaves, their autograd gradients summed per cluster
    leaves = {f"layers.{i}.weight": s.weight().clone().requires_grad_(True) for i, s in enumerate(shared)}
    F.cross_entropy(functional_call(model, leaves, (X,)), y).backward()
    for i, (c, s) in enumerate(zip(net.centroids, shared)):
        gw = leaves[f"layers.{i}.weight"].grad.flatten()[s.positions]
        expect = torch.zeros(len(s.centroids)).index_add_(0, s.index, gw)
        assert torch.allclose(c.grad, expect, atol=1e-6)


def test_finetune_trains_only_centroids_and_lowers_the_loss():
    model = sparse_model((10, 8, 3), density=0.6, seed=5)
    g = torch.Generator().manual_seed(2)
    X = torch.randn(256, 10, generator=g)
    y = (X[:, 0] > 0).long() + (X[:, 1] > 0).long()
    shared = share_weights(model, bits=3)
    apply_sharing(model, shared)
    masks, biases = [m.mask.clone() for m in model.layers], [m.bias.detach().clone() for m in model.layers]
    index = [s.index.clone() for s in shared]
    loss0 = F.cross_entropy(model(X), y).item()
    finetune_centroids(model, shared, X, y, epochs=5, lr=0.02, batch_size=32, generator=g)
    assert F.cross_entropy(model(X), y).item() < loss0 - 0.05
    for layer, s, m, b, i in zip(model.layers, shared, masks, biases, index):
        assert torch.equal(layer.mask, m) and torch.equal(layer.bias.detach(), b) and torch.equal(s.index, i)
        assert torch.equal(layer.weight.detach(), s.weight())  # W = C[I] exactly, zero elsewhere


# ----------------------------------------------------------------------------- storage


def _tiny_model():
    """One 3x4 layer with weights -1 at flat positions 0, 6 and 2 at 5, 11."""
    model = SparseMLP([4, 3])
    with torch.no_grad():
        model.layers[0].mask.zero_()
        model.layers[0].weight.zero_()
        for pos, v in ((0, -1.0), (5, 2.0), (6, -1.0), (11, 2.0)):
            model.layers[0].mask.view(-1)[pos] = 1
            model.layers[0].weight.view(-1)[pos] = v
    return model


def test_relative_entries_hand_cases():
    # 2-bit gaps (runs of at most 3 zeros): a run of 4 needs one filler
    assert relative_entries(torch.tensor([0, 5, 6, 11]), 2) == ([0, 3, 0, 0, 3, 0],
                                                                 [False, True, False, False, True, False])
    assert relative_entries(torch.tensor([3]), 2) == ([3], [False])
    assert relative_entries(torch.tensor([7]), 2) == ([3, 3], [True, False])
    assert relative_entries(torch.tensor([8]), 2) == ([3, 3, 0], [True, True, False])


def test_relative_format_decodes_to_the_matrix():
    w = sparse_model((30, 20), density=0.1, seed=6).layers[0].weight.detach().flatten()
    positions = torch.nonzero(w).flatten()
    gaps, filler = relative_entries(positions, 3)
    values = iter(w[positions].tolist())
    dense, pos = torch.zeros_like(w), -1
    for z, f in zip(gaps, filler):
        pos += z + 1
        dense[pos] = 0.0 if f else next(values)
    assert torch.equal(dense, w)


def test_storage_bytes_equal_a_hand_count():
    model = _tiny_model()
    shared = share_weights(model, bits=1)  # 2 clusters = the 2 distinct values
    assert shared[0].centroids.tolist() == [-1.0, 2.0]
    rep = storage_report(model, shared, index_bits=2)
    layer = rep["layers"][0]
    assert (layer["active"], layer["fillers"], layer["clusters"], layer["index_width"]) == (4, 2, 2, 2)
    # dense: 12 weights + 3 biases at 4 bytes
    # csr: 4*32 values + 4*2 column bits + 4 row pointers * bit_length(4)=3 + 96 bias = 244 bits -> 31
    # relative: 6 entries * (32 + 2) + 96 = 300 bits -> 38
    # shared: 6 * (2 + 2) + 2*32 codebook + 96 = 184 bits -> 23
    # huffman: indices [0,2,1,0,2,1] -> lengths 1,2,2: 10 bits; gaps [0,3,0,0,3,0] -> 6 bits;
    #          tables (8 + 3*2) + (8 + 4*1) = 26; + 64 + 96 = 202 bits -> 26
    assert layer["bytes"] == {"dense": 60, "csr": 31, "relative": 38, "shared": 23, "huffman": 26}
    assert layer["huffman_bits"] == {"weights": 10, "gaps": 6, "codebook": 64, "tables": 26, "biases": 96}
    assert rep["bytes"] == layer["bytes"] and rep["ratio"]["csr"] == 60 / 31


def test_storage_counts_batch_norm_scale():
    model = sparse_model((6, 5, 4), density=0.5, seed=7, batch_norm=True)
    rep = storage_report(model, share_weights(model, bits=2))
    assert [layer["bytes"]["dense"] for layer in rep["layers"]] == [4 * (30 + 2 * 5), 4 * (20 + 4)]


# ----------------------------------------------------------------------------- compress_run


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished NeST run on digits (configs/digits-quick.toml with small budgets, ~3 s)."""
    import nestsynth
    from nestsynth import config

    root = Path(__file__).resolve().parents[1]
    cfg = config.from_dict({"dense": {"epochs": 3}, "growth": {"max_iterations": 1, "epochs_per_iteration": 3},
                            "pruning": {"max_iterations": 2, "retrain_epochs": 1, "recover_epochs": 0}},
                           config.load(root / "configs" / "digits-quick.toml"))
    run = tmp_path_factory.mktemp("compress") / "run"
    _, report = nestsynth.synthesize(config=cfg, out=run)
    return run, report


def test_compress_run_writes_consistent_json(finished_run):
    from nestsynth.data import load_dataset
    from nestsynth.report.summary import load_model
    from nestsynth.training import evaluate

    run, report = finished_run
    result = compress_run(run, bits=3, finetune_epochs=1)
    assert json.loads((run / "compression.json").read_text()) == json.loads(json.dumps(result))
    assert result["error"]["test_before"] == report["test_error"]
    for form, total in result["bytes"].items():
        assert total == sum(layer["bytes"][form] for layer in result["layers"])
        assert result["ratio"][form] == result["bytes"]["dense"] / total
    widths = report["widths"]["final"]
    assert result["bytes"]["dense"] == 4 * sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))
    assert sum(layer["active"] for layer in result["layers"]) == report["weights"]["final"]
    assert result["bytes"]["huffman"] < result["bytes"]["csr"] < result["bytes"]["dense"]
    shared = load_model(run / "model_shared.pt")
    for layer, info in zip(shared.layers, result["layers"]):
        w = layer.weight.detach()
        assert len(torch.unique(w[w != 0])) <= info["clusters"] <= 8
        assert torch.equal(w[layer.mask == 0], torch.zeros_like(w[layer.mask == 0]))
    data = load_dataset("digits", val_fraction=0.2, split_seed=0)
    assert evaluate(shared, data.test.X, data.test.y)[0] == result["error"]["test_after"]


def test_compress_run_refuses_bad_input(finished_run, tmp_path):
    run, _ = finished_run
    for bits in (0, 17, 2.5):
        with pytest.raises(NestError, match="bits"):
            compress_run(run, bits=bits)
    with pytest.raises(NestError, match="index_bits"):
        compress_run(run, index_bits=0)
    with pytest.raises(NestError, match="lr_scale"):
        compress_run(run, lr_scale=-1.0)
    with pytest.raises(NestError, match="not a directory"):
        compress_run(tmp_path / "missing")
    with pytest.raises(NestError, match="not a nestsynth run directory"):
        compress_run(tmp_path)
    unfinished = tmp_path / "unfinished"
    (unfinished / "checkpoints").mkdir(parents=True)
    for name in ("config.toml", "checkpoints/last.pt"):
        (unfinished / name).write_bytes((run / name).read_bytes())
    with pytest.raises(NestError, match="not a finished"):
        compress_run(unfinished)
