"""Writing and reading compact-model artifacts; nothing here executes code on load.

* ``pytorch`` (``.pt``): ``{"format", "version", "arch", "tensors"}`` -- plain data and
  dense tensors only (CSR layers as their three index/value tensors), read with
  ``torch.load(..., weights_only=True)``.
* ``safetensors`` (``.safetensors``) with a JSON sidecar (same name, ``.json``) holding
  the architecture; the architecture is also in the safetensors metadata.
* ``onnx`` (``.onnx``): the compact network with every layer **dense** (ONNX has no
  sparse-matrix operator that runtimes execute as such), the architecture as JSON in
  the model's metadata (key ``nestsynth``).  Needs the ``onnx`` extra.
* ``c`` (``.c``): dependency-free C source of the forward pass (:func:`c_artifact`),
  written only; it is not read back.

Each artifact records the input contract (shape, scaling, normalization; see
:mod:`.contract`) from the architecture's ``meta["input_contract"]``: the ``.pt`` dict
and the safetensors metadata under ``input_contract``, ONNX ``metadata_props`` key
``input_contract``, the C file's comment block and ``NEST_INPUT_*`` defines.

Each format holds a :class:`CompactMLP`, a :class:`CompactCNN` or a :class:`CompactGraph`;
the architecture's ``kind`` (``"sequential"`` / ``"cnn"`` / ``"graph"``) picks the class on
load (:func:`compact_from_state`).
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import torch

from .. import checkpoint as ckpt
from ..errors import NestError
from .ckernel import c_source, plan_layers
from .compact import FORMAT, CompactMLP
from .compact_cnn import KIND as CNN_KIND
from .compact_cnn import CompactCNN
from .compact_graph import KIND as GRAPH_KIND
from .compact_graph import CompactGraph
from .contract import contract_lines

FORMATS = ("pytorch", "safetensors", "onnx", "c")
SUFFIX = {"pytorch": ".pt", "safetensors": ".safetensors", "onnx": ".onnx", "c": ".c"}
ONNX_OPSET = 17


def format_of(path: Path) -> str:
    """The artifact format named by a file's suffix.

    Raises:
        NestError: unknown suffix.
    """
    for name, suffix in SUFFIX.items():
        if path.suffix.lower() == suffix:
            return name
    raise NestError(f"{str(path)!r} is not a model artifact: expected a .pt, .safetensors or .onnx file "
                    "(or a .c export).")


def sidecar_path(path: Path) -> Path:
    return path.with_suffix(".json")


def _require_onnx():
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        raise NestError("ONNX needs the onnx and onnxruntime packages: pip install 'nestsynth[onnx]'.") from None


def compact_from_state(arch, tensors: dict) -> CompactMLP | CompactCNN:
    """Rebuild a compact model from its architecture and tensors (the class by ``arch["kind"]``).

    Raises:
        NestError: not a compact model, or tensors that do not match the architecture.
    """
    if isinstance(arch, dict) and arch.get("kind") == CNN_KIND:
        return CompactCNN.from_state(arch, tensors)
    if isinstance(arch, dict) and arch.get("kind") == GRAPH_KIND:
        return CompactGraph.from_state(arch, tensors)
    return CompactMLP.from_state(arch, tensors)


# ---------------------------------------------------------------------------- pytorch


def save_pytorch(model: CompactMLP | CompactCNN, path: Path) -> None:
    ckpt.atomic_torch_save({"format": FORMAT, "version": 1, "arch": model.arch(),
                            "input_contract": model.meta.get("input_contract"),
                            "tensors": {k: v.detach().cpu() for k, v in model.tensors().items()}}, path)


def load_pytorch(path: Path) -> CompactMLP | CompactCNN:
    """Load a ``.pt`` compact model with ``weights_only=True``.

    Raises:
        NestError: missing file, a file that would run code, or not a compact model.
    """
    blob = ckpt.safe_load(path)
    if not isinstance(blob, dict) or blob.get("format") != FORMAT or "arch" not in blob or "tensors" not in blob:
        raise NestError(f"{str(path)!r} is not a nestsynth compact model (export one with nestsynth export).")
    return compact_from_state(blob["arch"], blob["tensors"])


# ---------------------------------------------------------------------------- safetensors


def save_safetensors(model: CompactMLP | CompactCNN, path: Path) -> Path:
    """Write ``path`` and its JSON sidecar; returns the sidecar's path."""
    from safetensors.torch import save

    arch = model.arch()
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.tensors().items()}
    data = save(tensors, metadata={"format": FORMAT, "arch": json.dumps(arch),
                                   "input_contract": json.dumps(model.meta.get("input_contract"))})
    side = sidecar_path(path)
    ckpt.atomic_write_bytes(path, data)
    ckpt.atomic_write_text(side, json.dumps({"format": FORMAT, "version": 1, "weights": path.name,
                                             "arch": arch}, indent=2) + "\n")
    return side


def load_safetensors(path: Path) -> CompactMLP | CompactCNN:
    """Load ``.safetensors`` + sidecar JSON (the metadata copy when the sidecar is absent).

    Raises:
        NestError: missing or unreadable file, or not a compact model.
    """
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise NestError(f"{str(path)!r} does not exist.")
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise NestError(f"{str(path)!r} is not a readable safetensors file ({str(exc)[:120]}).") from None
    side = sidecar_path(path)
    try:
        own = json.loads(metadata["arch"]) if "arch" in metadata else None
        arch = json.loads(side.read_text())["arch"] if side.is_file() else own
    except (KeyError, TypeError, json.JSONDecodeError, UnicodeDecodeError, OSError):
        arch = None
    if arch is None:
        raise NestError(f"{str(side)!r} (the architecture of {path.name}) is missing or not valid "
                        "JSON.")
    if own is not None and arch != own:
        raise NestError(f"{str(side)!r} does not describe {path.name} (it differs from the architecture stored "
                        "in the weights file: edited, or from another export); delete it or export again.")
    return compact_from_state(arch, tensors)


# ---------------------------------------------------------------------------- onnx


def onnx_bytes(model: CompactMLP | CompactCNN) -> bytes:
    """The compact model, densified, as ONNX (dynamic batch axis, input (B, *input_shape))."""
    _require_onnx()
    import onnx

    dense = model.densified()
    shape = model.input_shape or [model.n_inputs]
    example = torch.zeros(1, *shape)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(dense, (example,), buf, dynamo=False, opset_version=ONNX_OPSET,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    proto = onnx.load_from_string(buf.getvalue())
    arch = model.arch()
    arch["onnx_note"] = "every layer stored dense (ONNX has no executable sparse-matrix format)"
    for key, value in (("nestsynth", arch), ("input_contract", model.meta.get("input_contract"))):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


class OnnxModel:
    """An ONNX model run by onnxruntime on the CPU, called like a torch module."""

    def __init__(self, data: bytes, threads: int | None = None):
        _require_onnx()
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise NestError(f"onnxruntime cannot load the model ({str(exc).splitlines()[0][:120]}).") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        self.arch = json.loads(meta["nestsynth"]) if "nestsynth" in meta else {}
        self.meta = self.arch.get("meta", {})
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.input_shape = [int(d) for d in inp.shape[1:]] if all(isinstance(d, int) for d in inp.shape[1:]) \
            else None

    def run_numpy(self, x):
        return self.session.run(None, {self.input_name: x})[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().float().cpu()
        if self.input_shape is not None:
            x = x.reshape(x.shape[0], *self.input_shape)
        return torch.from_numpy(self.run_numpy(x.contiguous().numpy()))


def save_onnx(model: CompactMLP | CompactCNN, path: Path) -> bytes:
    data = onnx_bytes(model)
    ckpt.atomic_write_bytes(path, data)
    return data


def load_onnx(path: Path, threads: int | None = None) -> OnnxModel:
    if not path.is_file():
        raise NestError(f"{str(path)!r} does not exist.")
    return OnnxModel(path.read_bytes(), threads)


# ---------------------------------------------------------------------------- c


def c_artifact(model: CompactMLP | CompactCNN) -> str:
    """The compact model as one dependency-free C file (every layer in C; see :mod:`.ckernel`).

    The comment block gives the model, the input contract and how to build and call it;
    ``NEST_INPUT_*`` defines repeat the contract; ``-DNEST_MAIN`` adds a ``main`` that reads
    samples from stdin and prints the outputs.

    Raises:
        NestError: a graph network or a layer without a C form.
    """
    if isinstance(model, CompactGraph):
        raise NestError("--format c writes MLP and sequential CNN exports only; a graph network has no C export.")
    plan = plan_layers(list(model.layers), model.raw_input_shape(), model.input_index)
    contract = model.meta.get("input_contract") or {}
    meta = model.meta
    comment = [f"nestsynth compact model {meta.get('name', '')} "
               f"(source: {meta.get('source_run') or meta.get('source_model')})",
               f"widths {'-'.join(map(str, model.widths))}, {model.nnz()} non-zero weights, "
               f"{model.nonzero_flops()} FLOPs per sample (2 x multiply-adds of the non-zeros)", "",
               "INPUT CONTRACT", *(contract_lines(contract) if contract else ["unknown (no data set recorded)"]),
               "",
               "int nest_forward(const float *x, long n, float *y, float *scratch);",
               "  x: n samples of NEST_N_INPUTS floats (row-major), y: n rows of NEST_N_OUTPUTS logits,",
               "  scratch: NEST_SCRATCH_FLOATS floats (2 x NEST_MAX_ROWS x NEST_TILE).",
               "Build: cc -O3 -c compact.c (library), or cc -O3 -DNEST_MAIN compact.c -o nest (harness:",
               "  reads samples as whitespace-separated numbers on stdin, prints one line of outputs each).",
               "-DNEST_TILE=1 shrinks the scratch to 2 x NEST_MAX_ROWS floats (slower batches);",
               "-DNEST_PLAIN_C keeps plain C99 loops instead of GNU C vectors."]
    defines = {"NEST_INPUT_SCALING": json.dumps(contract.get("scaling", "")),
               "NEST_INPUT_NORMALIZED": int(contract.get("mean") is not None)}
    return c_source(plan, comment="\n".join(comment), defines=defines, harness=True)


def save_c(model: CompactMLP | CompactCNN, path: Path) -> str:
    text = c_artifact(model)
    ckpt.atomic_write_text(path, text)
    return text


# ---------------------------------------------------------------------------- any


def save_artifact(model: CompactMLP | CompactCNN, path: Path, fmt: str) -> list[Path]:
    """Write ``model`` in ``fmt``; returns the files written."""
    if fmt == "pytorch":
        save_pytorch(model, path)
        return [path]
    if fmt == "safetensors":
        return [path, save_safetensors(model, path)]
    if fmt == "onnx":
        save_onnx(model, path)
        return [path]
    if fmt == "c":
        save_c(model, path)
        return [path]
    raise NestError(f"unknown export format {fmt!r}; valid: {', '.join(FORMATS)}.")


def load_artifact(path: str | Path, threads: int | None = None):
    """A compact model from any artifact: :class:`CompactMLP`, :class:`CompactCNN` or :class:`OnnxModel`."""
    path = Path(path)
    fmt = format_of(path)
    if fmt == "c":
        raise NestError(f"{str(path)!r} is C source: compile it (see its comment block); nestsynth reads .pt, "
                        ".safetensors and .onnx artifacts.")
    if fmt == "pytorch":
        return load_pytorch(path)
    if fmt == "safetensors":
        return load_safetensors(path)
    return load_onnx(path, threads)


def artifact_files(path: Path) -> list[Path]:
    """The files making up an artifact (the safetensors sidecar included)."""
    files = [path]
    if format_of(path) == "safetensors" and sidecar_path(path).is_file():
        files.append(sidecar_path(path))
    return files
