"""What :class:`~nestsynth.export.compact.CompactMLP` and
:class:`~nestsynth.export.compact_cnn.CompactCNN` share: the format tag, the storage
modes, :class:`CompactLinear` (a layer stored dense or CSR) and :class:`CompactNet`
(typed layers, the input gather, counts, tensors by name, rebuilding from them).

Layers are typed entries (``{"type": "linear", ...}``) with a ``spec`` / ``tensors`` /
``from_state`` interface.  Nothing here imports the builders (:mod:`.compact`,
:mod:`.compact_cnn`) or the storage choice (:mod:`.choose`); they import this module.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import NestError
from ..sparse.mlp import make_activation

FORMAT = "nestsynth-compact"
VERSION = 1
STORAGES = ("dense", "csr", "ckernel")
SPARSE_STORAGES = ("csr", "ckernel")  # stored as CSR tensors; "ckernel" runs in generated C (.ckernel)
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

    ``ckernel`` layers hold their CSR matrix too; :class:`CompactNet` runs consecutive
    ``ckernel`` layers as one generated C function (:mod:`.ckernel`), and a layer that
    runs alone (no compiler) computes as CSR.  CSR computes
    ``(b[:, None] + W @ x.T).T`` (sparse @ dense, the fast path of CPU
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
        self.register_buffer("weight", to_csr(weight) if storage in SPARSE_STORAGES else weight.contiguous())
        self.act = make_activation(activation) if activation else None

    def dense_weight(self) -> torch.Tensor:
        return self.weight.to_dense() if self.storage in SPARSE_STORAGES else self.weight

    def as_dense(self, choice: dict | None = None) -> "CompactLinear":
        """The same layer stored dense (``choice``: its recorded decision)."""
        return CompactLinear(self.dense_weight(), self.bias, "dense", self.activation,
                             choice if choice is not None else {"storage": "dense", "reason": "densified copy"})

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, in) -> (B, out)
        if self.storage in SPARSE_STORAGES:
            if x.shape[0] == 1:  # sparse matrix-vector product: less overhead than the general product
                y = torch.addmv(self.bias, self.weight, x[0]).unsqueeze(0)
            else:
                y = torch.addmm(self.bias.unsqueeze(1), self.weight, x.t()).t()
        else:
            y = F.linear(x, self.weight, self.bias)
        return self.act(y) if self.act is not None else y

    def executed_flops(self) -> int:
        """Multiply-adds actually performed, x2: all of W when dense, the non-zeros when CSR or C."""
        return self.nonzero_flops() if self.storage in SPARSE_STORAGES else self.dense_flops()

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
        if self.storage in SPARSE_STORAGES:
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
        if storage in SPARSE_STORAGES:
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



class CompactNet(nn.Module):
    """What :class:`CompactMLP` and :class:`~nestsynth.export.compact_cnn.CompactCNN` share:
    typed ``layers``, an optional ``input_index`` gather buffer, plain-data ``meta``,
    their counts, their tensors by name and rebuilding from them, and the forward.

    The forward runs each maximal run of consecutive ``ckernel`` layers as one compiled
    C function (:class:`~nestsynth.export.ckernel.CKernel`, built on first use; the run
    that starts at layer 0 also reads the input gather), every other layer in PyTorch.
    When the kernel cannot be built the run's layers compute in PyTorch (CSR / dense
    convolution) and :attr:`kernel_status` says why.
    """

    def __init__(self, layers, input_index: torch.Tensor | None, meta: dict | None):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.meta = dict(meta or {})
        if input_index is not None:
            self.register_buffer("input_index", input_index.to(torch.int64).contiguous())
        else:
            self.input_index = None
        self.reset_kernels()

    def reset_kernels(self) -> None:
        """Forget the compiled runs (after ``layers`` changed)."""
        self._segments = None
        self.kernel_status = None

    def raw_input_shape(self) -> tuple:
        """Per-sample shape of the model's input before the gather."""
        raise NotImplementedError

    def layer_input_shape(self, i: int) -> tuple:
        """Per-sample shape of layer i's input (after the gather for layer 0)."""
        raise NotImplementedError

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """The input reshaped for layer 0, gathered."""
        raise NotImplementedError

    def segments(self) -> list[tuple[int, int, object]]:
        """``(start, stop, kernel or None)`` covering the layers in order; kernels built on first call."""
        if self._segments is None:
            from .ckernel import CKernel, KernelUnavailable

            segs, i, n = [], 0, len(self.layers)
            while i < n:
                j = i + 1
                while self.layers[i].storage == "ckernel" and j < n and self.layers[j].storage == "ckernel":
                    j += 1
                kernel = None
                if self.layers[i].storage == "ckernel":
                    shape = self.raw_input_shape() if i == 0 else self.layer_input_shape(i)
                    try:
                        kernel = CKernel(self.layers[i:j], shape, self.input_index if i == 0 else None)
                    except KernelUnavailable as exc:
                        self.kernel_status = f"layers {i}-{j - 1} run in PyTorch: {exc}"
                        warnings.warn(self.kernel_status, RuntimeWarning, stacklevel=2)
                segs.append((i, j, kernel))
                i = j
            self._segments = segs
        return self._segments

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, *input_shape) -> (B, classes)
        for start, stop, kernel in self.segments():
            if kernel is not None:
                x = kernel(x)                                  # (B, *its output shape)
                continue
            if start == 0:
                x = self.prepare(x)
            for layer in self.layers[start:stop]:
                x = layer(x.flatten(1) if layer.type_name == "linear" else x)
        return x

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

    def specs(self) -> list[dict]:
        """One plain record per layer (bench-infer's ``storage``)."""
        return [layer.spec() for layer in self.layers]

    def with_layers(self, layers) -> "CompactNet":
        """The same network (inputs, meta) with other layers."""
        raise NotImplementedError

    def densified(self) -> "CompactNet":
        """The same network with every layer stored dense (for ONNX and comparisons)."""
        return self.with_layers([layer.as_dense() if layer.storage != "dense" else layer
                                 for layer in self.layers]).eval()

    def in_c(self) -> "CompactNet":
        """The same network with every layer run by generated C (:mod:`.ckernel`), for comparisons."""
        choice = {"storage": "ckernel", "reason": "every layer in C"}
        return self.with_layers([CompactLinear(layer.dense_weight(), layer.bias, "ckernel", layer.activation, choice)
                                 if layer.type_name == "linear" else layer.with_choice(choice)
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
