"""The compact inference model built from a synthesized :class:`SparseCNN`.

:func:`compact_cnn_from_sparse` turns a masked CNN into :class:`CompactCNN`: conv stages
as plain ``nn.Conv2d`` (kernel masks applied, batch norm folded in with
:meth:`SparseCNN.folded_layer`), then the linear head exactly as :class:`CompactMLP`
(each layer dense or CSR by the same per-layer choice, :mod:`.choose`).  Feature maps
and neurons that lie on no input-output path are removed physically; pooling stays,
dropout is gone (inference).  Like :class:`CompactMLP`, the model is plain data
(:meth:`CompactCNN.arch`, ``kind: "cnn"``) plus dense tensors (:meth:`CompactCNN.tensors`).

**Partial-area masks (paper Algorithm 2).**  The masked layer computes
``u = (conv(x, W*M) + b) * A`` and batch norm then gives
``y = s * (u - mean) + beta`` with ``s = gamma / sqrt(var + eps)``.  With the folded
``W_f = s * W*M`` and ``b_f = s * (b - mean) + beta`` and ``c = beta - s * mean`` (batch
norm of a zero output) this is exactly::

    y = (conv(x, W_f) + b_f) * A + c * (1 - A)  =  conv(x, W_f, b_f) * A + c * (1 - A)

so a masked position outputs ``c``, not 0 (without batch norm ``c = 0``).  A compact
conv stage therefore computes ``y = conv2d(x, W_f, b_f)``, then ``y * area`` when the
layer's area mask is not all ones, then ``y + offset`` when an offset map is needed
(``offset`` (out, H, W) = ``K * A + c * (1 - A)``, ``K`` the constants folded in
below).  The convolution itself is evaluated densely at every position (a CPU conv
kernel cannot skip single output positions); ``area`` only reproduces the masked
outputs.  Hence :meth:`CompactConv2d.executed_flops` counts the dense convolution,
while :meth:`CompactConv2d.nonzero_flops` counts, as :func:`nestsynth.metrics.conv_macs`,
the non-zero kernel weights times the positions each kernel still computes.

**Map and neuron removal** (exact up to float rounding), repeated until nothing changes:

* a hidden unit (feature map or neuron) that the next layer does not read is dropped
  together with its kernel / weight row;
* a unit whose output does not depend on the input -- a feature map with no non-zero
  incoming kernel weight, or with an area mask that is all zero; a neuron without
  incoming weights -- is a constant map ``Y = (b_f + K) * A + c * (1 - A)`` (``K`` the
  constants already folded into it).  Its post-activation, pooled value ``P`` is folded
  into the next layer: a linear layer adds ``W[:, cols of the map] @ P`` to its bias; a
  conv layer adds ``conv2d(P, W[:, j])`` to its pre-area map ``K``.  With padding in the
  next conv this contribution varies over positions (border positions see zeros), so
  it is kept as the per-position ``offset`` map (out, H, W) of that layer rather than
  a per-channel bias.  This keeps the fold exact, so such maps are removed as well
  instead of being kept and convolved (a per-channel bias fold would be exact only
  without padding).  A uniform ``K`` on a layer without area mask goes into the bias
  and no offset is stored;
* network input channels that no kernel reads are dropped with an ``index_select``
  when that removes at least ``GATHER_MIN_FRACTION`` of them (as for MLP inputs).

A conv layer keeps at least one map (``nn.Conv2d`` needs one output channel): when
every map of a layer is removed, map 0 stays as a placeholder whose outgoing weights
are all zero (it is counted in ``info["placeholder_maps"]``); likewise all input
channels stay when none is read.  Positions of a kept map that the first linear layer
never reads are not gathered away (their columns stay, as zeros).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import NestError
from ..sparse.cnn import SparseCNN, _pool, _pooled
from ..sparse.conv import conv_out_size
from ..sparse.mlp import make_activation
from .choose import choose_conv_storage, choose_storage
from .compact_base import FORMAT, GATHER_MIN_FRACTION, STORAGES, VERSION, CompactLinear, CompactNet

KIND = "cnn"


class CompactConv2d(nn.Module):
    """One conv stage for inference: ``pool(act(conv2d(x, W, b) [* area] [+ offset]))``.

    Args:
        weight: (out, in, k, k) folded kernels; bias: (out,).
        stride, padding: as ``nn.Conv2d``.
        out_hw: (H_out, W_out) of the convolution for the model's input size.
        area: (out, H_out, W_out) 0/1 mask multiplied after the conv, or None (all ones).
        offset: (out, H_out, W_out) added after the area mask, or None (zero).
        activation: activation spec (``"relu"``), or None.
        pool: ``"max:K:S"`` / ``"avg:K:S"`` or None.
        choice: the storage decision (always dense kernels), recorded as plain data.
    """

    type_name = "conv2d"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, stride: int, padding: int, out_hw,
                 area: torch.Tensor | None = None, offset: torch.Tensor | None = None,
                 activation: str | None = None, pool: str | None = None, choice: dict | None = None):
        super().__init__()
        weight = weight.detach().to(torch.float32)
        n_out, n_in, k = int(weight.shape[0]), int(weight.shape[1]), int(weight.shape[2])
        self.in_features, self.out_features, self.kernel_size = n_in, n_out, k
        self.stride, self.padding = int(stride), int(padding)
        self.out_hw = (int(out_hw[0]), int(out_hw[1]))
        self.nnz = int(torch.count_nonzero(weight))
        self.activation, self.pool_spec = activation, pool
        self.choice = dict(choice or {})
        self.storage = "ckernel" if self.choice.get("storage") == "ckernel" else "dense"  # ckernel: see CompactNet
        self.conv = nn.Conv2d(n_in, n_out, k, self.stride, self.padding)
        with torch.no_grad():
            self.conv.weight.copy_(weight)
            self.conv.bias.copy_(bias.detach().to(torch.float32))
        self.conv.requires_grad_(False)
        for name, t in (("area", area), ("offset", offset)):
            self.register_buffer(name, None if t is None else t.detach().to(torch.float32).contiguous())
        self.act = make_activation(activation) if activation else None
        self.pool = _pool(pool)

    @property
    def bias(self) -> torch.Tensor:
        return self.conv.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, in, H, W) -> (B, out, H', W') pooled
        y = self.conv(x)                                      # (B, out, H_out, W_out)
        if self.area is not None:
            y = y * self.area
        if self.offset is not None:
            y = y + self.offset
        if self.act is not None:
            y = self.act(y)
        return self.pool(y)

    def positions(self) -> torch.Tensor:
        """(out,) output positions each kernel computes in the masked model."""
        if self.area is None:
            return torch.full((self.out_features,), self.out_hw[0] * self.out_hw[1], dtype=torch.long)
        return self.area.flatten(1).ne(0).sum(dim=1)

    def executed_flops(self) -> int:
        """2 x MACs that run: the dense convolution at every output position, or (generated C)
        the non-zero weights at the positions each kernel computes."""
        return self.nonzero_flops() if self.storage == "ckernel" else self.dense_flops()

    def dense_flops(self) -> int:
        return 2 * self.out_features * self.in_features * self.kernel_size ** 2 * self.out_hw[0] * self.out_hw[1]

    def with_choice(self, choice: dict) -> "CompactConv2d":
        """The same stage with another recorded decision (its storage is ``choice["storage"]``)."""
        return CompactConv2d(self.conv.weight, self.conv.bias, self.stride, self.padding, self.out_hw, self.area,
                             self.offset, self.activation, self.pool_spec, choice)

    def as_dense(self, choice: dict | None = None) -> "CompactConv2d":
        """The same stage run by ``nn.Conv2d`` (``choice``: its recorded decision)."""
        return self.with_choice(choice if choice is not None else {"storage": "dense", "reason": "densified copy"})

    def nonzero_flops(self) -> int:
        """2 x sum over kernels n of (non-zero weights of n) x (positions n computes)."""
        per_kernel = torch.count_nonzero(self.conv.weight.detach().flatten(1), dim=1).long()  # (out,)
        return 2 * int((per_kernel * self.positions()).sum())

    # ---- plain-data state --------------------------------------------------
    def spec(self) -> dict:
        return {"type": self.type_name, "in": self.in_features, "out": self.out_features,
                "kernel": self.kernel_size, "stride": self.stride, "padding": self.padding,
                "out_hw": list(self.out_hw), "area": self.area is not None, "offset": self.offset is not None,
                "storage": self.storage, "nnz": self.nnz, "activation": self.activation, "pool": self.pool_spec,
                "choice": self.choice}

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {f"{prefix}.weight": self.conv.weight.detach(), f"{prefix}.bias": self.conv.bias.detach()}
        if self.area is not None:
            out[f"{prefix}.area"] = self.area
        if self.offset is not None:
            out[f"{prefix}.offset"] = self.offset
        return out

    @classmethod
    def from_state(cls, spec: dict, tensors: dict[str, torch.Tensor], prefix: str) -> "CompactConv2d":
        n_in, n_out, k = int(spec["in"]), int(spec["out"]), int(spec["kernel"])
        hw = tuple(int(v) for v in spec["out_hw"])
        weight, bias = tensors[f"{prefix}.weight"], tensors[f"{prefix}.bias"]
        if tuple(weight.shape) != (n_out, n_in, k, k) or tuple(bias.shape) != (n_out,) or len(hw) != 2:
            raise ValueError(f"{prefix}: tensor shapes do not match the architecture")
        maps = {}
        for name in ("area", "offset"):
            maps[name] = tensors[f"{prefix}.{name}"] if spec.get(name) else None
            if maps[name] is not None and tuple(maps[name].shape) != (n_out, *hw):
                raise ValueError(f"{prefix}: {name} shape does not match the architecture")
        return cls(weight, bias, int(spec["stride"]), int(spec["padding"]), hw, maps["area"], maps["offset"],
                   spec.get("activation"), spec.get("pool"), spec.get("choice"))


CNN_LAYER_TYPES: dict[str, type] = {"conv2d": CompactConv2d, "linear": CompactLinear}


class CompactCNN(CompactNet):
    """Inference-only CNN: optional input-channel gather, conv stages, flatten, linear layers.

    Args:
        layers: the :class:`CompactConv2d` stages, then the :class:`CompactLinear` layers.
        input_shape: (C, H, W) of one sample (before the gather).
        input_index: the input channels that are read (None: all).
        meta: plain data carried along (source run, data set, decisions).
    """

    def __init__(self, layers, input_shape, input_index: torch.Tensor | None = None, meta: dict | None = None):
        super().__init__(layers, input_index, meta)  # widths: read input channels, channels..., neurons...
        self.input_shape = [int(v) for v in input_shape]
        self.n_inputs = math.prod(self.input_shape)  # values per sample, as CompactMLP.n_inputs
        self.n_conv = sum(isinstance(layer, CompactConv2d) for layer in self.layers)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:  # (B, *input_shape) -> (B, read channels, H, W)
        x = x.reshape(x.shape[0], *self.input_shape)
        return x.index_select(1, self.input_index) if self.input_index is not None else x

    def raw_input_shape(self) -> tuple:
        return tuple(self.input_shape)

    def layer_input_shape(self, i: int) -> tuple:
        """(C, H, W) in front of a conv stage, (features,) in front of a linear layer
        (flattened channel-major: ``c * H * W + p``)."""
        layer = self.layers[i]
        if layer.type_name == "linear":
            return (layer.in_features,)
        hw = tuple(self.input_shape[1:]) if i == 0 else _pooled(self.layers[i - 1].out_hw, self.layers[i - 1].pool_spec)
        return (layer.in_features, *hw)

    def with_layers(self, layers) -> "CompactCNN":
        return CompactCNN(layers, self.input_shape, self.input_index, self.meta)

    # ---- plain-data state --------------------------------------------------
    def arch(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "kind": KIND, "input_shape": self.input_shape,
                "n_inputs": self.n_inputs, "input_gather": self.input_index is not None,
                "layers": [layer.spec() for layer in self.layers], "meta": self.meta}

    @classmethod
    def from_state(cls, arch: dict, tensors: dict[str, torch.Tensor]) -> "CompactCNN":
        """Rebuild from :meth:`arch` and :meth:`tensors`, checking that the shapes chain.

        Raises:
            NestError: unknown format, version or layer type; missing or inconsistent tensors.
        """
        def build(layers, index):
            _check_chain(layers, [int(v) for v in arch["input_shape"]], index)
            return cls(layers, arch["input_shape"], index, arch.get("meta"))

        return cls.rebuild(arch, tensors, CNN_LAYER_TYPES, "compact CNN", build, kind=KIND)


def _check_chain(layers: list, input_shape: list[int], index: torch.Tensor | None) -> None:
    """Raise ValueError unless conv stages then linear layers chain from ``input_shape``."""
    n_conv = sum(isinstance(layer, CompactConv2d) for layer in layers)
    if len(input_shape) != 3 or n_conv < 1 or n_conv == len(layers) or \
            any(isinstance(layer, CompactConv2d) for layer in layers[n_conv:]):
        raise ValueError("a compact CNN is conv stages followed by linear layers")
    channels, hw = input_shape[0], tuple(input_shape[1:])
    if index is not None:
        if index.dim() != 1 or (index.numel() and (int(index.min()) < 0 or int(index.max()) >= channels)):
            raise ValueError("input_index does not match the input channels")
        channels = index.numel()
    for layer in layers[:n_conv]:
        out_hw = tuple(conv_out_size(n, layer.kernel_size, layer.stride, layer.padding) for n in hw)
        if layer.in_features != channels or out_hw != layer.out_hw:
            raise ValueError("conv layers do not chain")
        channels, hw = layer.out_features, _pooled(out_hw, layer.pool_spec)
    features = channels * hw[0] * hw[1]
    for layer in layers[n_conv:]:
        if layer.in_features != features:
            raise ValueError("layers do not chain")
        features = layer.out_features


# ---------------------------------------------------------------------------- building


class _Folded:
    """Working copy (float64) of a SparseCNN's folded layers, edited while removing units.

    ``W[i]``, ``b[i]``: folded weights (conv (out, in, k, k), fc (out, in)) and biases;
    for conv layers also ``A[i]`` (out, H, W) the area mask, ``c[i]`` (out,) the batch
    norm of a zero output and ``K[i]`` (out, H, W) constants folded in before the area mask.
    """

    def __init__(self, model: SparseCNN):
        self.model = model
        dt = torch.float64
        self.W, self.b, self.A, self.c, self.K = [], [], [], [], []
        for i, layer in enumerate(model.layers):
            w, b = (t.clone() for t in model.folded_layer(i, dt))
            self.W.append(w)
            self.b.append(b)
            if model.is_conv(i):
                self.A.append(layer.area.detach().to(dt).clone())
                self.c.append(_zero_output_bn(model, i))
                self.K.append(torch.zeros(layer.out_features, *layer.out_hw, dtype=dt))

    def has_in(self, h: int) -> torch.Tensor:
        """(units,) bool: the unit's output depends on the input."""
        live = (self.W[h] != 0).flatten(1).any(dim=1)
        return live & (self.A[h] != 0).flatten(1).any(dim=1) if self.model.is_conv(h) else live

    def out_cols(self, h: int, j: int):
        """Index into ``W[h + 1]`` of the columns reading unit j of hidden layer h."""
        m = self.model
        if h == m.n_conv - 1:  # flattened: unit j is columns j*F .. (j+1)*F - 1
            f = m.flat_size
            return (slice(None), slice(j * f, (j + 1) * f))
        return (slice(None), j)

    def has_out(self, h: int) -> torch.Tensor:
        """(units,) bool: the next layer reads the unit."""
        nz = self.W[h + 1] != 0                          # conv (out, units, k, k) or fc (out, in)
        if h == self.model.n_conv - 1:                   # fc (out, units * F): unit j is columns j*F..
            nz = nz.view(nz.shape[0], -1, self.model.flat_size)
        return nz.transpose(0, 1).flatten(1).any(dim=1)

    def constant_output(self, h: int, j: int) -> torch.Tensor:
        """The input-independent value unit j of hidden layer h passes on: conv (H', W'), fc scalar."""
        m = self.model
        if not m.is_conv(h):
            return m.acts[h](self.b[h][j:j + 1])[0]
        y = (self.b[h][j] + self.K[h][j]) * self.A[h][j] + self.c[h][j] * (1 - self.A[h][j])  # (H, W)
        return m.pools[h](m.acts[h](y[None, None]))[0, 0]                                   # (H', W')

    def fold_constant(self, h: int, j: int) -> None:
        """Add unit j's constant output to layer h+1 and cut it off."""
        m, p = self.model, self.constant_output(h, j)
        cols = self.out_cols(h, j)
        if h + 1 < m.n_conv:      # into the next conv's pre-area map: position-dependent with padding
            nxt = m.layers[h + 1]
            self.K[h + 1] += F.conv2d(p[None, None], self.W[h + 1][:, j:j + 1], None, nxt.stride, nxt.padding)[0]
        elif m.is_conv(h):        # into the first linear layer's bias
            self.b[h + 1] += self.W[h + 1][cols] @ p.flatten()
        else:
            self.b[h + 1] += self.W[h + 1][cols] * p
        self.W[h + 1][cols] = 0


def _zero_output_bn(model: SparseCNN, i: int) -> torch.Tensor:
    """(out,) float64: batch norm (eval) of a zero pre-normalisation output; zeros without BN."""
    n = model.layers[i].out_features
    if not model.norms:
        return torch.zeros(n, dtype=torch.float64)
    bn = model.norms[i]
    scale = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
    return bn.bias.detach().double() - scale * bn.running_mean.double()


def prune_dead_maps(fd: _Folded) -> tuple[list[torch.Tensor], dict]:
    """Remove hidden maps / neurons on no input-output path, folding constant ones (in place).

    Returns:
        (keep, counts): ``keep[h]`` bool over hidden layer h's units; ``counts`` the removed
        units per hidden layer as ``constant`` (folded) and ``dead`` (not read).
    """
    n_hidden = fd.model.n_hidden
    keep = [torch.ones(fd.W[h].shape[0], dtype=torch.bool) for h in range(n_hidden)]
    constant, dead = [0] * n_hidden, [0] * n_hidden
    changed = True
    while changed:
        changed = False
        for h in range(n_hidden):
            for j in torch.nonzero(keep[h] & ~fd.has_out(h)).flatten().tolist():
                keep[h][j] = False
                fd.W[h][j] = 0
                dead[h] += 1
                changed = True
            for j in torch.nonzero(keep[h] & ~fd.has_in(h)).flatten().tolist():
                fd.fold_constant(h, j)
                keep[h][j] = False
                fd.W[h][j] = 0  # an all-zero area leaves live incoming weights: cut them as well
                constant[h] += 1
                changed = True
    return keep, {"constant": constant, "dead": dead}


def _conv_stage(fd: _Folded, h: int, rows: torch.Tensor, cols: torch.Tensor, choice: dict) -> CompactConv2d:
    """The compact conv stage h from the working copy, restricted to ``rows`` x ``cols``."""
    m, layer = fd.model, fd.model.layers[h]
    w = fd.W[h].index_select(0, rows).index_select(1, cols)            # (out', in', k, k)
    b = fd.b[h].index_select(0, rows)                                  # (out',)
    a, k, c = fd.A[h].index_select(0, rows), fd.K[h].index_select(0, rows), fd.c[h].index_select(0, rows)
    area = offset = None
    if bool((a != 0).all()):
        if bool((k == k[:, :1, :1]).all()):                            # uniform per channel: a bias
            b = b + k[:, 0, 0]
        else:
            offset = k
    else:
        area = a
        offset = k * a + c[:, None, None] * (1 - a)                    # (out', H, W)
        if not bool(offset.any()):
            offset = None
    act = m.activation_specs[h] if h < m.n_hidden else None
    return CompactConv2d(w.float(), b.float(), layer.stride, layer.padding, layer.out_hw,
                         None if area is None else area.float(), None if offset is None else offset.float(),
                         act, m.conv_specs[h]["pool"], choice)




def compact_cnn_from_sparse(model: SparseCNN, storage: str = "auto", batch_size: int = 1,
                            meta: dict | None = None, **choose_kwargs) -> tuple[CompactCNN, dict]:
    """Build the compact inference model of a (trained) SparseCNN.

    Args:
        model: the masked CNN (its batch-norm statistics are used, as in eval mode).
        storage: ``"auto"`` / ``"dense"`` / ``"csr"`` / ``"ckernel"`` for the linear layers;
            conv stages are dense (``nn.Conv2d``) or, by ``auto``'s timing or ``ckernel``,
            generated C.
        batch_size: the batch size the ``auto`` decision is measured at.
        meta: plain data to carry along.
        choose_kwargs: passed to :func:`nestsynth.export.choose.choose_storage`.

    Returns:
        (compact model in eval mode, info): widths before and after, removed maps and
        neurons, read input channels, area/offset maps per conv layer, per-layer decisions.

    Raises:
        NestError: unknown storage mode.
    """
    if storage not in ("auto",) + STORAGES:
        raise NestError(f"unknown --sparse mode {storage!r}; valid: auto, {', '.join(STORAGES)}.")
    fd = _Folded(model)
    keep, counts = prune_dead_maps(fd)
    placeholders = [0] * model.n_hidden
    for h in range(model.n_conv):
        if not bool(keep[h].any()):  # nn.Conv2d needs an output channel: map 0 stays, unread
            keep[h][0], placeholders[h] = True, 1
    n_in = model.input_shape[0]
    input_keep = (fd.W[0] != 0).transpose(0, 1).flatten(1).any(dim=1)          # (in channels,)
    in_idx = torch.nonzero(input_keep).flatten()
    if in_idx.numel() == 0 or in_idx.numel() > (1.0 - GATHER_MIN_FRACTION) * n_in:
        in_idx = torch.arange(n_in)
    rows = [torch.nonzero(k).flatten() for k in keep] + [torch.arange(fd.W[-1].shape[0])]
    f = model.flat_size
    first_fc = (rows[model.n_conv - 1][:, None] * f + torch.arange(f)).flatten()  # channel-major columns
    cols = [in_idx] + rows[:-1]
    cols[model.n_conv] = first_fc
    layers, decisions = [], []
    for i in range(len(model.layers)):
        if model.is_conv(i):
            stage = _conv_stage(fd, i, rows[i], cols[i], {"storage": "dense"})
            hw = tuple(model.input_shape[1:]) if i == 0 else _pooled(layers[-1].out_hw, layers[-1].pool_spec)
            choice = choose_conv_storage(stage, (stage.in_features, *hw), batch_size, mode=storage,
                                         **{k: v for k, v in choose_kwargs.items() if k in ("margin", "repeats")})
            layers.append(stage.with_choice(choice))
            name = f"conv{i + 1}"
        else:
            w_c = fd.W[i].index_select(0, rows[i]).index_select(1, cols[i]).float()
            b_c = fd.b[i].index_select(0, rows[i]).float()
            act = model.activation_specs[i] if i < model.n_hidden else None
            choice = choose_storage(w_c, b_c, batch_size, mode=storage, activation=act, **choose_kwargs)
            layers.append(CompactLinear(w_c, b_c, choice["storage"], act, choice))
            name = f"fc{i - model.n_conv + 1}"
        layer = layers[-1]
        decisions.append({"layer": i, "name": name, "in": layer.in_features, "out": layer.out_features,
                          "nnz": layer.nnz, **choice})
    gather = in_idx if in_idx.numel() < n_in else None
    meta = dict(meta or {})
    meta.setdefault("storage_mode", storage)
    meta.setdefault("batch_size", int(batch_size))
    compact = CompactCNN(layers, model.input_shape, gather, meta).eval()
    info = {"widths_masked": model.widths, "widths_compact": compact.widths,
            "inputs_read": int(input_keep.sum()), "inputs": int(n_in), "input_gather": gather is not None,
            "removed_neurons": {"constant_folded": counts["constant"], "dead": counts["dead"]},
            "placeholder_maps": placeholders[:model.n_conv],
            "area_masks": [layer.area is not None for layer in layers[:model.n_conv]],
            "offset_maps": [layer.offset is not None for layer in layers[:model.n_conv]],
            "nnz_masked": int(model.active_weights()), "nnz_compact": compact.nnz(),
            "storage_mode": storage, "batch_size": int(batch_size), "layers": decisions}
    return compact, info
