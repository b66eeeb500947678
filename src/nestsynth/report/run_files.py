"""A run's files that the report and the plots both read: the model file (tensors +
plain data, loadable with ``weights_only=True``), the model snapshots and metrics.jsonl.

Split from :mod:`.summary` so that :mod:`.plots` can read a run without importing the
module that draws it; :mod:`.summary` re-exports every name.
"""

from __future__ import annotations

from pathlib import Path

from .. import checkpoint as ckpt
from ..errors import NestError
from ..graph.network import KIND as GRAPH_KIND
from ..graph.network import SparseGraph
from ..sparse import SparseMLP, model_from_arch

MODEL_FORMAT = "nestsynth-model"


def model_of_arch(arch: dict):
    """A fresh SparseMLP, SparseCNN or SparseGraph of a plain-data ``arch()`` (by its ``kind``)."""
    return SparseGraph.from_arch(arch) if arch.get("kind") == GRAPH_KIND else model_from_arch(arch)


def save_model(model: SparseMLP, path: Path, name: str = "custom", input_shape=None) -> None:
    """Save a SparseMLP, SparseCNN or SparseGraph as tensors + plain data (loadable with
    ``weights_only=True``)."""
    ckpt.atomic_torch_save({"format": MODEL_FORMAT, "version": 1, "name": name,
                            "input_shape": list(input_shape) if input_shape else None,
                            "arch": model.arch(),
                            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()}}, path)


def load_model(path: str | Path) -> SparseMLP:
    """Load a model saved by :func:`save_model` (or a checkpoint) without unpickling code.

    Raises:
        NestError: the file is missing, refused, or not a nestsynth model.
    """
    blob = ckpt.safe_load(Path(path))
    try:
        model = model_of_arch(blob["arch"])
        model.load_state_dict(blob["model"])
    except (KeyError, TypeError, ValueError, RuntimeError, NestError):
        raise NestError(f"{str(path)!r} is not a nestsynth model file (architecture and weights "
                        "missing or inconsistent).") from None
    return model


def load_run_model(run: Path, name: str) -> SparseMLP | None:
    """A model snapshot of a run: ``final``, ``seed`` or ``post_growth``; None if absent."""
    path = ckpt.model_path(run) if name == "final" else ckpt.checkpoint_path(run, name)
    return load_model(path) if path.is_file() else None


#: Keys every metrics.jsonl row has (the plots and the summary read them).
HISTORY_KEYS = ("phase", "iteration", "weights", "val_error")


def read_history(run: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl ([] when it has none).

    Raises:
        NestError: a damaged line (not a JSON object with :data:`HISTORY_KEYS`).
    """
    return ckpt.read_jsonl(ckpt.metrics_path(run), HISTORY_KEYS)
