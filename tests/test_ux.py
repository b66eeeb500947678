"""A run that tells the user what happened: progress without a terminal, the final summary,
--quiet, --version, help texts, file permissions, SIGTERM and the run-directory lock."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys

import pytest
from cli_helpers import TINY, call, one_error_line, snapshot

from nestsynth import checkpoint as ckpt
from nestsynth.cli import _parser


@pytest.fixture(scope="module")
def loud_run(tmp_path_factory):
    """A finished tiny run with its stdout (not a terminal) and stderr."""
    run = tmp_path_factory.mktemp("ux") / "run"
    rc, out, err = call(["synthesize", *TINY, "--out", run])
    assert rc == 0, err
    return run, out


def test_progress_without_a_terminal_one_line_per_iteration(loud_run):
    run, out = loud_run
    rows = ckpt.read_jsonl(ckpt.metrics_path(run))
    lines = out.splitlines()
    progress = [line for line in lines if line.startswith("[")]
    assert len(progress) == len(rows)  # one line per logged iteration, in order
    for line, row in zip(progress, rows):
        assert line.startswith(f"[{row['phase']} {row['iteration']}] weights {row['weights']} ")
        assert f"val error {100 * row['val_error']:.2f}%" in line
        assert re.search(r"elapsed \d+s", line)
    # a line when a phase starts, before its first iteration
    assert lines.index("dense reference: training 1 epoch...") == lines.index(progress[1]) - 1
    growth = next(i for i, line in enumerate(lines) if line.startswith("growth: up to 1 iteration of 1 epoch"))
    pruning = next(i for i, line in enumerate(lines) if line.startswith("pruning: up to 2 iterations of 1 "
                                                                         "retraining epoch"))
    assert lines[growth + 1].startswith("[growth 0]") and lines[pruning + 1].startswith("[pruning 0]")
    # while a phase goes on, an upper bound on what it has left
    assert "pruning at most" in lines[pruning + 1] and "(1 iteration left at most)" in lines[pruning + 1]
    assert "at most" not in lines[pruning + 2]  # the last one: the phase is over


def test_final_summary_names_the_kept_model_and_why_phases_ended(loud_run):
    run, out = loud_run
    rows = ckpt.read_jsonl(ckpt.metrics_path(run))
    report = json.loads(ckpt.report_path(run).read_text())
    kept = [r for r in rows if r["phase"] == "pruning" and r.get("accepted")][-1]
    growth = "reached the target" if report["growth"]["reached"] else "stopped without reaching the target"
    assert f"growth: {growth} validation error" in out
    assert "pruning: 2 iterations" in out and "stopped because" in out
    assert f"kept model: pruning iteration {kept['iteration']} ({kept['weights']} weights" in out
    assert out.rstrip().endswith(f"run directory: {run}")
    # nestsynth report says the same
    rc, again, err = call(["report", run])
    assert rc == 0, err
    assert f"kept model: pruning iteration {kept['iteration']}" in again


def test_pruning_stop_reason_inferred_for_runs_without_one(loud_run):
    from nestsynth.report import format_outcome

    run, _ = loud_run
    rows = ckpt.read_jsonl(ckpt.metrics_path(run))
    report = json.loads(ckpt.report_path(run).read_text())
    report["pruning"] = {"bound_val_error": 0.1}  # an older report: no stop_reason, no kept_iteration
    rejected = [dict(r, accepted=(r["iteration"] == 0)) if r["phase"] == "pruning" else r for r in rows]
    text = format_outcome(report, rejected, max_iterations=2)
    assert "stopped because the validation error rose above the bound 10.00%" in text
    assert "kept model: pruning iteration 0 (" in text
    limit = format_outcome(report, [dict(r, accepted=True) for r in rows], max_iterations=2)
    assert "it reached the iteration limit (pruning.max_iterations = 2)" in limit
    assert format_outcome({"method": "han"}, rows) == ""  # baselines: no growth or pruning sections


def test_quiet_prints_only_the_summary(tmp_path):
    rc, out, err = call(["synthesize", *TINY, "--quiet", "--out", tmp_path / "run"])
    assert rc == 0, err
    assert not [line for line in out.splitlines() if line.startswith("[") or line.endswith("...")]
    assert "Total" in out and "kept model:" in out


def test_files_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        rc, _, err = call(["synthesize", *TINY, "--quiet", "--out", tmp_path / "run"])
        assert rc == 0, err
        rc, _, err = call(["export", tmp_path / "run", "--format", "safetensors", "--sparse", "dense"])
        assert rc == 0, err
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert {"config.toml", "report.json", "model.pt", "last.pt", "compact.safetensors", "compact.json"} <= \
        {p.name for p in files}
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o640, p
    assert not [p for p in (tmp_path / "run").rglob(".*") if p.is_file()]  # no temp file or lock left


def test_version_descriptions_and_shared_options(capsys):
    with pytest.raises(SystemExit) as info:
        _parser().parse_args(["--version"])
    assert info.value.code == 0
    from importlib.metadata import version
    assert capsys.readouterr().out.strip() == f"nestsynth {version('nestsynth')}"
    parser = _parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, command in sub.choices.items():
        assert command.description and command.description.endswith("."), name
        for action in command._actions:
            if "--dataset" in action.option_strings:
                assert all(d in action.help for d in ("mnist", "digits", "cifar10", "npz:PATH")), name
    for name in ("synthesize", "prune", "compare"):
        argv = [name, "--device", "cuda:1"] + (["--method", "han"] if name == "prune" else []) + \
            (["--methods", "nest"] if name == "compare" else [])
        assert parser.parse_args(argv).device == "cuda:1"
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["synthesize", "--device", "gpu"])
    assert info.value.code == 2
    assert "invalid device 'gpu'; valid: auto, cpu, cuda or cuda:N" in capsys.readouterr().err


def test_sigterm_checkpoints_and_exits_143(tmp_path, monkeypatch):
    import nestsynth.baselines.runner as runner

    real = runner.run_method

    def terminated_after_growth(*args, on_iteration=None, **kwargs):
        def hook(state):
            on_iteration(state)
            if state.phase == "pruning":
                os.kill(os.getpid(), signal.SIGTERM)

        return real(*args, on_iteration=hook, **kwargs)

    monkeypatch.setattr(runner, "run_method", terminated_after_growth)
    run = tmp_path / "run"
    before = signal.getsignal(signal.SIGTERM)
    rc, out, err = call(["synthesize", *TINY, "--quiet", "--out", run])
    assert rc == 143
    assert err.strip().splitlines() == [f"terminated (SIGTERM): the last checkpoint is in {run}; continue with "
                                        f"nestsynth synthesize --out {run} --resume"]
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is the command's only
    assert ckpt.checkpoint_path(run).is_file() and not (run / "report.json").exists()
    assert not (run / ckpt.LOCK_NAME).exists()
    monkeypatch.setattr(runner, "run_method", real)
    rc, out, err = call(["synthesize", "--out", run, "--resume", "--quiet"])
    assert rc == 0, err


def test_a_run_directory_is_locked_while_written(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / ckpt.LOCK_NAME).write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname()}))
        before = snapshot(run)
        rc, out, err = call(["synthesize", *TINY, "--quiet", "--out", run])
        assert rc == 2
        line = one_error_line(err)
        assert f"in use by another nestsynth process (pid {holder.pid})" in line and ".lock" in line
        assert snapshot(run) == before
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its stale lock is taken over and removed at the end
    rc, out, err = call(["synthesize", *TINY, "--quiet", "--out", run])
    assert rc == 0, err
    assert (run / "report.json").is_file() and not (run / ckpt.LOCK_NAME).exists()
