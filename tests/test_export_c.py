"""``--format c``: the dependency-free C file compiles, its harness matches PyTorch; input contracts."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from nestsynth.export import load_artifact, save_artifact
from nestsynth.export.ckernel import CC_ENV, build
from nestsynth.export.formats import c_artifact
from nestsynth.export.pipeline import export_run
from test_ckernel import _cnn, kernel_cache, needs_cc  # noqa: F401 (kernel_cache: autouse fixture)
from test_export import _call, _one_error_line, digits_run  # noqa: F401 (fixture)
from test_export import _csr_mlp


def run_harness(source: str, x: torch.Tensor, flags=("-O2",)) -> torch.Tensor:
    """Compile ``source`` with -DNEST_MAIN, feed the rows of ``x`` on stdin, parse the printed outputs."""
    program, _ = build(source, "program", flag_sets=(("-std=c99", "-Wall", "-Werror", *flags),))
    text = "\n".join(" ".join(f"{v:.9g}" for v in row) for row in x.flatten(1).tolist()) + "\n"
    done = subprocess.run([str(program)], input=text, capture_output=True, text=True, timeout=60, check=True)
    return torch.tensor([[float(v) for v in line.split()] for line in done.stdout.splitlines()])


@needs_cc
@pytest.mark.parametrize("flags", [("-O2",), ("-O2", "-DNEST_PLAIN_C"), ("-O0", "-DNEST_TILE=1")])
def test_c_export_of_an_mlp_compiles_warning_free_and_matches_pytorch(flags):
    model = _csr_mlp([30, 16, 8, 4], 0.3, seed=1)
    x = torch.rand(5, 30, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = model(x)
    assert (run_harness(c_artifact(model), x, flags) - want).abs().max() < 1e-5


@needs_cc
def test_c_export_of_a_cnn_with_conv_layers_matches_pytorch():
    model = _cnn("dense", torch.Generator().manual_seed(6))
    x = torch.randn(4, 3, 9, 9, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want = model(x)
    assert (run_harness(c_artifact(model), x) - want).abs().max() < 1e-5


@needs_cc
def test_cli_c_export_is_checked_and_every_artifact_records_the_input_contract(digits_run, tmp_path):
    run, _ = digits_run
    rc, out, err = _call(["export", run, "--format", "c", "--compile-check", "require", "--json"])
    assert rc == 0, err
    result = json.loads(out)
    assert result["check_passed"] and result["max_abs_diff_c_vs_masked"] < 1e-5 and result["c_compiled"]
    text = (run / "export" / "compact.c").read_text()
    assert "INPUT CONTRACT" in text and "/ 16 (range [0, 1])" in text and "#define NEST_N_INPUTS 64" in text
    contract = result["input_contract"]
    assert contract["shape"] == [1, 8, 8] and contract["mean"] is None and contract["dataset"] == "digits"
    for fmt, suffix in (("pytorch", ".pt"), ("safetensors", ".safetensors")):
        rc, _, err = _call(["export", run, "--format", fmt, "--out", tmp_path / f"m{suffix}"])
        assert rc == 0, err
        assert load_artifact(tmp_path / f"m{suffix}").meta["input_contract"] == contract
    blob = torch.load(tmp_path / "m.pt", weights_only=True)
    assert blob["input_contract"] == contract
    from safetensors import safe_open

    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as fh:
        assert json.loads(fh.metadata()["input_contract"]) == contract
    pytest.importorskip("onnxruntime")
    rc, _, err = _call(["export", run, "--format", "onnx", "--out", tmp_path / "m.onnx"])
    assert rc == 0, err
    session = load_artifact(tmp_path / "m.onnx").session
    assert json.loads(session.get_modelmeta().custom_metadata_map["input_contract"]) == contract


def test_c_export_errors_are_one_sentence(digits_run, monkeypatch, tmp_path):
    run, _ = digits_run
    monkeypatch.setenv(CC_ENV, "/nonexistent/cc")
    rc, _, err = _call(["export", run, "--format", "c", "--compile-check", "require"])
    assert rc != 0 and "no C compiler" in _one_error_line(err)
    result = export_run(run, "c", out=tmp_path / "m.c")                 # auto: written, the reason recorded
    assert "no C compiler" in result["c_check"] and (tmp_path / "m.c").is_file()
    rc, _, err = _call(["evaluate", tmp_path / "m.c"])
    assert rc != 0 and "is C source" in _one_error_line(err)
    rc, _, err = _call(["export", run, "--format", "c", "--out", tmp_path / "m.pt"])
    assert rc != 0 and "must end in .c" in _one_error_line(err)
    save_artifact(_csr_mlp([4, 3], 1.0), tmp_path / "x.c", "c")
    assert "nest_forward" in (tmp_path / "x.c").read_text()
