"""Atomic, pickle-free checkpoints and the run-directory layout (one function per path)."""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch

from .errors import NestError

FORMAT = "nestsynth-run"
FORMAT_VERSION = 1


def config_path(run: Path) -> Path:
    return run / "config.toml"


def metrics_path(run: Path) -> Path:
    return run / "metrics.jsonl"


def report_path(run: Path) -> Path:
    return run / "report.json"


def model_path(run: Path) -> Path:
    return run / "model.pt"


def checkpoint_path(run: Path, name: str = "last") -> Path:
    return run / "checkpoints" / f"{name}.pt"


def plots_dir(run: Path) -> Path:
    return run / "plots"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old or the new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` through a temp file and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def safe_load(path: Path) -> Any:
    """``torch.load(..., weights_only=True)``: tensors and plain data only, no code.

    Raises:
        NestError: missing file, or a file that is not a plain-data torch file (for
            example a pickle that would execute code).
    """
    if not path.is_file():
        raise NestError(f"{str(path)!r} does not exist.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise NestError(f"{str(path)!r} is not a readable nestsynth file with plain tensors "
                        f"only (refused or corrupt: {first[:160]}).") from None


def append_jsonl(path: Path, row: dict) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(row) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
