"""The compact inference model built from a synthesized :class:`SparseMLP`.

:func:`compact_from_sparse` physically removes every neuron that no longer lies on a
path from the input to the output, folds batch norm into the linear layer before it
and keeps each remaining weight matrix either dense or as a ``torch.sparse_csr``
tensor.  The result, :class:`CompactMLP`, is a plain inference module (no masks, no
batch norm, no training state) described by plain data (:meth:`CompactMLP.arch`) plus
a flat dict of dense tensors (:meth:`CompactMLP.tensors`), so it can be written as a
``weights_only`` torch file or as safetensors + JSON (see :mod:`.formats`).

Layers are a list of typed entries (``{"type": "linear", ...}``) with a
``spec`` / ``tensors`` / ``from_state`` interface (:class:`CompactLinear` and the shared
:class:`CompactNet` live in :mod:`.compact_base`); CNNs (conv stages, then these linear
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

from typing import Callable

import torch

from ..errors import NestError
from ..sparse.cnn import SparseCNN
from ..sparse.mlp import SparseMLP
from .choose import choose_storage
from .compact_base import (FORMAT, GATHER_MIN_FRACTION, STORAGES, VERSION, CompactLinear,  # noqa: F401
                           CompactNet, to_csr)
from .compact_cnn import compact_cnn_from_sparse
from .compact_graph import compact_graph_from_sparse
from ..graph.network import SparseGraph

LAYER_TYPES: dict[str, type] = {"linear": CompactLinear}


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

    def prepare(self, x: torch.Tensor) -> torch.Tensor:  # (B, *input_shape) -> (B, read inputs)
        x = x.flatten(1)
        return x.index_select(1, self.input_index) if self.input_index is not None else x

    def raw_input_shape(self) -> tuple:
        return (self.n_inputs,)

    def layer_input_shape(self, i: int) -> tuple:
        return (self.layers[i].in_features,)

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
    """Build the compact inference model of a (trained) SparseMLP, of a SparseCNN
    (then a :class:`~nestsynth.export.compact_cnn.CompactCNN`, see
    :func:`~nestsynth.export.compact_cnn.compact_cnn_from_sparse`) or of a SparseGraph
    (a :class:`~nestsynth.export.compact_graph.CompactGraph`, see
    :func:`~nestsynth.export.compact_graph.compact_graph_from_sparse`).

    Args:
        model: the masked model (its batch-norm statistics are used, as in eval mode).
        storage: ``"auto"`` (per layer, dense, CSR or generated C by measurement at
            ``batch_size``), ``"dense"``, ``"csr"`` or ``"ckernel"`` for every layer.
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
    if storage not in ("auto",) + STORAGES:
        raise NestError(f"unknown --sparse mode {storage!r}; valid: auto, {', '.join(STORAGES)}.")
    if isinstance(model, SparseCNN):  # see compact_cnn (the input shape is the model's own)
        return compact_cnn_from_sparse(model, storage, batch_size, meta, **choose_kwargs)
    if isinstance(model, SparseGraph):  # see compact_graph (dense layers, the input shape is the model's own)
        return compact_graph_from_sparse(model, storage, batch_size, meta)
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
        act = model.activation_specs[i] if i < model.n_hidden else None
        choice = choose_storage(w_c, b_c, batch_size, mode=storage, activation=act, **choose_kwargs)
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
