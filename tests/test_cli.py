"""The ``nestsynth`` command line: models, errors with exit status 2, an end-to-end run, report."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cli_helpers import call as _call
from cli_helpers import one_error_line as _one_error_line
from cli_helpers import snapshot as _snapshot

from nestsynth.cli import main

ROOT = Path(__file__).resolve().parents[1]
QUICK = ROOT / "configs" / "digits-quick.toml"
SHORT = ["--set", "growth.max_iterations=2", "--set", "dense.epochs=5", "--set", "pruning.max_iterations=5"]


# ----------------------------------------------------------------------------- models


def test_models_json(capsys):
    assert main(["models", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["lenet-300-100"]["weights"] == 266_200
    assert rows["lenet-300-100"]["flops"] == 532_400
    assert rows["lenet-300-100"]["widths"] == [784, 300, 100, 10]
    assert rows["lenet-500-150"]["weights"] == 784 * 500 + 500 * 150 + 150 * 10
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    by_name = {line.split()[0]: line for line in lines if line and line.split()[0] in rows}
    assert by_name["lenet-300-100"].split()[:4] == ["lenet-300-100", "784-300-100-10", "266,200", "532,400"]
    assert by_name["vgg-16"].split()[:4] == ["vgg-16", "3-64x2-128x2-256x3-512x6-4096x2-1000", "138,344,128",
                                             "30,940,528,640"]
    # right-aligned numbers: every row's weights and FLOPs end in the same column as the header's
    header = lines[0]
    for line in by_name.values():
        for column in ("weights", "FLOPs"):
            end = header.index(column) + len(column)
            assert line[end - 1].isdigit() and line[end] == " ", (column, line)


# ----------------------------------------------------------------------------- user errors


@pytest.fixture(params=[b"PK\x03\x04 this is not a zip archive" + bytes(range(256)),
                        bytes(range(256)) * 3])
def bad_npz(tmp_path, request):
    path = tmp_path / "bad.npz"
    path.write_bytes(request.param)
    return path


@pytest.mark.parametrize("argv,needle", [
    (["--model", "nope-net"], "nope-net"),
    (["--dataset", "nosuchdata"], "nosuchdata"),
    (["--set", "growth.alpha"], "growth.alpha"),
    (["--set", "seed_net.ratio=-1"], "seed_net.ratio"),
    (["--set", "growth.nosuch=1"], "growth.nosuch"),
    (["--config", "missing.toml"], "missing.toml"),
    (["--model", "mlp:10-5-3"], "mlp:10-5-3"),   # does not match the 64-feature data
])
def test_synthesize_user_errors_exit_2(tmp_path, capsys, argv, needle):
    out = tmp_path / "run"
    rc = main(["synthesize", "--quiet", "--device", "cpu", "--dataset", "digits", "--out", str(out),
               *[str(tmp_path / a) if a.endswith(".toml") else a for a in argv]])
    captured = capsys.readouterr()
    assert rc == 2
    assert needle in _one_error_line(captured.err)
    assert not out.exists()  # nothing written for a refused run


def test_corrupt_npz_exit_2(tmp_path, capsys, bad_npz):
    rc = main(["synthesize", "--quiet", "--dataset", f"npz:{bad_npz}", "--out", str(tmp_path / "run")])
    assert rc == 2
    assert "bad.npz" in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


def test_resume_and_report_on_non_runs_exit_2(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["synthesize", "--resume", "--out", str(empty), "--quiet"]) == 2
    _one_error_line(capsys.readouterr().err)
    assert main(["synthesize", "--resume", "--quiet"]) == 2  # no --out
    _one_error_line(capsys.readouterr().err)
    assert main(["report", str(empty)]) == 2
    _one_error_line(capsys.readouterr().err)
    assert list(empty.iterdir()) == []


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("cli") / "run"
    rc, out, err = _call(["synthesize", "--config", QUICK, *SHORT, "--out", run, "--device", "cpu"])
    return run, rc, out, err


def test_cli_end_to_end_outputs(cli_run):
    run, rc, out, err = cli_run
    assert rc == 0, err
    for name in ("config.toml", "metrics.jsonl", "report.json", "model.pt", "checkpoints/last.pt",
                 "plots/connections.png", "plots/input_growth.png"):
        assert (run / name).is_file(), name
    assert (run / "plots" / "connections.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = (run / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert len(rows) == len(lines) >= 4
    for row in rows:
        assert isinstance(row, dict)
        assert {"phase", "iteration", "weights", "neurons", "val_error", "seconds"} <= set(row)
    phases = [r["phase"] for r in rows]
    assert phases[:2] == ["seed", "dense"]
    assert phases.count("growth") == 2 and 1 <= phases.count("pruning") <= 5
    # the written config is the resolved one (overrides applied)
    from nestsynth import config as C
    cfg = C.load(run / "config.toml")
    assert cfg.growth.max_iterations == 2 and cfg.dense.epochs == 5 and cfg.pruning.max_iterations == 5
    assert cfg.growth.epochs_per_iteration == 15  # from digits-quick.toml
    report = json.loads((run / "report.json").read_text())
    assert report["weights"]["final"] == sum(r["weights"] for r in report["layers"])
    assert report["environment"]["config_digest"] == cfg.digest()
    # the per-line progress and the final table on stdout
    assert "fc1" in out and "Total" in out and str(report["weights"]["final"]) in out
    assert f"[growth 0] weights {rows[2]['weights']}" in out


def test_cli_report_command(cli_run, capsys):
    run, rc, _, _ = cli_run
    assert rc == 0
    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    assert "fc1" in out and "Total" in out
    report = json.loads((run / "report.json").read_text())
    total = next(line for line in out.splitlines() if line.startswith("Total"))
    assert str(report["weights"]["final"]) in total.split()
    assert main(["report", str(run), "--json"]) == 0
    text = capsys.readouterr().out
    assert json.loads(text[: text.rindex("}") + 1]) == report


def test_cli_second_synthesize_into_existing_run_refused(cli_run, capsys):
    run, rc, _, _ = cli_run
    assert rc == 0
    before = _snapshot(run)
    rc2 = main(["synthesize", "--config", str(QUICK), *SHORT, "--out", str(run), "--quiet", "--device", "cpu"])
    assert rc2 == 2
    assert "--resume" in _one_error_line(capsys.readouterr().err)
    assert _snapshot(run) == before
    # resuming with a changed config is refused as well
    rc3 = main(["synthesize", "--out", str(run), "--resume", "--quiet", "--set", "seed=9"])
    assert rc3 == 2
    _one_error_line(capsys.readouterr().err)
    assert _snapshot(run) == before


def test_cli_interrupt_exit_130_then_resume_matches_uninterrupted(cli_run, tmp_path, monkeypatch):
    import torch

    import nestsynth.baselines.runner as runner

    ref_run, rc, _, _ = cli_run
    assert rc == 0
    real = runner.run_method

    def interrupted(*args, on_iteration=None, **kwargs):
        calls = []

        def hook(state):
            calls.append(1)
            if on_iteration is not None:
                on_iteration(state)
            if len(calls) == 4:
                raise KeyboardInterrupt

        return real(*args, on_iteration=hook, **kwargs)

    run = tmp_path / "run"
    monkeypatch.setattr(runner, "run_method", interrupted)
    rc, out, err = _call(["synthesize", "--config", QUICK, *SHORT, "--out", run, "--device", "cpu", "--quiet"])
    assert rc == 130
    assert "--resume" in err and not (run / "report.json").exists()
    monkeypatch.setattr(runner, "run_method", real)
    rc, out, err = _call(["synthesize", "--out", run, "--resume", "--quiet"])
    assert rc == 0, err
    a = json.loads((ref_run / "report.json").read_text())
    b = json.loads((run / "report.json").read_text())
    for r in (a, b):  # wall times differ; everything else is identical
        r.pop("wall_seconds")
        for section in r.values():
            if isinstance(section, dict):
                section.pop("seconds", None)
    assert a == b
    ma = torch.load(ref_run / "model.pt", weights_only=True)["model"]
    mb = torch.load(run / "model.pt", weights_only=True)["model"]
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)


def test_out_is_a_file_exit_2(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["synthesize", "--quiet", "--device", "cpu", "--out", str(f)]) == 2
    assert "file" in _one_error_line(capsys.readouterr().err)
    assert f.read_text() == "x"


def test_cuda_without_cuda_exit_2(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["synthesize", "--quiet", "--device", "cuda", "--out", str(tmp_path / "r")]) == 2
    assert "cuda" in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------- console script


def test_console_script_exit_codes(tmp_path):
    exe = shutil.which("nestsynth") or str(Path(sys.executable).with_name("nestsynth"))
    if not Path(exe).exists():
        pytest.skip("console script nestsynth is not installed")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    ok = subprocess.run([exe, "models", "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0
    assert {r["name"]: r["flops"] for r in json.loads(ok.stdout)}["lenet-300-100"] == 532_400
    bad = subprocess.run([exe, "synthesize", "--model", "nope-net", "--dataset", "digits", "--quiet",
                          "--out", str(tmp_path / "run")], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2
    assert "nope-net" in _one_error_line(bad.stderr)
