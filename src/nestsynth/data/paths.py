"""Where dataset files are looked for."""

from __future__ import annotations

import os
import pathlib

ENV_VAR = "NESTSYNTH_DATA_DIR"
CACHE_ROOT = pathlib.Path("~/.cache/nestsynth")


def resolve_data_dir(name: str, data_dir: str | None) -> list[pathlib.Path]:
    """List the folders that may hold the files of dataset ``name``, in search order.

    The ``data_dir`` argument wins; otherwise the ``NESTSYNTH_DATA_DIR`` environment
    variable; otherwise ``~/.cache/nestsynth/<name>``.  A given folder may hold the
    files itself or a ``<name>/`` subfolder with them, so both are listed (the
    folder itself first).  For ``"npz:PATH"`` the only candidate is PATH's folder.

    Args:
        name: dataset name, e.g. ``"mnist"``.
        data_dir: folder given by the user, or None.

    Returns:
        Candidate folders (user ``~`` expanded), first one preferred for downloads.
    """
    if name.startswith("npz:"):
        return [pathlib.Path(name[4:]).expanduser().parent]
    root = data_dir if data_dir else os.environ.get(ENV_VAR) or None
    if root is None:
        return [(CACHE_ROOT / name).expanduser()]
    base = pathlib.Path(root).expanduser()
    return [base, base / name]
