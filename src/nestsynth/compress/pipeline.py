"""Deep Compression stages 2-3 on a finished run: share, retrain centroids, count the bytes.

``compress_run`` loads the run's final (pruned) model, measures its error, shares
each layer's weights by k-means (:mod:`.sharing`), retrains the centroids on the
run's training split, measures the error again and writes ``compression.json``
(bytes of every storage form, :mod:`.storage`) and ``model_shared.pt``.

Choices: the centroids are retrained with Adam at ``train.lr * lr_scale`` of the
run's config (annealed as ``train.schedule`` says), its batch size and its affine
augmentation if the run used it.
The retrained centroids are kept only if the validation error does not rise over
the error of the freshly shared model (decisions use validation data only; the
test error is reported, never used).  The model is evaluated on the CPU.

CNN runs (a SparseCNN model.pt) go through the same stages: every conv kernel is
shared and stored as the (out, in*k*k) matrix of its flattened kernels (see
:mod:`.storage`).  ``conv_bits`` / ``conv_index_bits`` give the conv layers their own
cluster and gap widths (Deep Compression: 8 and 8 for conv, 5 and 5 for fc); by default
every layer uses ``bits`` / ``index_bits``.  Graph runs (a SparseGraph model.pt: residual
or branched networks) go through the same stages over the graph's weight layers (its
``layers``, in graph order, named by module path): sharing per layer, centroid
retraining of the graph model, the storage count summed over those layers; the conv
layers among them take ``conv_bits``.  The dense reference's bytes are 32 bits per
weight and bias of the run's dense reference (``report.json``'s ``dense_reference``:
its weights, plus one bias per unit of every layer).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import checkpoint as ckpt
from .. import config as config_mod
from ..data import load_dataset, random_affine
from ..errors import NestError
from ..report.summary import load_run_model, save_model
from ..sparse import MaskedConv2d
from ..training import evaluate
from .sharing import SharedLayer, apply_sharing, finetune_centroids, share_weights
from .storage import storage_report

COMPRESSION_FILE = "compression.json"
SHARED_MODEL_FILE = "model_shared.pt"


def _errors(model, data, batch_size: int) -> dict:
    """Test and validation error (None for an absent split)."""
    return {name: (evaluate(model, part.X, part.y, batch_size)[0] if part is not None else None)
            for name, part in (("test", data.test), ("val", data.val))}


def _check_args(run: Path, bits: int, index_bits: int, finetune_epochs: int, lr_scale: float,
                conv_bits: int | None = None, conv_index_bits: int | None = None) -> None:
    for key, value in (("bits", bits), ("index_bits", index_bits), ("conv_bits", conv_bits),
                       ("conv_index_bits", conv_index_bits)):
        if value is None and key.startswith("conv_"):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 16:
            raise NestError(f"{key} = {value!r} is out of range; it must be an integer from 1 to 16.")
    if isinstance(finetune_epochs, bool) or not isinstance(finetune_epochs, int) or finetune_epochs < 0:
        raise NestError(f"finetune_epochs = {finetune_epochs!r} is out of range; it must be an integer >= 0.")
    if not (isinstance(lr_scale, (int, float)) and 0 < lr_scale < float("inf")):
        raise NestError(f"lr_scale = {lr_scale!r} is out of range; it must be a positive number.")
    if not run.is_dir():
        raise NestError(f"{str(run)!r} is not a directory; give the directory of a finished nestsynth run.")


def _load(run: Path):
    """(config, final model, report dict) of a finished run."""
    if not ckpt.config_path(run).is_file():  # baseline runs have no checkpoints/, only config + model
        raise NestError(f"{str(run)!r} is not a nestsynth run directory (it has no config.toml).")
    cfg = config_mod.load(ckpt.config_path(run))
    model = load_run_model(run, "final")
    if model is None:
        raise NestError(f"{str(run)!r} has no model.pt: it is not a finished nestsynth run.")
    report_file = ckpt.report_path(run)
    report = json.loads(report_file.read_text()) if report_file.is_file() else {}
    if report.get("dataset") == "user":
        raise NestError(f"{str(run)!r} was trained on data passed to the Python API, which compress "
                        "cannot reload; use nestsynth.compress functions on the model directly.")
    return cfg, model.eval(), report


def _augment(cfg, data, generator):
    d = cfg.data
    if not (d.augment and data.is_image):
        return None
    return lambda xb: random_affine(xb, generator, rotate=d.rotate, shift=d.shift,
                                    scale=(d.scale_min, d.scale_max), shear=d.shear)


def compress_run(run_dir: str | Path, bits: int = 5, index_bits: int = 5, finetune_epochs: int = 1,
                 data_dir: str | None = None, *, lr_scale: float = 1.0, conv_bits: int | None = None,
                 conv_index_bits: int | None = None) -> dict:
    """Weight sharing, centroid retraining and Huffman storage of a finished run.

    Args:
        run_dir: directory of a finished run (config.toml, checkpoints/last.pt, model.pt).
        bits: bits per weight index; ``2**bits`` clusters per layer (1..16).
        index_bits: bits per relative-index gap (1..16).
        finetune_epochs: epochs of centroid retraining on the training split.
        data_dir: where the data lives (None: the run's ``data.data_dir`` or the default).
        lr_scale: centroid learning rate relative to the run's ``train.lr``.
        conv_bits, conv_index_bits: the conv layers' ``bits`` / ``index_bits`` (None: the
            same as the other layers); recorded in the result for CNN models.

    Returns:
        The content written to ``RUN_DIR/compression.json``.

    Raises:
        NestError: a missing or unfinished run directory, or an argument out of range.
    """
    run = Path(run_dir)
    _check_args(run, bits, index_bits, finetune_epochs, lr_scale, conv_bits, conv_index_bits)
    cfg, model, report = _load(run)
    data = load_dataset(cfg.data.dataset, data_dir or cfg.data.data_dir or None,
                        val_fraction=cfg.data.val_fraction, split_seed=cfg.data.split_seed)
    eb = cfg.train.eval_batch_size
    before = _errors(model, data, eb)
    shared = share_weights(model, bits, conv_bits=conv_bits)
    apply_sharing(model, shared)
    after_share = _errors(model, data, eb)
    kept = _finetune(model, shared, cfg, data, finetune_epochs, lr_scale, after_share)
    after = _errors(model, data, eb) if kept else after_share
    storage = storage_report(model, shared, index_bits, conv_index_bits)
    result = {
        "run": str(run), "bits": bits, "index_bits": index_bits, "clusters_max": 2 ** bits,
        "finetune": {"epochs": finetune_epochs, "lr": cfg.train.lr * lr_scale, "kept": kept},
        "error": {"test_before": before["test"], "val_before": before["val"],
                  "test_shared": after_share["test"], "val_shared": after_share["val"],
                  "test_after": after["test"], "val_after": after["val"]},
        "bytes": storage["bytes"], "ratio": storage["ratio"],
        "reference": _reference(report, storage["bytes"]), "layers": storage["layers"],
    }
    if any(isinstance(layer, MaskedConv2d) for layer in model.layers):  # a CNN or a graph with convs
        result.update(conv_bits=conv_bits or bits, conv_index_bits=conv_index_bits or index_bits)
    save_model(model, run / SHARED_MODEL_FILE, report.get("model", cfg.model),
               report.get("input_shape") or list(data.input_shape))
    ckpt.atomic_write_text(run / COMPRESSION_FILE, json.dumps(result, indent=2) + "\n")
    return result


def _reference(report: dict, forms: dict) -> dict | None:
    """The dense reference (weights + biases at 32 bits) and each form's ratio to it; the
    paper's compression rates (e.g. 40x for LeNet-300-100) divide this by the final size.

    The weights are ``dense_reference.weights`` of the report when present (a CNN's
    reference: its spec's conv kernels and fc matrices), else those of the MLP of its
    widths; the biases are one per unit of every layer (``sum(widths[1:])``, units =
    conv channels and fc neurons).
    """
    ref = report.get("dense_reference") or {}
    widths = ref.get("widths")
    if not widths:
        return None
    weights = ref.get("weights")
    if weights is None:
        weights = sum(a * b for a, b in zip(widths[:-1], widths[1:]))
    dense = 4 * (int(weights) + sum(widths[1:]))
    return {"widths": list(widths), "bytes": dense,
            "ratio": {f: dense / b if b else None for f, b in forms.items()}}


def _finetune(model, shared: list[SharedLayer], cfg, data, epochs: int, lr_scale: float,
              after_share: dict) -> bool:
    """Retrain the centroids; keep them unless the validation error rose.

    Returns:
        True if the retrained centroids were kept (``model`` and ``shared`` updated).
    """
    if epochs == 0:
        return False
    gen = torch.Generator().manual_seed(cfg.seed)
    saved = [s.centroids.clone() for s in shared]
    anneal = cfg.train.min_lr_scale if cfg.train.schedule == "cosine" else None
    finetune_centroids(model, shared, data.train.X, data.train.y, epochs, cfg.train.lr * lr_scale,
                       cfg.train.batch_size, gen, _augment(cfg, data, gen), anneal)
    if data.val is None or after_share["val"] is None:
        return True
    val = evaluate(model, data.val.X, data.val.y, cfg.train.eval_batch_size)[0]
    if val <= after_share["val"]:
        return True
    for s, c in zip(shared, saved):
        s.centroids = c
    apply_sharing(model, shared)
    return False


def format_compression(result: dict) -> str:
    """A plain-text table of ``compression.json``: bytes of each storage form per layer and in total."""
    forms = list(result["bytes"])
    n = max([8] + [len(layer.get("name", "?")) + 1 for layer in result["layers"]])  # graph layers: module paths
    lines = [f"{'layer':<{n}}" + "".join(f"{f:>12}" for f in forms)]
    for layer in result["layers"]:
        lines.append(f"{layer.get('name', '?'):<{n}}" + "".join(f"{layer['bytes'][f]:>12,}" for f in forms))
    lines.append(f"{'total':<{n}}" + "".join(f"{result['bytes'][f]:>12,}" for f in forms))
    lines.append(f"{'ratio':<{n}}" + "".join(f"{result['ratio'][f]:>11.1f}x" for f in forms))
    e = result["error"]
    lines.append(f"\n{result['bits']}-bit weight sharing: test error {100 * e['test_before']:.2f}% -> "
                 f"{100 * e['test_after']:.2f}% (centroid retraining {'kept' if result['finetune']['kept'] else 'rejected'})"
                 if e.get("test_before") is not None else f"\n{result['bits']}-bit weight sharing")
    ref = result.get("reference")
    if ref:
        lines.append("against the dense reference: " + ", ".join(
            f"{f} {v:.1f}x" for f, v in (ref.get("ratio") or {}).items()))
    return "\n".join(lines)
