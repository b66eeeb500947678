"""The three operations behind the command line: export, evaluate, bench-infer.

Each accepts a SparseMLP run (a :class:`CompactMLP` artifact), a SparseCNN run (a
:class:`CompactCNN` artifact) or a SparseGraph run (a
:class:`~nestsynth.export.compact_graph.CompactGraph` artifact, dense layers).  bench-infer
times a graph export as its compact dense PyTorch model (and ONNX): CSR storage and the
generated C kernel cover chains only, which its output says.  The dense reference of a
graph run is the final model's graph with every resizable coupled group resized to the
report's reference widths, every mask full, random weights and batch norms reset, run
as a compact graph (batch norm folded).  For a CNN run the dense reference timed by bench-infer
is the registered spec of the run's model (``registry.get_model(report["model"])``)
built with the report's reference widths, or -- for a model that is not registered
(a user CNN) -- the final model's layout with those widths; its weights are random
and it runs as a compact CNN (plain convolutions, dense linear layers).  The FLOP
ratio beside the speedups divides the report's dense-reference FLOPs
(``dense_reference.flops``; computed from the reference model when the report has
none) by each variant's executed FLOPs.
"""

from __future__ import annotations

import copy
import json
import math
import platform
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import checkpoint as ckpt
from ..errors import NestError
from ..metrics import dense_flops, reference_flops
from ..graph.network import SparseGraph
from ..report.summary import load_model
from ..sparse.cnn import SparseCNN
from ..sparse.conv import MaskedConv2d
from ..sparse.mlp import SparseMLP
from .bench import measure_latency
from .ckernel import CKernel, KernelUnavailable, find_compiler
from .compact import CompactLinear, CompactMLP, compact_from_sparse, max_abs_difference
from .compact_base import SPARSE_STORAGES, STORAGES
from .compact_cnn import CompactCNN, CompactConv2d
from .compact_graph import CompactGraph, compact_graph_from_sparse
from .contract import input_contract
from .formats import (FORMATS, SUFFIX, OnnxModel, _require_onnx, artifact_files, c_artifact, format_of,
                      load_artifact, load_onnx, onnx_bytes, save_artifact)

BATCH_SIZES = (1, 64, 256)
TOLERANCE = 1e-5
COMPILE_CHECKS = ("auto", "require", "skip")


@dataclass
class Source:
    """The masked model of a run and what the run says about it."""

    model: SparseMLP | SparseCNN
    model_file: Path
    run_dir: Path | None
    name: str = "custom"
    input_shape: list | None = None
    report: dict = field(default_factory=dict)
    data_dir: str | None = None

    @property
    def dataset(self) -> str | None:
        return self.report.get("dataset")

    @property
    def reference_widths(self) -> list[int]:
        widths = (self.report.get("dense_reference") or {}).get("widths")
        return [int(w) for w in widths] if widths else self.model.widths

    @property
    def is_cnn(self) -> bool:
        return isinstance(self.model, SparseCNN)

    @property
    def is_graph(self) -> bool:
        return isinstance(self.model, SparseGraph)

    @property
    def n_inputs(self) -> int:
        """Values per input sample (MLP: the input width; CNN and graph: C x H x W)."""
        return math.prod(self.model.input_shape) if self.is_cnn or self.is_graph else self.model.widths[0]

    @property
    def sample_shape(self) -> list[int]:
        """Shape of one input sample."""
        if self.is_cnn or self.is_graph:
            return list(self.model.input_shape)
        return list(self.input_shape or [self.model.widths[0]])


def load_source(path: str | Path) -> Source:
    """The final model of a run directory (or a ``model.pt`` file given directly).

    Raises:
        NestError: not a run directory or model file.
    """
    path = Path(path)
    if path.is_dir():
        run, model_file = path, ckpt.model_path(path)
        if not model_file.is_file():
            raise NestError(f"{str(path)!r} has no model.pt: it is not a finished nestsynth run.")
    elif path.is_file():
        run, model_file = None, path
    else:
        raise NestError(f"{str(path)!r} does not exist.")
    blob = ckpt.safe_load(model_file)
    model = load_model(model_file).eval()
    src = Source(model, model_file, run, name=str(blob.get("name") or "custom"),
                 input_shape=list(blob["input_shape"]) if blob.get("input_shape") else None)
    if run is not None and ckpt.report_path(run).is_file():
        try:
            src.report = json.loads(ckpt.report_path(run).read_text())
        except json.JSONDecodeError:
            raise NestError(f"{str(ckpt.report_path(run))!r} is not valid JSON.") from None
        if not src.input_shape and src.report.get("input_shape"):
            src.input_shape = list(src.report["input_shape"])
    if (src.is_cnn or src.is_graph) and not src.input_shape:
        src.input_shape = list(model.input_shape)
    if run is not None and ckpt.config_path(run).is_file():
        try:
            from .. import config as config_mod

            src.data_dir = config_mod.load(ckpt.config_path(run)).data.data_dir or None
        except NestError:
            pass
    return src


def _test_set(dataset: str | None, data_dir: str | None):
    from ..data import load_dataset

    if not dataset:
        raise NestError("no data set is known for this model; pass --dataset (mnist, digits or npz:PATH).")
    bundle = load_dataset(dataset, data_dir, val_fraction=0.0)
    if bundle.test is None:
        raise NestError(f"data set {dataset!r} has no test part to evaluate on.")
    return bundle.test


@torch.inference_mode()
def _error(model, X: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> int:
    wrong = 0
    for start in range(0, X.shape[0], batch_size):
        wrong += int((model(X[start:start + batch_size]).argmax(1) != y[start:start + batch_size]).sum())
    return wrong


def _check_width(n_inputs: int, X: torch.Tensor, what: str) -> None:
    if X[0].numel() != n_inputs:
        raise NestError(f"the data set's samples have {X[0].numel()} values but {what} expects {n_inputs}.")


@torch.inference_mode()
def _check_classes(model, X: torch.Tensor, y: torch.Tensor, dataset: str, what: str) -> None:
    """Refuse a test set with labels the model has no output for."""
    outputs = int(model(X[:1]).shape[1])
    top = int(y.max())
    if top >= outputs:
        raise NestError(f"data set {dataset!r} has labels up to {top} ({top + 1} classes) but {what} has "
                        f"{outputs} outputs; evaluate it on the data set it was trained on (--dataset).")


@contextmanager
def _torch_threads(threads: int | None):
    """Run the block with ``threads`` intra-op threads (None: unchanged), then restore."""
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _sizes(paths) -> dict:
    return {str(p): p.stat().st_size for p in paths if p.is_file()}


# ---------------------------------------------------------------------------- export


@torch.inference_mode()
def _max_abs_output(model, X: torch.Tensor, batch_size: int = 1024) -> float:
    return max(float(model(X[i:i + batch_size]).abs().max()) for i in range(0, len(X), batch_size))


def dense_fallback(masked, compact, decisions: list[dict], X: torch.Tensor, tolerance: float,
                   diff: float) -> tuple[float, list[str]]:
    """``--sparse auto``: store sparse (CSR or C) layers dense again until the export check passes.

    A sparse product sums each output in another order than the dense product of the
    masked model, so on a layer with long rows the float32 rounding alone can reach
    the tolerance.  ``auto`` picks the fastest storage *that passes the check*: sparse
    layers are switched back to dense, the most non-zeros (the longest sums) first,
    until the outputs agree within ``tolerance``.  ``compact.layers`` and ``decisions``
    (the per-layer records, indexed like the layers) are updated in place.

    Returns:
        (the new max difference, names of the layers switched to dense).
    """

    sparse = sorted((j for j, layer in enumerate(compact.layers) if layer.storage != "dense"),
                    key=lambda j: (-compact.layers[j].nnz, j))
    switched = []
    for j in sparse:
        layer = compact.layers[j]
        reason = (f"{layer.choice.get('reason', layer.storage)}; stored dense instead: with {layer.storage} the "
                  f"outputs differed from the masked model's by {diff:.3g} (tolerance {tolerance:g})")
        compact.layers[j] = layer.as_dense({**layer.choice, "storage": "dense", "reason": reason,
                                            "csr_fallback": True})
        compact.reset_kernels()
        decisions[j].update(storage="dense", reason=reason, csr_fallback=True)
        switched.append(decisions[j].get("name", f"fc{j + 1}"))
        diff = max_abs_difference(masked, compact, X)
        if diff < tolerance:
            break
    return diff, switched


def _check_c(masked, compact, source: str, X: torch.Tensor, compile_check: str, result: dict) -> float:
    """Compile the C artifact's text as a library and compare it with the masked model (``--format c``).

    Records ``max_abs_diff_c_vs_masked`` and ``c_compiled`` (the flags) in ``result``, or
    ``c_check`` (why it was not compiled).  Returns the difference (0 when not compiled).

    Raises:
        NestError: ``compile_check == "require"`` and the source does not compile.
    """
    if compile_check == "skip":
        result["c_check"] = "skipped (--compile-check skip)"
        return 0.0
    try:
        kernel = CKernel(compact.layers, compact.raw_input_shape(), compact.input_index, source=source)
    except KernelUnavailable as exc:
        if compile_check == "require":
            raise NestError(f"the C export does not compile: {exc}") from None
        result["c_check"] = f"not compiled: {exc}"
        return 0.0
    result["c_compiled"] = " ".join(kernel.flags)
    result["max_abs_diff_c_vs_masked"] = max_abs_difference(masked, kernel, X)
    return result["max_abs_diff_c_vs_masked"]


def export_run(run: str | Path, fmt: str = "pytorch", sparse: str = "auto", out: str | Path | None = None,
               batch_size: int = 1, dataset: str | None = None, data_dir: str | None = None,
               tolerance: float = TOLERANCE, check: str = "test", threads: int | None = None,
               compile_check: str = "auto") -> dict:
    """Export a run's final model as a compact artifact, after checking it against the masked model.

    The check runs the masked model and the compact one (for ONNX: in onnxruntime; for
    C: the written source compiled as a library) on the test set (``check="test"``) or
    on 2048 uniform random inputs (``"random"``) and refuses to write the artifact when
    their outputs differ by ``tolerance`` or more.  ``compile_check`` (``--format c``):
    ``auto`` compiles when a C compiler is found and records why not otherwise,
    ``require`` refuses to export without one, ``skip`` does not compile.

    Returns:
        The export report (also written next to the artifact as ``ARTIFACT.export.json``).

    Raises:
        NestError: bad option, unreadable run or data, or a failed check.
    """
    if fmt not in FORMATS:
        raise NestError(f"unknown export format {fmt!r}; valid: {', '.join(FORMATS)}.")
    if sparse not in ("auto",) + STORAGES:
        raise NestError(f"unknown --sparse mode {sparse!r}; valid: auto, {', '.join(STORAGES)}.")
    if batch_size < 1:
        raise NestError(f"--batch-size must be at least 1, got {batch_size}.")
    if fmt == "onnx" and sparse in SPARSE_STORAGES:
        raise NestError(f"ONNX export is dense only (ONNX runtimes execute no sparse matrices); use --sparse "
                        f"auto or dense, or --format pytorch/safetensors for {sparse} layers.")
    if check not in ("test", "random"):
        raise NestError(f"unknown --check {check!r}; valid: test, random.")
    if compile_check not in COMPILE_CHECKS:
        raise NestError(f"unknown --compile-check {compile_check!r}; valid: {', '.join(COMPILE_CHECKS)}.")
    if fmt == "onnx":
        _require_onnx()
    if fmt == "c" and compile_check == "require":
        try:
            find_compiler()
        except KernelUnavailable as exc:
            raise NestError(f"--compile-check require: {exc}") from None
    if out:  # before any work
        if Path(out).suffix.lower() != SUFFIX[fmt]:
            raise NestError(f"--out {str(out)!r} must end in {SUFFIX[fmt]} for --format {fmt}.")
        ckpt.check_can_write(Path(out), "--out")
    src = load_source(run)
    path = Path(out) if out else (src.run_dir or src.model_file.parent) / "export" / f"compact{SUFFIX[fmt]}"
    ckpt.check_can_write(path, "--out" if out else "the export folder")
    with _torch_threads(threads):
        started = time.perf_counter()
        storage = "dense" if fmt in ("onnx", "c") else sparse  # the C file runs every layer in C anyway
        meta = {"name": src.name, "dataset": dataset or src.dataset, "data_dir": data_dir or src.data_dir,
                "source_run": str(src.run_dir.resolve()) if src.run_dir else None,
                "source_model": str(src.model_file.resolve()), "reference_widths": src.reference_widths,
                "masked_widths": src.model.widths,
                "activations": None if src.is_graph else list(src.model.activation_specs),
                "test_error_masked_report": src.report.get("test_error"),
                "input_contract": input_contract(dataset or src.dataset, src.sample_shape)}
        compact, info = compact_from_sparse(src.model, storage, batch_size, src.input_shape, meta)
        if check == "test":
            test = _test_set(meta["dataset"], meta["data_dir"])
            X, y = test.X, test.y
        else:
            g = torch.Generator().manual_seed(0)
            X, y = torch.rand(2048, *src.sample_shape, generator=g), None
        _check_width(src.n_inputs, X, "the model")
        if y is not None:
            _check_classes(src.model, X, y, meta["dataset"], "the model")
        result = {"artifact": None, "format": fmt, "sparse": sparse, "check_inputs": check,
                  "check_samples": int(X.shape[0]), "tolerance": tolerance, **info}
        diff = max_abs_difference(src.model, compact, X)
        if diff >= tolerance and storage == "auto" and set(compact.storages()) - {"dense"}:
            result["max_abs_diff_with_csr"] = diff
            diff, result["csr_fallback"] = dense_fallback(src.model, compact, info["layers"], X, tolerance, diff)
        result["max_abs_diff"] = diff
        data = None
        if fmt == "onnx":
            data = onnx_bytes(compact)
            runner = OnnxModel(data, threads=threads)
            result["max_abs_diff_onnx_vs_masked"] = max_abs_difference(src.model, runner, X)
            result["max_abs_diff_onnx_vs_pytorch"] = max_abs_difference(compact, runner, X)
            diff = max(diff, result["max_abs_diff_onnx_vs_masked"])
        if fmt == "c":
            data = c_artifact(compact)
            diff = max(diff, _check_c(src.model, compact, data, X, compile_check, result))
        if y is not None:
            result["test_error_masked"] = _error(src.model, X, y) / len(y)
            result["test_error_compact"] = _error(compact, X, y) / len(y)
        result["check_passed"] = bool(diff < tolerance)
        if not result["check_passed"]:
            top = _max_abs_output(src.model, X)
            t32 = torch.tensor(top, dtype=torch.float32)
            spacing32 = float(torch.nextafter(t32, torch.tensor(math.inf)) - t32)  # float32 step at |y| = top
            raise NestError(f"export check failed: the compact model's outputs differ from the masked model's "
                            f"by up to {diff:.3g} (tolerance {tolerance:g}; the outputs reach {top:.3g}, where "
                            f"float32 numbers are {spacing32:.2g} apart, so this is {diff / spacing32:.0f} "
                            f"float32 steps); nothing was written. --tolerance sets the bound.")
        if fmt in ("onnx", "c"):  # write exactly what was checked
            ckpt.atomic_write_bytes(path, data if fmt == "onnx" else data.encode())
            files = [path]
        else:
            files = save_artifact(compact, path, fmt)
        result["artifact"] = str(path)
        result["files"] = _sizes(files)
        result["source_model_bytes"] = src.model_file.stat().st_size
        result["nnz_flops"] = compact.nonzero_flops()
        result["executed_flops"] = {"onnx": compact.dense_flops(), "c": compact.nonzero_flops()}.get(
            fmt, compact.executed_flops())
        result["input_contract"] = meta["input_contract"]
        result["seconds"] = round(time.perf_counter() - started, 3)
        result["threads"] = torch.get_num_threads()
        report_file = path.with_name(path.name + ".export.json")  # compact.pt.export.json
        ckpt.atomic_write_text(report_file, json.dumps(result, indent=2) + "\n")
        result["report_file"] = str(report_file)
        return result


def format_export(result: dict) -> str:
    lines = [f"{'layer':<7}{'in':>6}{'out':>6}{'nnz':>8}{'density':>9}  storage  reason"]
    for d in result["layers"]:
        nnz = d.get("nnz", round(d["density"] * d["in"] * d["out"]))
        name = d.get("name", f"fc{d['layer'] + 1}")
        lines.append(f"{name:<7}{d['in']:>6}{d['out']:>6}{nnz:>8}{d['density']:>9.3f}  "
                     f"{d['storage']:<8} {d['reason']}")
    removed = result["removed_neurons"]
    lines.append(f"widths {'-'.join(map(str, result['widths_masked']))} -> "
                 f"{'-'.join(map(str, result['widths_compact']))} (inputs read {result['inputs_read']} of "
                 f"{result['inputs']}; hidden neurons removed: dead {removed['dead']}, constant folded "
                 f"{removed['constant_folded']})" + (" [conv layers: feature maps, inputs: channels]"
                                                      if "area_masks" in result else ""))
    if "area_masks" in result:
        lines.append("partial-area masks kept on " + (", ".join(
            f"conv{i + 1}" for i, a in enumerate(result["area_masks"]) if a) or "no conv layer") +
            "; offset maps (folded constants / BN of masked positions) on " + (", ".join(
                f"conv{i + 1}" for i, o in enumerate(result["offset_maps"]) if o) or "no conv layer"))
    norms = result.get("batch_norm")  # a graph export
    if norms and (norms["folded"] or norms["kept"]):
        lines.append(f"batch norm folded into the layer before it: {', '.join(norms['folded']) or 'none'}"
                     + (f"; kept (folding would not be exact): {', '.join(norms['kept'])}" if norms["kept"]
                        else ""))
    what = "test set" if result["check_inputs"] == "test" else "random inputs"
    lines.append(f"check on {result['check_samples']} {what}: max |compact - masked| = "
                 f"{result['max_abs_diff']:.3g}" +
                 (f", ONNX (onnxruntime) vs masked {result['max_abs_diff_onnx_vs_masked']:.3g}, vs PyTorch "
                  f"{result['max_abs_diff_onnx_vs_pytorch']:.3g}" if "max_abs_diff_onnx_vs_masked" in result
                  else "") + f" (< {result['tolerance']:g}: ok)")
    if result.get("csr_fallback"):
        lines.append(f"with sparse storage the difference was {result['max_abs_diff_with_csr']:.3g}: stored dense "
                     "instead: " + ", ".join(result["csr_fallback"]))
    if "max_abs_diff_c_vs_masked" in result:
        lines.append(f"C source compiled (cc {result['c_compiled']}): max |C - masked| = "
                     f"{result['max_abs_diff_c_vs_masked']:.3g}")
    elif result.get("c_check"):
        lines.append(f"C source {result['c_check']}")
    contract = result.get("input_contract") or {}
    if contract:
        lines.append(f"input contract: shape {contract['shape']}, {contract['scaling']}" +
                     (f", mean {contract['mean']}, std {contract['std']}" if contract.get("mean") else ""))
    if "test_error_compact" in result:
        lines.append(f"test error: masked {100 * result['test_error_masked']:.2f}%, compact "
                     f"{100 * result['test_error_compact']:.2f}%")
    for p, size in result["files"].items():
        lines.append(f"wrote {p} ({size:,} bytes; masked model.pt {result['source_model_bytes']:,} bytes)")
    lines.append(f"report: {result['report_file']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- evaluate


def evaluate_artifact(path: str | Path, dataset: str | None = None, data_dir: str | None = None,
                      batch_size: int = 1024) -> dict:
    """Test error of an exported model (any format)."""
    path = Path(path)
    model = load_artifact(path)
    meta = model.meta
    dataset = dataset or meta.get("dataset")
    if not data_dir and meta.get("data_dir") and Path(meta["data_dir"]).is_dir():
        data_dir = meta["data_dir"]
    test = _test_set(dataset, data_dir)
    n_inputs = model.n_inputs if isinstance(model, (CompactMLP, CompactCNN, CompactGraph)) else (
        model.arch.get("n_inputs")
                                                                     or test.X[0].numel())
    _check_width(int(n_inputs), test.X, str(path))
    _check_classes(model, test.X, test.y, dataset, str(path))
    wrong = _error(model, test.X, test.y, batch_size)
    return {"artifact": str(path), "format": format_of(path), "dataset": dataset, "samples": len(test.y),
            "errors": wrong, "test_error": wrong / len(test.y)}


# ---------------------------------------------------------------------------- bench-infer


def reference_cnn(src: Source, seed: int = 0) -> SparseCNN:
    """The run's dense reference CNN (random weights, eval mode).

    The registered spec named by the run (``src.name`` / ``report["model"]``) built with
    the reference widths when it is a CNN spec of the same depth and input size;
    otherwise the final model's layout (:meth:`SparseCNN.arch`) with those widths.
    """
    from ..registry import CNNSpec, get_model

    widths, g = src.reference_widths, torch.Generator().manual_seed(seed)
    model = src.model
    try:
        spec = get_model(src.report.get("model") or src.name)
    except NestError:
        spec = None
    if isinstance(spec, CNNSpec) and len(spec.widths) == len(widths) and \
            tuple(spec.input_shape[1:]) == tuple(model.input_shape[1:]):
        return spec.build(g, widths=widths).eval()
    if len(widths) != len(model.widths):
        raise NestError(f"the run's reference widths {widths} do not fit the layout of its final model "
                        f"({len(model.widths)} widths).")
    arch = model.arch()
    arch["input_shape"] = [int(widths[0]), *arch["input_shape"][1:]]
    for i, spec_dict in enumerate(arch["conv"] + arch["fc"]):
        spec_dict["out"] = int(widths[i + 1])
    ref = SparseCNN(arch["input_shape"], arch["conv"], arch["fc"], arch["batch_norm"], g)
    return ref.eval()


def dense_reference_cnn(src: Source, seed: int = 0) -> tuple[CompactCNN, int, int]:
    """(dense reference as a compact CNN, its dense FLOPs, its fp32 weight+bias bytes) for timing.

    Every layer is kept as it is (nothing to remove in a dense random network): plain
    convolutions without area masks, dense linear layers, batch norm folded.
    """
    ref = reference_cnn(src, seed)
    layers = []
    for i, layer in enumerate(ref.layers):
        w, b = ref.folded_layer(i)
        act = ref.activation_specs[i] if i < ref.n_hidden else None
        if ref.is_conv(i):
            layers.append(CompactConv2d(w, b, layer.stride, layer.padding, layer.out_hw, activation=act,
                                        pool=ref.conv_specs[i]["pool"], choice={"storage": "dense"}))
        else:
            layers.append(CompactLinear(w, b, "dense", act, {"storage": "dense"}))
    size = 4 * sum(layer.weight.numel() + layer.bias.numel() for layer in ref.layers)
    return CompactCNN(layers, ref.input_shape).eval(), reference_flops(ref), size


def reference_graph(src: Source, seed: int = 0) -> SparseGraph:
    """The run's dense reference graph network (random weights, eval mode): the final model's
    graph with every resizable coupled group resized to the reference widths (units added
    by :meth:`SparseGraph.add_units`, or the last ones removed), every weight and area mask
    full, weights drawn again and batch norms reset.

    Raises:
        NestError: the reference widths do not fit the final model's layout.
    """
    widths, g = src.reference_widths, torch.Generator().manual_seed(seed)
    ref = copy.deepcopy(src.model)
    if len(widths) == len(ref.widths):
        for members in [group.members for group in ref.groups() if group.resizable]:
            group = ref.graph.group_of(members[0])  # as it is now
            target = int(widths[1 + ref.layer_names.index(members[0])])
            if target > group.units:
                ref.add_units(group, target - group.units, generator=g)
            elif target < group.units:
                ref.remove_units(group, torch.arange(group.units) < target)
    if list(ref.widths) != [int(w) for w in widths]:
        raise NestError(f"the run's reference widths {widths} do not fit the layout of its final model "
                        f"(widths {src.model.widths}).")
    with torch.no_grad():
        for layer in ref.layers:
            layer.mask.fill_(1)
            if isinstance(layer, MaskedConv2d):
                layer.area.fill_(1)
    ref.reset_parameters(g)
    return ref.eval()


def dense_reference_graph(src: Source, seed: int = 0) -> tuple[CompactGraph, int, int]:
    """(dense reference as a compact graph, its dense FLOPs, its fp32 weight+bias bytes) for timing."""
    ref = reference_graph(src, seed)
    compact, _ = compact_graph_from_sparse(ref)
    size = 4 * sum(layer.weight.numel() + layer.bias.numel() for layer in ref.layers)
    return compact, reference_flops(ref), size


def dense_reference_model(widths, activations, input_shape=None, seed: int = 0) -> CompactMLP:
    """A dense inference MLP of the reference widths (random weights; for timing only)."""
    g = torch.Generator().manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        bound = 1.0 / a ** 0.5
        w = (torch.rand(b, a, generator=g) * 2 - 1) * bound
        act = activations[i] if i < len(widths) - 2 else None
        layers.append(CompactLinear(w, torch.zeros(b), "dense", act, {"storage": "dense"}))
    return CompactMLP(layers, input_shape, None, widths[0]).eval()


def _onnx_available() -> bool:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        return True
    except ImportError:
        return False


def _bits_text(deep: dict) -> str:
    conv = deep.get("conv_bits")
    return f"{deep['bits']} bits" + (f", conv {conv} bits" if conv and conv != deep["bits"] else "")


def deep_compression_sizes(run_dir: Path | None) -> dict | None:
    """The Deep Compression stage of a run (``nestsynth compress``), when it was applied:
    bytes of each storage form, the Huffman-coded size against the dense reference and
    the test error after weight sharing; None when the run has no ``compression.json``."""
    from ..compress.pipeline import COMPRESSION_FILE, SHARED_MODEL_FILE

    if run_dir is None or not (Path(run_dir) / COMPRESSION_FILE).is_file():
        return None
    try:
        c = json.loads((Path(run_dir) / COMPRESSION_FILE).read_text())
        shared = Path(run_dir) / SHARED_MODEL_FILE
        return {"bits": c["bits"], "conv_bits": c.get("conv_bits"), "bytes": dict(c["bytes"]),
                "huffman_ratio_vs_dense_reference": (c.get("reference") or {}).get("ratio", {}).get("huffman"),
                "test_error_after": c["error"]["test_after"], "file": SHARED_MODEL_FILE,
                "file_bytes": shared.stat().st_size if shared.is_file() else None}
    except (ValueError, KeyError, TypeError, OSError):
        raise NestError(f"{str(Path(run_dir) / COMPRESSION_FILE)!r} is not a readable compression report; "
                        "run `nestsynth compress` again.") from None


def _c_variant(compact, shape) -> tuple[list[tuple], str | None]:
    """(the bench-infer row of the compact model with every layer in generated C, or none; why none)."""
    in_c = compact.in_c()
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the reason is returned instead
        in_c(torch.zeros(1, *shape))                     # builds the kernel (cached by its source's hash)
    if in_c.kernel_status:
        return [], f"skipped: {in_c.kernel_status}"
    flags = " ".join(next(seg[2] for seg in in_c.segments() if seg[2] is not None).flags)
    return [("compact, C kernel", in_c, in_c.executed_flops(), compact.widths,
             f"every layer in one generated C function, cc {flags}")], None


def bench_inference(artifact: str | Path, run: str | Path | None = None, onnx: str | Path | None = None,
                    batch_sizes=BATCH_SIZES, repeats: int = 30, warmup: int = 10, threads: int = 1,
                    out: str | Path | None = None) -> dict:
    """Latency of the dense reference, the masked, the compact and the ONNX model; writes inference.json.

    Args:
        artifact: a compact ``.pt`` or ``.safetensors`` model from ``nestsynth export``.
        run: the run directory with the masked model (default: the one the artifact records).
        onnx: an ``.onnx`` export to time (default: a sibling ``.onnx`` file, else the
            artifact converted in memory); skipped when onnxruntime is not installed.
        threads: intra-op threads for PyTorch and onnxruntime.
        out: where to write the JSON (default: ``inference.json`` beside the artifact).
    """
    artifact = Path(artifact)
    if format_of(artifact) == "onnx":
        raise NestError("bench-infer takes the PyTorch or safetensors artifact; pass the ONNX file with --onnx.")
    if threads < 1:
        raise NestError(f"--threads must be at least 1, got {threads}.")
    if repeats < 3:
        raise NestError(f"--repeats must be at least 3, got {repeats}.")
    ckpt.check_can_write(Path(out) if out else artifact.parent / "inference.json", "--out")
    compact = load_artifact(artifact)
    graph = isinstance(compact, CompactGraph)
    run = run or compact.meta.get("source_run") or compact.meta.get("source_model")
    if not run:
        raise NestError(f"{str(artifact)!r} does not record its run; pass --run RUN_DIR.")
    src = load_source(run)
    if src.is_cnn != isinstance(compact, CompactCNN) or src.is_graph != graph or \
            src.n_inputs != compact.n_inputs or src.model.widths[-1] != compact.widths[-1]:
        raise NestError(f"the run {str(run)!r} does not hold the model {str(artifact)!r} was exported from.")
    shape = compact.input_shape or src.input_shape or [compact.n_inputs]
    ref_widths = src.reference_widths
    if graph or src.is_cnn:
        reference, ref_model_flops, ref_bytes = (dense_reference_graph if graph else dense_reference_cnn)(src)
        ref_flops = int((src.report.get("dense_reference") or {}).get("flops") or ref_model_flops)
        masked_flops = reference_flops(src.model)
        masked_note = f"{type(src.model).__name__}: dense conv/matmul of W*mask, area masks, batch norm"
    else:
        reference = dense_reference_model(ref_widths, src.model.activation_specs, shape)
        ref_model_flops = ref_flops = dense_flops(ref_widths)
        ref_bytes = 4 * sum(a * b + b for a, b in zip(ref_widths[:-1], ref_widths[1:]))
        masked_flops, masked_note = dense_flops(src.model.widths), "SparseMLP: dense matmul of W*mask, batch norm"

    with _torch_threads(threads):
        variants = [("dense reference", reference, ref_model_flops, ref_widths,
                     "random weights" + (", compact graph (batch norm folded)" if graph else "")),
                    ("masked", src.model, masked_flops, src.model.widths, masked_note),
                    ("compact (PyTorch)", compact, compact.executed_flops(), compact.widths,
                     "storage " + "/".join(compact.storages()))]
        if set(compact.storages()) - {"dense"}:
            variants.append(("compact, all dense", compact.densified(), compact.dense_flops(),
                             compact.widths, "same widths, no CSR"))
        c_note = None
        if graph:
            c_note = ("skipped: the generated C kernel and CSR storage cover MLP and sequential CNN exports only; "
                      "this graph network is timed as its compact dense PyTorch model")
        elif set(compact.storages()) != {"ckernel"}:
            rows_c, c_note = _c_variant(compact, shape)
            variants += rows_c
        onnx_file, onnx_note = None, None
        if _onnx_available():
            if onnx:
                onnx_file = Path(onnx)
                runner = load_onnx(onnx_file, threads)
            else:
                sibling = artifact.with_suffix(".onnx")
                if sibling.is_file():
                    onnx_file = sibling
                    runner = OnnxModel(sibling.read_bytes(), threads)
                else:
                    runner = OnnxModel(onnx_bytes(compact), threads)
                    onnx_note = "converted in memory from the artifact"
            variants.append(("ONNX (onnxruntime)", runner, compact.dense_flops(), compact.widths,
                             onnx_note or f"{onnx_file}"))
        else:
            onnx_note = "skipped: onnxruntime not installed (pip install 'nestsynth[onnx]')"
        nnz_flops = compact.nonzero_flops()
        g = torch.Generator().manual_seed(0)
        inputs = {b: torch.rand(b, *shape, generator=g) for b in batch_sizes}
        rows = []
        for name, model, flops, widths, note in variants:
            row = {"name": name, "widths": list(widths), "executed_flops": int(flops),
                   "flop_ratio": ref_flops / max(flops, 1), "note": note, "latency": {}}
            if getattr(model, "kernel_status", None):
                row["note"] += f"; {model.kernel_status}"
            for b in batch_sizes:
                x = inputs[b]
                if isinstance(model, OnnxModel):
                    xn = x.reshape(b, *(model.input_shape or [-1])).numpy()
                    fn = (lambda m=model, xn=xn: m.run_numpy(xn))
                else:
                    fn = (lambda m=model, x=x: m(x))
                row["latency"][str(b)] = lat = measure_latency(fn, warmup=warmup, repeats=repeats)
                lat["gflops"] = flops * b / (lat["median_ms"] * 1e6)
            if name != "dense reference":
                with torch.inference_mode():
                    x = inputs[batch_sizes[-1]]
                    row["max_abs_diff_vs_masked"] = float((model(x) - src.model(x)).abs().max())
            rows.append(row)
        base = rows[0]["latency"]
        for row in rows:
            for b in batch_sizes:
                lat = row["latency"][str(b)]
                lat["speedup"] = base[str(b)]["median_ms"] / lat["median_ms"]
        files = {"masked model.pt": src.model_file.stat().st_size}
        for f in artifact_files(artifact):
            files[f.name] = f.stat().st_size
        for suffix in (".pt", ".safetensors", ".onnx"):
            sib = artifact.with_suffix(suffix)
            if sib != artifact and sib.is_file():
                for f in artifact_files(sib):
                    files[f.name] = f.stat().st_size
        if onnx_file is not None and onnx_file.is_file():
            files[onnx_file.name] = onnx_file.stat().st_size
        files["dense reference (fp32 weights+biases, computed)"] = ref_bytes
        deep = deep_compression_sizes(src.run_dir)
        if deep is not None:
            files[deep["file"]] = deep["file_bytes"]
            files[f"Deep Compression, Huffman-coded ({_bits_text(deep)}, computed)"] = deep["bytes"]["huffman"]
        result = {"artifact": str(artifact), "run": str(run), "input_shape": list(shape),
                  "batch_sizes": list(batch_sizes), "threads": int(threads), "repeats": repeats,
                  "warmup": warmup,
                  "flops": {"dense_reference": ref_flops, "nonzero": nnz_flops,
                            "nonzero_ratio": ref_flops / max(nnz_flops, 1)},
                  "storage": compact.specs(),
                  "onnx": onnx_note, "ckernel": c_note, "variants": rows, "file_bytes": files, "deep_compression": deep,
                  "environment": {"torch": torch.__version__, "python": platform.python_version(),
                                  "machine": platform.machine(), "processor": platform.processor()}}
        if _onnx_available():
            import onnxruntime

            result["environment"]["onnxruntime"] = onnxruntime.__version__
        path = Path(out) if out else artifact.parent / "inference.json"
        ckpt.atomic_write_text(path, json.dumps(result, indent=2) + "\n")
        result["output_file"] = str(path)
        return result


def format_inference_table(result: dict) -> str:
    """The latency table: median ms [IQR] and speedup per batch size, with the FLOP ratio."""
    bs = result["batch_sizes"]
    head = f"{'model':<20}{'FLOPs':>9}{'FLOP ratio':>11}" + "".join(
        f"{'batch ' + str(b) + ': ms [IQR] speedup':>34}" for b in bs)
    lines = [head]
    for row in result["variants"]:
        lines.append(f"{row['name']:<20}{row['executed_flops']:>9}{row['flop_ratio']:>10.1f}x" + "".join(
            f"{row['latency'][str(b)]['median_ms']:>13.4f} [{row['latency'][str(b)]['iqr_ms']:.4f}]"
            f"{row['latency'][str(b)]['speedup']:>9.2f}x" for b in bs))
    fl = result["flops"]
    lines.append(f"FLOPs = multiply-adds actually executed x2; non-zero-weight FLOPs {fl['nonzero']} "
                 f"({fl['nonzero_ratio']:.1f}x fewer than the dense reference's {fl['dense_reference']}). "
                 f"{result['threads']} thread(s), {result['repeats']} repeats after warm-up.")
    if result.get("onnx"):
        lines.append(f"ONNX: {result['onnx']}")
    if result.get("ckernel"):
        lines.append(f"C kernel: {result['ckernel']}")
    lines.append("file sizes: " + ", ".join(f"{k} {v:,} B" for k, v in result["file_bytes"].items()
                                            if v is not None))
    deep = result.get("deep_compression")
    if deep:
        ratio = deep.get("huffman_ratio_vs_dense_reference")
        lines.append(f"Deep Compression ({_bits_text(deep)}): " + ", ".join(
            f"{k} {v:,} B" for k, v in deep["bytes"].items()) + (f"; Huffman {ratio:.1f}x below the dense "
                                                                 f"reference" if ratio else "") +
            f"; test error after sharing {100 * deep['test_error_after']:.2f}%")
    lines.append(f"written: {result['output_file']}")
    return "\n".join(lines)
