"""nestsynth.export: compact model, artifacts (pytorch / safetensors / ONNX), evaluate, bench-infer."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

from nestsynth.cli import main
from nestsynth.errors import NestError
from nestsynth.export import CompactMLP, compact_from_sparse, load_artifact, save_artifact
from nestsynth.export.choose import choose_storage
from nestsynth.export.compact import FORMAT, max_abs_difference
from nestsynth.report.summary import save_model
from nestsynth.sparse import SparseMLP


def _call(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("nestsynth: error: ") and "Traceback" not in err
    return lines[0]


def _randomize_bn(model, g: torch.Generator, bias_scale: float = 0.3) -> None:
    """Gaussian batch-norm statistics and affine parameters (weights of either sign)."""
    with torch.no_grad():
        for bn in model.norms:
            n = bn.num_features
            bn.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            bn.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            bn.weight.copy_(torch.randn(n, generator=g))
            bn.bias.copy_(torch.randn(n, generator=g) * bias_scale)


def pruned_model(batch_norm: bool = True) -> SparseMLP:
    """12-9-7-5 with hidden layer 0 pruned to one live neuron and the last layer fully dense.

    Hidden layer 0 (9 neurons): neuron 4 is live; 0 and 1 have outputs but no inputs
    (constant, folded into the next bias); 2 and 3 have inputs but no outputs (dead);
    5..8 have neither.  Inputs 10 and 11 are read by nobody.  Layer 1 reads only
    neurons 4 (every row) and 0, 1 (constants).  Layer 2 (7 -> 5) is fully dense.
    """
    g = torch.Generator().manual_seed(3)
    model = SparseMLP([12, 9, 7, 5], ["tanh", "relu"], batch_norm=batch_norm, generator=g)
    with torch.no_grad():
        m0 = torch.zeros(9, 12)
        m0[4, :10] = 1
        m0[2, 3] = m0[3, 5] = 1
        m1 = torch.zeros(7, 9)
        m1[:, 4] = 1
        m1[:, 0] = (torch.rand(7, generator=g) < 0.5).float()
        m1[0, 0] = 1
        m1[2, 1] = 1
        model.layers[0].mask.copy_(m0)
        model.layers[1].mask.copy_(m1)
        model.layers[2].mask.fill_(1)
        model.zero_dormant()
    _randomize_bn(model, g)
    return model.eval()


# ----------------------------------------------------------------------------- compact model


@pytest.mark.parametrize("storage", ["dense", "csr", "auto"])
@pytest.mark.parametrize("batch_norm", [True, False])
def test_compact_equals_masked_with_one_neuron_layer_and_dense_layer(storage, batch_norm):
    model = pruned_model(batch_norm)
    compact, info = compact_from_sparse(model, storage, batch_size=4, input_shape=[12])
    # oracle widths: 10 inputs read (2 of 12 dropped is < 25%: no gather), 1 live neuron, 7, 5
    assert info["widths_compact"] == [12, 1, 7, 5]
    assert info["inputs_read"] == 10 and info["input_gather"] is False
    assert info["removed_neurons"] == {"constant_folded": [2, 0], "dead": [6, 0]}
    assert compact.widths == [12, 1, 7, 5]
    assert compact.nnz() == 10 + 7 + 35
    x = torch.randn(300, 12, generator=torch.Generator().manual_seed(0)) * 3
    with torch.inference_mode():
        ref, got = model(x), compact(x)
        one = torch.cat([compact(x[i:i + 1]) for i in range(5)])  # batch 1: the matrix-vector path
    assert (ref - got).abs().max() < 1e-5
    assert (ref[:5] - one).abs().max() < 1e-5
    assert ref.abs().max() > 0.1  # not a vacuous comparison
    if storage != "auto":
        assert compact.storages() == [storage] * 3
    else:
        assert compact.storages()[2] == "dense"  # the fully dense layer
        assert info["layers"][2]["density"] == 1.0


def test_input_gather_when_many_inputs_unread():
    g = torch.Generator().manual_seed(1)
    model = SparseMLP([20, 6, 3], "relu", generator=g).eval()
    with torch.no_grad():
        model.layers[0].mask[:, 8:] = 0  # inputs 8..19 unread: 60%
        model.zero_dormant()
    compact, info = compact_from_sparse(model, "csr")
    assert info["input_gather"] and compact.widths == [8, 6, 3]
    assert torch.equal(compact.input_index, torch.arange(8))
    x = torch.randn(50, 20, generator=g)
    assert max_abs_difference(model, compact, x) < 1e-6


def test_every_hidden_neuron_constant_gives_constant_output():
    model = SparseMLP([5, 4, 3], "sigmoid", generator=torch.Generator().manual_seed(2)).eval()
    with torch.no_grad():
        model.layers[0].mask.zero_()
        model.zero_dormant()
    compact, info = compact_from_sparse(model, "dense")
    assert compact.widths[1] == 0 and info["removed_neurons"]["constant_folded"] == [4]
    x = torch.randn(7, 5)
    expected = model.layers[1].bias + model.layers[1].weight @ torch.sigmoid(model.layers[0].bias)
    torch.testing.assert_close(compact(x), expected.detach().expand(7, 3), atol=1e-6, rtol=0)
    torch.testing.assert_close(compact(x), model(x).detach(), atol=1e-6, rtol=0)


def test_auto_picks_dense_for_a_dense_layer():
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(64, 96, generator=g), torch.randn(64, generator=g)
    choice = choose_storage(w, b, batch_size=16, mode="auto")
    assert choice["storage"] == "dense" and choice["density"] == 1.0
    assert "dense_ms" in choice and "csr_ms" in choice  # it was measured and recorded
    assert choose_storage(w, b, 16, mode="csr")["storage"] == "csr"


# ----------------------------------------------------------------------------- artifacts


@pytest.mark.parametrize("fmt,suffix", [("pytorch", ".pt"), ("safetensors", ".safetensors")])
def test_artifact_round_trip_is_exact(tmp_path, fmt, suffix):
    model = pruned_model()
    compact, _ = compact_from_sparse(model, "dense", input_shape=[12], meta={"dataset": "digits"})
    compact.layers[1] = compact_from_sparse(model, "csr")[0].layers[1]  # mixed storage
    path = tmp_path / f"m{suffix}"
    save_artifact(compact, path, fmt)
    loaded = load_artifact(path)
    assert isinstance(loaded, CompactMLP)
    assert loaded.storages() == ["dense", "csr", "dense"]
    assert loaded.arch() == compact.arch() and loaded.meta["dataset"] == "digits"
    x = torch.randn(40, 12)
    with torch.inference_mode():
        assert torch.equal(loaded(x), compact(x))
    if fmt == "pytorch":
        blob = torch.load(path, weights_only=True)  # plain data + tensors only
        assert blob["format"] == FORMAT
        assert all(isinstance(t, torch.Tensor) and t.layout == torch.strided for t in blob["tensors"].values())
    else:
        assert json.loads(path.with_suffix(".json").read_text())["arch"]["layers"][1]["storage"] == "csr"
        path.with_suffix(".json").unlink()  # the copy in the safetensors metadata is enough
        assert load_artifact(path).arch() == compact.arch()


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def test_crafted_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "version": 1, "arch": {}, "tensors": {}, "payload": _Exploit(marker)}, path)
    with pytest.raises(NestError, match="refused or corrupt"):
        load_artifact(path)
    rc, _, err = _call(["evaluate", path, "--dataset", "digits"])
    assert rc == 2 and "plain tensors only" in _one_error_line(err)
    assert not marker.exists()


def test_tampered_csr_and_wrong_files_are_refused(tmp_path):
    compact, _ = compact_from_sparse(pruned_model(), "csr", input_shape=[12])
    path = tmp_path / "m.pt"
    save_artifact(compact, path, "pytorch")
    blob = torch.load(path, weights_only=True)
    blob["tensors"]["layers.2.col_indices"][0] = 99
    torch.save(blob, path)
    with pytest.raises(NestError, match="do not match its architecture"):
        load_artifact(path)
    (tmp_path / "x.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(NestError, match="not a readable safetensors"):
        load_artifact(tmp_path / "x.safetensors")
    with pytest.raises(NestError, match="expected a .pt, .safetensors or .onnx"):
        load_artifact(tmp_path / "m.bin")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(NestError, match="not a nestsynth compact model"):
        load_artifact(tmp_path / "plain.pt")


def test_onnx_matches_pytorch():
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from nestsynth.export.formats import OnnxModel, onnx_bytes

    model = pruned_model()
    compact, _ = compact_from_sparse(model, "csr", input_shape=[3, 4])  # CSR is densified for ONNX
    runner = OnnxModel(onnx_bytes(compact), threads=1)
    assert runner.input_shape == [3, 4] and runner.arch["layers"][0]["storage"] == "csr"
    for batch in (1, 33):  # dynamic batch axis
        x = torch.randn(batch, 3, 4, generator=torch.Generator().manual_seed(batch))
        with torch.inference_mode():
            assert (runner(x) - compact(x)).abs().max() < 1e-5
            assert (runner(x) - model(x)).abs().max() < 1e-5


# ----------------------------------------------------------------------------- command line


@pytest.fixture
def digits_run(tmp_path, digits):
    """A run directory holding a (random, masked, BN) model for the 8x8 digits."""
    g = torch.Generator().manual_seed(5)
    model = SparseMLP([64, 20, 10], "relu", batch_norm=True, generator=g)
    with torch.no_grad():
        model.layers[0].mask.copy_((torch.rand(20, 64, generator=g) < 0.2).float())
        model.layers[0].mask[:3] = 0  # three constant neurons
        model.zero_dormant()
    _randomize_bn(model, g)
    run = tmp_path / "run"
    save_model(model.eval(), run / "model.pt", "mlp:64-20-10", input_shape=[1, 8, 8])
    (run / "report.json").write_text(json.dumps({"model": "mlp:64-20-10", "dataset": "digits",
                                                 "input_shape": [1, 8, 8],
                                                 "dense_reference": {"widths": [64, 30, 10]}}))
    with torch.inference_mode():
        wrong = int((model(digits.test.X).argmax(1) != digits.test.y).sum())
    return run, wrong / len(digits.test.y)


def test_cli_export_evaluate_round_trip(digits_run):
    run, error = digits_run
    rc, out, err = _call(["export", run, "--format", "pytorch", "--json"])
    assert rc == 0, err
    result = json.loads(out)
    assert result["check_passed"] and result["max_abs_diff"] < 1e-5
    assert result["widths_compact"] == [64, 17, 10]
    assert result["test_error_compact"] == result["test_error_masked"] == error
    path = run / "export" / "compact.pt"
    assert Path(result["artifact"]) == path and result["files"][str(path)] == path.stat().st_size
    assert json.loads((run / "export" / "compact.pt.export.json").read_text())["layers"][0]["storage"] in (
        "dense", "csr", "ckernel")
    rc, out, err = _call(["evaluate", path, "--json"])
    assert rc == 0, err
    assert json.loads(out)["test_error"] == error and json.loads(out)["samples"] == 360
    rc, out, _ = _call(["export", run, "--format", "safetensors", "--sparse", "csr"])
    assert rc == 0 and "compact.safetensors" in out
    rc, out, _ = _call(["evaluate", run / "export" / "compact.safetensors", "--dataset", "digits"])
    assert rc == 0 and f"{100 * error:.2f}%" in out


def test_cli_onnx_export_evaluate_and_bench(digits_run, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    run, error = digits_run
    rc, out, err = _call(["export", run, "--format", "onnx", "--json"])
    assert rc == 0, err
    result = json.loads(out)
    assert result["max_abs_diff_onnx_vs_pytorch"] < 1e-5 and result["max_abs_diff_onnx_vs_masked"] < 1e-5
    rc, out, err = _call(["evaluate", run / "export" / "compact.onnx", "--json"])
    assert rc == 0 and json.loads(out)["test_error"] == error, err
    assert _call(["export", run, "--sparse", "csr"])[0] == 0
    rc, out, err = _call(["bench-infer", run / "export" / "compact.pt", "--batch-sizes", "1,3", "--repeats", "3",
                          "--warmup", "1", "--out", tmp_path / "inference.json"])
    assert rc == 0, err
    bench = json.loads((tmp_path / "inference.json").read_text())
    names = [v["name"] for v in bench["variants"]]
    assert names[:3] == ["dense reference", "masked", "compact (PyTorch)"] and names[-1] == "ONNX (onnxruntime)"
    assert bench["flops"]["dense_reference"] == 2 * (64 * 30 + 30 * 10)
    assert bench["variants"][0]["latency"]["1"]["speedup"] == 1.0
    for v in bench["variants"][1:]:
        assert v["max_abs_diff_vs_masked"] < 1e-5
        assert set(v["latency"]) == {"1", "3"} and v["latency"]["3"]["median_ms"] > 0
    assert bench["file_bytes"]["compact.onnx"] == (run / "export" / "compact.onnx").stat().st_size
    assert "FLOP ratio" in out and "speedup" in out


def test_cli_export_errors(digits_run, tmp_path):
    run, _ = digits_run
    rc, _, err = _call(["export", tmp_path / "nothing"])
    assert rc == 2 and "does not exist" in _one_error_line(err)
    rc, _, err = _call(["export", run, "--format", "onnx", "--sparse", "csr"])
    assert rc == 2 and "dense only" in _one_error_line(err)
    rc, _, err = _call(["export", run, "--tolerance", "0", "--out", tmp_path / "never.pt"])
    line = _one_error_line(err)
    assert rc == 2 and "export check failed" in line and "float32 numbers are" in line
    assert not (tmp_path / "never.pt").exists()
    rc, _, err = _call(["export", run, "--out", tmp_path / "wrong.onnx"])
    assert rc == 2 and "must end in .pt" in _one_error_line(err)
    rc, _, err = _call(["bench-infer", run / "model.pt", "--batch-sizes", "1,x"])
    assert rc == 2 and "--batch-sizes" in _one_error_line(err)


def test_bench_infer_without_onnxruntime_skips_the_onnx_row(digits_run, tmp_path, monkeypatch):
    import nestsynth.export.pipeline as pipeline

    run, _ = digits_run
    assert _call(["export", run, "--format", "safetensors", "--sparse", "csr", "--check", "random"])[0] == 0
    monkeypatch.setattr(pipeline, "_onnx_available", lambda: False)
    rc, out, err = _call(["bench-infer", run / "export" / "compact.safetensors", "--batch-sizes", "2",
                          "--repeats", "3", "--warmup", "1", "--json"])
    assert rc == 0, err
    bench = json.loads(out)
    assert [v["name"] for v in bench["variants"] if v["name"] != "compact, C kernel"] == [
        "dense reference", "masked", "compact (PyTorch)", "compact, all dense"]
    assert "skipped" in bench["onnx"] and Path(bench["output_file"]) == run / "export" / "inference.json"
    assert bench["variants"][2]["executed_flops"] == bench["flops"]["nonzero"]  # every layer CSR


def _csr_mlp(widths, density, seed=0) -> CompactMLP:
    from nestsynth.export.compact import CompactLinear

    g = torch.Generator().manual_seed(seed)
    layers = []
    for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        w = torch.randn(n_out, n_in, generator=g) * (torch.rand(n_out, n_in, generator=g) < density)
        act = "relu" if i < len(widths) - 2 else None
        layers.append(CompactLinear(w, torch.randn(n_out, generator=g), "csr", act,
                                    {"storage": "csr", "reason": "measured"}))
    return CompactMLP(layers).eval()


def test_auto_falls_back_to_dense_largest_layer_first():
    from nestsynth.export.compact import CompactLinear
    from nestsynth.export.pipeline import dense_fallback

    X = torch.rand(64, 40, generator=torch.Generator().manual_seed(1))
    # the oracle "masked" model: exactly the compact model with only its largest layer dense
    compact = _csr_mlp([40, 30, 20, 5], 0.3)
    nnz = [layer.nnz for layer in compact.layers]
    big = max(range(3), key=lambda j: nnz[j])
    masked = _csr_mlp([40, 30, 20, 5], 0.3)
    old = masked.layers[big]
    masked.layers[big] = CompactLinear(old.dense_weight(), old.bias, "dense", old.activation)
    decisions = [{"layer": j, "storage": "csr"} for j in range(3)]
    diff, switched = dense_fallback(masked, compact, decisions, X, 1e-30, 1.0)
    assert diff == 0.0 and switched == [f"fc{big + 1}"]
    assert compact.storages() == ["dense" if j == big else "csr" for j in range(3)]
    assert decisions[big]["storage"] == "dense" and decisions[big]["csr_fallback"]
    assert "stored dense instead" in compact.layers[big].choice["reason"]
    # a tolerance nothing passes (the check is diff < tolerance) switches every CSR layer,
    # most non-zeros first (whether CSR rounding differs from dense at all depends on the CPU)
    compact = _csr_mlp([40, 30, 20, 5], 0.3)
    decisions = [{"layer": j, "storage": "csr"} for j in range(3)]
    diff, switched = dense_fallback(compact.densified(), compact, decisions, X, 0.0, 1.0)
    order = sorted(range(3), key=lambda j: -nnz[j])
    assert diff == 0.0 and switched == [f"fc{j + 1}" for j in order]
    assert compact.storages() == ["dense"] * 3


def test_bench_infer_reports_the_deep_compression_sizes(digits_run, monkeypatch):
    import nestsynth.export.pipeline as pipeline

    run, _ = digits_run
    assert _call(["export", run, "--format", "pytorch", "--sparse", "dense", "--check", "random"])[0] == 0
    monkeypatch.setattr(pipeline, "_onnx_available", lambda: False)
    args = ["bench-infer", run / "export" / "compact.pt", "--batch-sizes", "1", "--repeats", "3", "--warmup", "1"]
    rc, out, err = _call(args + ["--json"])
    assert rc == 0, err
    assert json.loads(out)["deep_compression"] is None  # not compressed yet
    (run / "model_shared.pt").write_bytes(b"x" * 1234)
    sizes = {"dense": 5000, "csr": 900, "relative": 880, "shared": 400, "huffman": 321}
    (run / "compression.json").write_text(json.dumps({
        "bits": 5, "bytes": sizes, "error": {"test_after": 0.05},
        "reference": {"ratio": {"huffman": 12.5}}}))
    rc, out, err = _call(args + ["--json"])
    assert rc == 0, err
    bench = json.loads(out)
    assert bench["deep_compression"]["bytes"] == sizes and bench["deep_compression"]["file_bytes"] == 1234
    assert bench["file_bytes"]["model_shared.pt"] == 1234
    assert bench["file_bytes"]["Deep Compression, Huffman-coded (5 bits, computed)"] == 321
    rc, out, err = _call(args)
    assert rc == 0 and "huffman 321 B" in out and "12.5x below" in out and "5.00%" in out
    (run / "compression.json").write_text("{not json")
    rc, out, err = _call(args)
    assert rc != 0 and "compression.json" in _one_error_line(err)
