"""Atomic, pickle-free checkpoints and the run-directory layout (one function per path).

Files are written through a temp file and ``os.replace`` with the permissions the
user's umask gives a new file.  Torch files end with a SHA-256 trailer that
:func:`safe_load` checks, so a damaged (bit-flipped, truncated) checkpoint or model is
refused instead of loaded.  :func:`run_lock` keeps two processes from writing one run
directory at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import socket
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .errors import NestError

FORMAT = "nestsynth-run"
FORMAT_VERSION = 1
#: Appended to every torch file written here: marker + SHA-256 of the bytes before it.
#: ``torch.load`` ignores bytes after the zip archive, so the files stay plain torch files.
DIGEST_MARKER = b"NESTSYNTH-SHA256"
_TRAILER = len(DIGEST_MARKER) + 32
LOCK_NAME = ".lock"


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


def file_mode() -> int:
    """The permissions ``open()`` gives a new file under the current umask (0o666 & ~umask)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old or the new file.

    The file gets the permissions of a plainly created one (the user's umask), not the
    0600 of the temp file it is written through.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fchmod(fh.fileno(), file_mode())
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` through a temp file and ``os.replace``, with a SHA-256 trailer."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    atomic_write_bytes(path, data + DIGEST_MARKER + hashlib.sha256(data).digest())


def safe_load(path: Path) -> Any:
    """``torch.load(..., weights_only=True)``: tensors and plain data only, no code.

    Raises:
        NestError: missing file, or a file that is not a plain-data torch file (for
            example a pickle that would execute code).
    """
    if not path.is_file():
        raise NestError(f"{str(path)!r} does not exist.")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise NestError(f"cannot read {str(path)!r}: {exc.strerror or exc}.") from None
    if data[-_TRAILER:-32] == DIGEST_MARKER:  # files written before the trailer have none
        data, digest = data[:-_TRAILER], data[-32:]
        if hashlib.sha256(data).digest() != digest:
            raise NestError(f"{str(path)!r} is damaged: its contents do not match the checksum written with "
                            "it (a flipped bit or a partial copy); restore it from a copy or start again.")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile, KeyError,
            TypeError, AttributeError, IndexError, OverflowError, MemoryError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise NestError(f"{str(path)!r} is not a readable nestsynth file with plain tensors "
                        f"only (refused or corrupt: {first[:160]}).") from None


def append_jsonl(path: Path, row: dict) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(row) + "\n")


def read_jsonl(path: Path, required: tuple[str, ...] = ()) -> list[dict]:
    """The rows of a JSON-lines file ([] when it does not exist).

    Raises:
        NestError: a line that is not a JSON object holding the ``required`` keys.
    """
    if not path.is_file():
        return []
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise NestError(f"cannot read {str(path)!r} ({exc}).") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict) or any(key not in row for key in required):
            need = f" with the keys {', '.join(required)}" if required else ""
            raise NestError(f"line {number} of {str(path)!r} is not a JSON object{need} ({line[:40]!r}); "
                            "the file is damaged: restore it from a copy or delete it.")
        rows.append(row)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


@contextlib.contextmanager
def run_lock(run: Path) -> Iterator[None]:
    """Hold ``run/.lock`` (holding this process's pid and host) for the duration of the block.

    A lock left by a process that no longer runs on this host is taken over.  The lock
    file is removed on exit; so is ``run`` itself when this call created it and it is
    still empty (a refused run leaves nothing behind).

    Raises:
        NestError: another live process holds the lock, or ``run`` cannot be created.
    """
    created = not run.exists()
    try:
        run.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise NestError(f"cannot create the run directory {str(run)!r}: {exc.strerror or exc}.") from None
    lock = run / LOCK_NAME
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            try:
                holder = json.loads(lock.read_text())
                pid, host = int(holder["pid"]), str(holder["host"])
            except (OSError, ValueError, KeyError, TypeError):
                pid, host = None, me["host"]  # unreadable: half-written by a process that died
            if pid is not None and (host != me["host"] or _pid_alive(pid)):
                where = "" if host == me["host"] else f" on {host}"
                raise NestError(f"{str(run)!r} is in use by another nestsynth process (pid {pid}{where}); wait "
                                f"for it to finish, or delete {str(lock)!r} if that process is gone.") from None
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()  # stale: its process is gone
            continue
        except OSError as exc:
            raise NestError(f"cannot write in the run directory {str(run)!r}: {exc.strerror or exc}.") from None
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(me) + "\n")
        break
    else:
        raise NestError(f"could not take the lock {str(lock)!r}; another process keeps recreating it.")
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()
        if created:
            with contextlib.suppress(OSError):
                run.rmdir()  # only if empty


def check_can_write(path: Path, option: str, *, directory: bool = False) -> None:
    """Refuse, before any work, an output path that cannot be written.

    Args:
        path: the file (or with ``directory``, the folder) to be written.
        option: how the user named it in messages, e.g. ``"--out"``.
        directory: ``path`` is a folder to create or fill rather than a file.

    Raises:
        NestError: ``path`` (or the folder it goes in) lies under a file, is of the wrong
            kind, or is in a folder this user cannot write.
    """
    if path.exists() and path.is_dir() != directory:
        kind = "a directory" if path.is_dir() else "a file"
        raise NestError(f"{option} {str(path)!r} is {kind}; give a {'directory' if directory else 'file'} path.")
    folder = path if directory else path.parent
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise NestError(f"{option} {str(path)!r} cannot be written: {str(existing)!r} is a file, not a directory.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise NestError(f"{option} {str(path)!r} cannot be written: this user may not write in "
                        f"{str(existing)!r}; choose another {option}.")
