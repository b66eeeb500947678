"""The compact inference model built from a synthesized :class:`SparseMLP`.

:func:`compact_from_sparse` physically removes every neuron that no longer lies on a
path from the input to the output, folds batch norm into the linear layer before it
and keeps each remaining weight matrix either dense or as a ``torch.sparse_csr``
tensor.  The result, :class:`CompactMLP`, is a plain inference module (no masks, no
batch norm, no training state) described by plain data (:meth:`CompactMLP.arch`) plus
a flat dict of dense tensors (:meth:`CompactMLP.tensors`), so it can be written as a
``weights_only`` torch file or as safetensors + JSON (see :mod:`.formats`).

Layers are a list of typed entries (``{"type": "linear", ...}``) with a
``spec`` / ``tensors`` / ``from_state`` interface; CNNs (conv stages, then these linear
layers) are :class:`~nestsynth.export.compact_cnn.CompactCNN` (architecture ``kind: "cnn"``).

Neuron removal (exact, up to float rounding), repeated until nothing changes:

* a hidden neuron without an outgoing connection does not influence the output: its
  row in its own layer and its column in the next layer are dropped;
* a hidden neuron without an incoming connection outputs the constant
  ``c = act(b_folded)``: ``W_next[:, j] * c`` is added to the next layer's bias, then
  the neuron is dropped;
* network inputs that no layer reads are dropped with an ``index_select`` at the input,
  when that removes at least :data:`GATHER_MIN_FRACTION` of them (otherwise the copy
  costs more than the few zero columns it saves).
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import NestError
from ..sparse.cnn import SparseCNN
from ..sparse.mlp import SparseMLP, make_activation

FORMAT = "nestsynth-compact"
VERSION = 1
STORAGES = ("dense", "csr")
GATHER_MIN_FRACTION = 0.25  # drop unread inputs with a gather only when it removes at least this share

_BETA_WARNING = ".*Sparse CSR tensor support is in beta state.*"
warnings.filterwarnings("ignore", message=_BETA_WARNING)


def to_csr(weight: torch.Tensor) -> torch.Tensor:
    """A dense (out, in) float matrix as a CSR tensor with int32 indices."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_BETA_WARNING)
        csr = weight.detach().to_sparse_csr()
    return torch.sparse_csr_tensor(csr.crow_indices().to(torch.int32), csr.col_indices().to(torch.int32),
                                   csr.values().contiguous(), size=tuple(weight.shape), check_invariants=True)


class CompactLinear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` stored dense or as a CSR matrix.

    CSR computes ``(b[:, None] + W @ x.T).T`` (sparse @ dense, the fast path of CPU
    sparse kernels; ``b + W @ x[0]`` for a single sample); the result is a transposed
    view, which the next operation reads directly.
    """

    type_name = "linear"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, storage: str = "dense",
                 activation: str | None = None, choice: dict | None = None):
        super().__init__()
        if storage not in STORAGES:
            raise NestError(f"unknown layer storage {storage!r}; valid: {', '.join(STORAGES)}.")
        weight = weight.detach().to(torch.float32)
        self.storage = storage
        self.in_features = int(weight.shape[1])
        self.out_features = int(weight.shape[0])
        self.nnz = int(torch.count_nonzero(weight))
        self.activation = activation
        self.choice = dict(choice or {})
        self.register_buffer("bias", bias.detach().to(torch.float32).contiguous())
        self.register_buffer("weight", to_csr(weight) if storage == "csr" else weight.contiguous())
        self.act = make_activation(activation) if activation else None

    def dense_weight(self) -> torch.Tensor:
        return self.weight.to_dense() if self.storage == "csr" else self.weight

    def as_dense(self, choice: dict | None = None) -> "CompactLinear":
        """The same layer stored dense (``choice``: its recorded decision)."""
        return CompactLinear(self.dense_weight(), self.bias, "dense", self.activation,
                             choice if choice is not None else {"storage": "dense", "reason": "densified copy"})

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, in) -> (B, out)
        if self.storage == "csr":
            if x.shape[0] == 1:  # sparse matrix-vector product: less overhead than the general product
                y = torch.addmv(self.bias, self.weight, x[0]).unsqueeze(0)
            else:
                y = torch.addmm(self.bias.unsqueeze(1), self.weight, x.t()).t()
        else:
            y = F.linear(x, self.weight, self.bias)
        return self.act(y) if self.act is not None else y

    def executed_flops(self) -> int:
        """Multiply-adds actually performed, x2: all of W when dense, the non-zeros when CSR."""
        return self.nonzero_flops() if self.storage == "csr" else self.dense_flops()

    def nonzero_flops(self) -> int:
        return 2 * self.nnz

    def dense_flops(self) -> int:
        return 2 * self.in_features * self.out_features

    # ---- plain-data state --------------------------------------------------
    def spec(self) -> dict:
        return {"type": self.type_name, "in": self.in_features, "out": self.out_features,
                "storage": self.storage, "nnz": self.nnz, "activation": self.activation,
                "choice": self.choice}

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {f"{prefix}.bias": self.bias}
        if self.storage == "csr":
            out[f"{prefix}.crow_indices"] = self.weight.crow_indices().contiguous()
            out[f"{prefix}.col_indices"] = self.weight.col_indices().contiguous()
            out[f"{prefix}.values"] = self.weight.values().contiguous()
        else:
            out[f"{prefix}.weight"] = self.weight
        return out

    @classmethod
    def from_state(cls, spec: dict, tensors: dict[str, torch.Tensor], prefix: str) -> "CompactLinear":
        n_in, n_out, storage = int(spec["in"]), int(spec["out"]), spec["storage"]
        bias = tensors[f"{prefix}.bias"]
        if storage == "csr":
            crow, col = tensors[f"{prefix}.crow_indices"], tensors[f"{prefix}.col_indices"]
            values = tensors[f"{prefix}.values"]
            if crow.dim() != 1 or crow.numel() != n_out + 1 or col.shape != values.shape or col.dim() != 1:
                raise ValueError(f"{prefix}: inconsistent CSR tensors")
            if col.numel() and (int(col.min()) < 0 or int(col.max()) >= n_in):
                raise ValueError(f"{prefix}: CSR column index out of range")
            if int(crow[0]) != 0 or int(crow[-1]) != col.numel() or bool((crow[1:] < crow[:-1]).any()):
                raise ValueError(f"{prefix}: CSR row pointers are not monotone")
            weight = torch.sparse_csr_tensor(crow.to(torch.int64), col.to(torch.int64), values,
                                             size=(n_out, n_in), check_invariants=True).to_dense()
        else:
            weight = tensors[f"{prefix}.weight"]
        if tuple(weight.shape) != (n_out, n_in) or tuple(bias.shape) != (n_out,):
            raise ValueError(f"{prefix}: tensor shapes do not match the architecture")
        return cls(weight, bias, storage, spec.get("activation"), spec.get("choice"))


LAYER_TYPES: dict[str, type] = {"linear": CompactLinear}


class CompactNet(nn.Module):
    """What :class:`CompactMLP` and :class:`~nestsynth.export.compact_cnn.CompactCNN` share:
    typed ``layers``, an optional ``input_index`` gather buffer, plain-data ``meta``,
    their counts, their tensors by name and rebuilding from them."""

    def __init__(self, layers, input_index: torch.Tensor | None, meta: dict | None):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.meta = dict(meta or {})
        if input_index is not None:
            self.register_buffer("input_index", input_index.to(torch.int64).contiguous())
        else:
            self.input_index = None

    @property
    def widths(self) -> list[int]:
        """(read inputs, then every layer's outputs): the widths actually computed."""
        return [self.layers[0].in_features] + [layer.out_features for layer in self.layers]

    def nnz(self) -> int:
        return sum(layer.nnz for layer in self.layers)

    def executed_flops(self) -> int:
        return sum(layer.executed_flops() for layer in self.layers)

    def nonzero_flops(self) -> int:
        """2 x MACs of the non-zero weights (conv: at the positions each kernel computes)."""
        return sum(layer.nonzero_flops() for layer in self.layers)

    def dense_flops(self) -> int:
        """FLOPs with every linear layer stored dense (the ONNX graph, :meth:`densified`)."""
        return sum(layer.dense_flops() for layer in self.layers)

    def storages(self) -> list[str]:
        return [layer.storage for layer in self.layers]

    def with_layers(self, layers) -> "CompactNet":
        """The same network (inputs, meta) with other layers."""
        raise NotImplementedError

    def densified(self) -> "CompactNet":
        """The same network with every linear layer stored dense (for ONNX and comparisons)."""
        return self.with_layers([layer.as_dense() if isinstance(layer, CompactLinear) else layer
                                 for layer in self.layers]).eval()

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor by name: the input gather, then each layer's."""
        out = {}
        if self.input_index is not None:
            out["input_index"] = self.input_index
        for i, layer in enumerate(self.layers):
            out.update(layer.tensors(f"layers.{i}"))
        return out

    @staticmethod
    def rebuild(arch: dict, tensors: dict[str, torch.Tensor], layer_types: dict[str, type], what: str,
                build: Callable, kind: str | None = None) -> "CompactNet":
        """Check ``arch``'s format tag and version, rebuild its layers from ``tensors`` and
        return ``build(layers, input_index)`` in eval mode.

        ``build`` raises ValueError when the layers do not chain.

        Raises:
            NestError: unknown format, kind, version or layer type; missing or inconsistent tensors.
        """
        if not isinstance(arch, dict) or arch.get("format") != FORMAT or (kind and arch.get("kind") != kind):
            raise NestError(f"the file is not a nestsynth {what} (its format tag is missing).")
        if arch.get("version") != VERSION:
            raise NestError(f"compact model version {arch.get('version')!r} is not supported "
                            f"(this nestsynth reads version {VERSION}).")
        try:
            layers = []
            for i, spec in enumerate(arch["layers"]):
                layer_type = layer_types.get(spec.get("type"))
                if layer_type is None:
                    raise NestError(f"unknown layer type {spec.get('type')!r} in the {what}; "
                                    f"known: {', '.join(layer_types)}.")
                layers.append(layer_type.from_state(spec, tensors, f"layers.{i}"))
            model = build(layers, tensors["input_index"] if arch.get("input_gather") else None)
            unused = sorted(set(tensors) - set(model.tensors()))
            if unused:
                raise ValueError(f"tensors {', '.join(unused[:3])} belong to no layer of the description")
        except NestError:
            raise
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as exc:
            detail = f": {exc}" if isinstance(exc, ValueError) else " (missing or inconsistent)"
            raise NestError(f"the compact model's tensors do not match its architecture description{detail}."
                            ) from None
        return model.eval()


class CompactMLP(CompactNet):
    """Inference-only network: optional input gather, then typed layers in sequence.

    Args:
        layers: the layers, in order (each applies its own activation).
        input_shape: shape of one sample (e.g. ``[1, 28, 28]``), or None.
        input_index: the flattened input positions that are read (None: all).
        n_inputs: width of the flattened input before the gather.
        meta: plain data carried along (source run, data set, decisions).
    """

    def __init__(self, layers, input_shape=None, input_index: torch.Tensor | None = None,
                 n_inputs: int | None = None, meta: dict | None = None):
        super().__init__(layers, input_index, meta)
        self.input_shape = list(input_shape) if input_shape else None
        self.n_inputs = int(n_inputs if n_inputs is not None else self.layers[0].in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, *input_shape) -> (B, classes)
        x = x.flatten(1)
        if self.input_index is not None:
            x = x.index_select(1, self.input_index)
        for layer in self.layers:
            x = layer(x)
        return x

    def with_layers(self, layers) -> "CompactMLP":
        return CompactMLP(layers, self.input_shape, self.input_index, self.n_inputs, self.meta)

    # ---- plain-data state --------------------------------------------------
    def arch(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "kind": "sequential",
                "input_shape": self.input_shape, "n_inputs": self.n_inputs,
                "input_gather": self.input_index is not None,
                "layers": [layer.spec() for layer in self.layers], "meta": self.meta}

    @classmethod
    def from_state(cls, arch: dict, tensors: dict[str, torch.Tensor]) -> "CompactMLP":
        """Rebuild from :meth:`arch` and :meth:`tensors`.

        Raises:
            NestError: unknown format, version or layer type; missing or inconsistent tensors.
        """
        def build(layers, index):
            n_inputs = int(arch["n_inputs"])
            if index is not None and (index.dim() != 1 or index.numel() != layers[0].in_features
                                      or (index.numel() and (int(index.min()) < 0
                                                             or int(index.max()) >= n_inputs))):
                raise ValueError("input_index does not match the first layer")
            if index is None and layers[0].in_features != n_inputs:
                raise ValueError("first layer width does not match the input width")
            for a, b in zip(layers[:-1], layers[1:]):
                if a.out_features != b.in_features:
                    raise ValueError("layers do not chain")
            return cls(layers, arch.get("input_shape"), index, n_inputs, arch.get("meta"))

        return cls.rebuild(arch, tensors, LAYER_TYPES, "compact model", build)


# ---------------------------------------------------------------------------- building


def folded_layers(model: SparseMLP) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(W, b) per layer in float64 with masks applied and batch norm (affine) folded in;
    fresh copies, which :func:`prune_dead_neurons` edits in place."""
    return [tuple(t.clone() for t in model.folded_layer(i, torch.float64)) for i in range(len(model.layers))]


def prune_dead_neurons(weights: list[torch.Tensor], biases: list[torch.Tensor],
                       activations: list[Callable]) -> tuple[list[torch.Tensor], torch.Tensor, dict]:
    """Find the hidden neurons and inputs on no input-output path; fold constant neurons.

    ``weights`` and ``biases`` (float64, modified in place) are the folded layers;
    ``activations[h]`` is hidden layer h's activation.

    Returns:
        (keep, input_keep, counts): ``keep[h]`` is a bool mask over hidden layer h's
        neurons, ``input_keep`` over the inputs, ``counts`` the removed neurons per
        hidden layer split into ``constant`` (folded into the next bias) and ``dead``.
    """
    n_hidden = len(weights) - 1
    keep = [torch.ones(w.shape[0], dtype=torch.bool) for w in weights[:-1]]
    constant = [0] * n_hidden
    dead = [0] * n_hidden
    changed = True
    while changed:
        changed = False
        for h in range(n_hidden):
            w_in, w_out = weights[h], weights[h + 1]
            has_in = (w_in != 0).any(dim=1)
            has_out = (w_out != 0).any(dim=0)
            for j in torch.nonzero(keep[h] & ~has_out).flatten().tolist():
                keep[h][j] = False
                w_in[j].zero_()
                dead[h] += 1
                changed = True
            for j in torch.nonzero(keep[h] & ~has_in).flatten().tolist():
                c = activations[h](biases[h][j:j + 1])[0]
                biases[h + 1] += w_out[:, j] * c
                w_out[:, j] = 0
                keep[h][j] = False
                constant[h] += 1
                changed = True
    input_keep = (weights[0] != 0).any(dim=0)
    return keep, input_keep, {"constant": constant, "dead": dead}


def compact_from_sparse(model: SparseMLP, storage: str = "auto", batch_size: int = 1,
                        input_shape=None, meta: dict | None = None, **choose_kwargs) -> tuple[CompactMLP, dict]:
    """Build the compact inference model of a (trained) SparseMLP, or of a SparseCNN
    (then a :class:`~nestsynth.export.compact_cnn.CompactCNN`, see
    :func:`~nestsynth.export.compact_cnn.compact_cnn_from_sparse`).

    Args:
        model: the masked model (its batch-norm statistics are used, as in eval mode).
        storage: ``"auto"`` (per layer, dense or CSR by measurement at ``batch_size``),
            ``"dense"`` or ``"csr"`` for every layer.
        batch_size: the batch size the ``auto`` decision is measured at.
        input_shape: shape of one sample, recorded in the architecture.
        meta: plain data to carry along.
        choose_kwargs: passed to :func:`nestsynth.export.choose.choose_storage`.

    Returns:
        (compact model in eval mode, info) with info = widths before and after, removed
        neurons and inputs, and the per-layer storage decisions.

    Raises:
        NestError: unknown storage mode.
    """
    from .choose import choose_storage

    if storage not in ("auto",) + STORAGES:
        raise NestError(f"unknown --sparse mode {storage!r}; valid: auto, dense, csr.")
    if isinstance(model, SparseCNN):  # see compact_cnn (the input shape is the model's own)
        from .compact_cnn import compact_cnn_from_sparse

        return compact_cnn_from_sparse(model, storage, batch_size, meta, **choose_kwargs)
    layers_fd = folded_layers(model)
    weights = [w for w, _ in layers_fd]
    biases = [b for _, b in layers_fd]
    acts = [(lambda t, m=m: m(t)) for m in model.acts]
    keep, input_keep, counts = prune_dead_neurons(weights, biases, acts)

    in_idx = torch.nonzero(input_keep).flatten()
    n_inputs = weights[0].shape[1]
    if in_idx.numel() > (1.0 - GATHER_MIN_FRACTION) * n_inputs:
        in_idx = torch.arange(n_inputs)
    rows = [torch.nonzero(k).flatten() for k in keep] + [torch.arange(weights[-1].shape[0])]
    cols = [in_idx] + rows[:-1]
    layers, decisions = [], []
    for i, (w, b) in enumerate(zip(weights, biases)):
        w_c = w.index_select(0, rows[i]).index_select(1, cols[i]).float()
        b_c = b.index_select(0, rows[i]).float()
        choice = choose_storage(w_c, b_c, batch_size, mode=storage, **choose_kwargs)
        act = model.activation_specs[i] if i < model.n_hidden else None
        layers.append(CompactLinear(w_c, b_c, choice["storage"], act, choice))
        decisions.append({"layer": i, "in": w_c.shape[1], "out": w_c.shape[0], **choice})
    gather = in_idx if in_idx.numel() < n_inputs else None
    info = {"widths_masked": model.widths, "widths_compact": [int(in_idx.numel())] + [int(r.numel()) for r in rows],
            "inputs_read": int(input_keep.sum()), "inputs": int(n_inputs), "input_gather": gather is not None,
            "removed_neurons": {"constant_folded": counts["constant"], "dead": counts["dead"]},
            "nnz_masked": int(model.active_weights()),
            "storage_mode": storage, "batch_size": int(batch_size), "layers": decisions}
    meta = dict(meta or {})
    meta.setdefault("storage_mode", storage)
    meta.setdefault("batch_size", int(batch_size))
    compact = CompactMLP(layers, input_shape, gather, n_inputs, meta).eval()
    info["nnz_compact"] = compact.nnz()
    return compact, info


@torch.inference_mode()
def max_abs_difference(a: Callable, b: Callable, X: torch.Tensor, batch_size: int = 1024) -> float:
    """max |a(x) - b(x)| over the rows of X, evaluated in batches."""
    worst = 0.0
    for start in range(0, X.shape[0], batch_size):
        x = X[start:start + batch_size]
        worst = max(worst, float((a(x).float() - b(x).float()).abs().max()))
    return worst
