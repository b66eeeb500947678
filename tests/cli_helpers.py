"""Helpers of the command-line tests: call ``main`` in-process, check the one error line,
fingerprint a folder, and a tiny digits run that finishes in seconds."""

from __future__ import annotations

import contextlib
import hashlib
import io
from pathlib import Path

from nestsynth.cli import main

#: A finished run in seconds: a 64-16-10 MLP on digits, one epoch per unit.
TINY = ["--dataset", "digits", "--model", "mlp:64-16-10", "--device", "cpu",
        "--set", "dense.epochs=1", "--set", "growth.max_iterations=1", "--set", "growth.epochs_per_iteration=1",
        "--set", "pruning.max_iterations=2", "--set", "pruning.retrain_epochs=1",
        "--set", "pruning.recover_epochs=0"]


def call(argv) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``nestsynth ARGV`` run in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def snapshot(folder: Path) -> dict:
    """Contents and modification times of every file below ``folder``."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error_line(err: str) -> str:
    """The single ``nestsynth: error:`` line of ``err`` (asserting there is nothing else)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("nestsynth: error: ")
    assert "Traceback" not in err
    return lines[0]
