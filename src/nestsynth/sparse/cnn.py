"""The sparse CNN that NeST grows and prunes: convolutional stages, then an MLP head.

Layout (mirrors :class:`SparseMLP`): ``layers`` holds every weight layer in order, the
``n_conv`` :class:`MaskedConv2d` first, then :class:`MaskedLinear`.  Hidden layer ``h``
(every layer but the last) is ``layers[h]``'s output, optionally batch-normalised
(``norms[h]``), passed through ``acts[h]``, then pooled (conv layers, ``pools[h]``) and
dropped out (``drops[h]``); the last conv stage is flattened channel-major, so the first
linear layer's input ``c * H * W + p`` is position ``p`` of channel ``c``.  ``widths``
counts units per layer (channels, then neurons).  The architecture is plain data
(:meth:`SparseCNN.arch`), so checkpoints rebuild it without pickle.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import NestError
from .conv import MaskedConv2d, conv_out_size
from .masked import MaskedLinear
from .mlp import activation_spec, make_activation
from .network import MaskedNetwork


def _pool(spec: str | None) -> nn.Module:
    """``"max:K:S"`` / ``"avg:K:S"`` -> a pooling module; None -> Identity."""
    if not spec:
        return nn.Identity()
    kind, k, s = (spec.split(":") + ["", ""])[:3]
    k = int(k or 2)
    s = int(s or k)
    if kind == "max":
        return nn.MaxPool2d(k, s)
    if kind == "avg":
        return nn.AvgPool2d(k, s)
    raise NestError(f"unknown pooling {spec!r}; use max:K:S or avg:K:S.")


def _pool_spec(module: nn.Module) -> str | None:
    def one(v):
        return v[0] if isinstance(v, (tuple, list)) else v
    if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
        kind = "max" if isinstance(module, nn.MaxPool2d) else "avg"
        if one(module.padding):
            raise NestError("pooling with padding is not supported.")
        return f"{kind}:{one(module.kernel_size)}:{one(module.stride or module.kernel_size)}"
    return None


def _pooled(hw: tuple[int, int], spec: str | None) -> tuple[int, int]:
    if not spec:
        return hw
    _, k, s = spec.split(":")
    return conv_out_size(hw[0], int(k), int(s), 0), conv_out_size(hw[1], int(k), int(s), 0)


class SparseCNN(MaskedNetwork):
    """A masked sequential CNN whose feature maps and neurons can grow and shrink.

    Args:
        input_shape: (C, H, W) of one input.
        conv: one dict per conv layer: ``out``, ``kernel``, ``stride`` (1), ``padding`` (0),
            ``act`` ("relu"), ``pool`` (None or "max:K:S" / "avg:K:S"), ``dropout`` (0).
        fc: one dict per linear layer: ``out``, ``act`` ("relu"; ignored for the last),
            ``dropout`` (0).
        batch_norm: BatchNorm after every hidden weight layer (2-d for conv, 1-d for fc).
        generator: RNG for the initial weights.
    """

    def __init__(self, input_shape, conv: list[dict], fc: list[dict], batch_norm: bool = False,
                 generator: torch.Generator | None = None):
        super().__init__()
        if not conv or not fc:
            raise NestError("a SparseCNN needs at least one conv layer and one linear layer.")
        self.input_shape = tuple(int(v) for v in input_shape)
        self.conv_specs = [dict(stride=1, padding=0, act="relu", pool=None, dropout=0.0) | dict(c) for c in conv]
        self.fc_specs = [dict(act="relu", dropout=0.0) | dict(f) for f in fc]
        layers, hw, channels, self.conv_hw = [], self.input_shape[1:], self.input_shape[0], []
        for c in self.conv_specs:
            out_hw = tuple(conv_out_size(n, c["kernel"], c["stride"], c["padding"]) for n in hw)
            if min(out_hw) < 1:
                raise NestError(f"the conv layers shrink the {self.input_shape} input below one pixel.")
            layers.append(MaskedConv2d(channels, c["out"], c["kernel"], out_hw, c["stride"], c["padding"], generator))
            self.conv_hw.append(out_hw)
            hw, channels = _pooled(out_hw, c["pool"]), c["out"]
            if min(hw) < 1:
                raise NestError(f"pooling shrinks the {self.input_shape} input below one pixel.")
        self.flat_hw = tuple(hw)  # spatial size of each channel entering the first linear layer
        features = channels * hw[0] * hw[1]
        for f in self.fc_specs:
            layers.append(MaskedLinear(features, f["out"], generator))
            features = f["out"]
        self.layers = nn.ModuleList(layers)
        n_hidden = len(layers) - 1
        hidden = self.conv_specs + self.fc_specs[:-1]
        self.activation_specs = [h["act"] for h in hidden]
        self.acts = nn.ModuleList(make_activation(a) for a in self.activation_specs)
        self.pools = nn.ModuleList(_pool(c["pool"]) for c in self.conv_specs)
        self.drops = nn.ModuleList(nn.Dropout(h["dropout"]) if h["dropout"] else nn.Identity() for h in hidden)
        self.norms = nn.ModuleList(
            (nn.BatchNorm2d(layers[h].out_features) if h < self.n_conv else nn.BatchNorm1d(layers[h].out_features))
            for h in range(n_hidden)) if batch_norm else nn.ModuleList()

    # ---- structure ---------------------------------------------------------
    @property
    def n_conv(self) -> int:
        return len(self.conv_specs)

    @property
    def flat_size(self) -> int:
        """Positions per channel entering the first linear layer (H * W after the last pool)."""
        return self.flat_hw[0] * self.flat_hw[1]

    @property
    def widths(self) -> list[int]:
        return [self.input_shape[0]] + [layer.out_features for layer in self.layers]

    def is_conv(self, i: int) -> bool:
        return i < self.n_conv

    def arch(self) -> dict:
        """Plain-data description, enough to rebuild the module (see :meth:`from_arch`)."""
        conv = [dict(c, out=self.layers[i].out_features) for i, c in enumerate(self.conv_specs)]
        fc = [dict(f, out=self.layers[self.n_conv + j].out_features) for j, f in enumerate(self.fc_specs)]
        return {"kind": "cnn", "input_shape": list(self.input_shape), "conv": conv, "fc": fc,
                "batch_norm": self.batch_norm}

    @classmethod
    def from_arch(cls, arch: dict) -> "SparseCNN":
        return cls(arch["input_shape"], arch["conv"], arch["fc"], bool(arch["batch_norm"]))

    # ---- forward -----------------------------------------------------------
    def hidden_post(self, h: int, u: torch.Tensor) -> torch.Tensor:
        """Hidden layer h's output from its pre-normalisation output u: BN, activation,
        pooling (conv), dropout; flattened after the last conv layer."""
        if self.norms:
            u = self.norms[h](u)
        u = self.acts[h](u)
        if h < self.n_conv:
            u = self.pools[h](u)
        u = self.drops[h](u)
        return u.flatten(1) if h == self.n_conv - 1 else u

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(len(x), *self.input_shape)  # (B, C, H, W)


def cnn_from_sequential(seq: nn.Sequential, input_shape) -> SparseCNN:
    """Convert a user's ``nn.Sequential`` CNN to a fully connected SparseCNN with the same weights.

    Accepted: Conv2d (square kernel, groups 1, no dilation), BatchNorm2d, element-wise
    activations, MaxPool2d/AvgPool2d, Dropout, one Flatten, Linear, BatchNorm1d.

    Raises:
        NestError: another module type, or an order the layout cannot express.
    """
    conv, fc, convs, linears, norms, pending = [], [], [], [], [], None
    for module in seq:
        current = conv[-1] if conv and not fc else (fc[-1] if fc else None)
        if isinstance(module, nn.Conv2d):
            if fc or module.groups != 1 or module.dilation not in ((1, 1), 1) or \
                    module.kernel_size[0] != module.kernel_size[1] or isinstance(module.padding, str):
                raise NestError("conv layers must come before the linear ones and have square kernels, "
                                "groups 1, no dilation and numeric padding.")
            conv.append({"out": module.out_channels, "kernel": module.kernel_size[0], "stride": module.stride[0],
                         "padding": module.padding[0], "act": None, "pool": None, "dropout": 0.0})
            convs.append(module)
        elif isinstance(module, nn.Linear):
            fc.append({"out": module.out_features, "act": None, "dropout": 0.0})
            linears.append(module)
        elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)) and current is not None and current["act"] is None:
            norms.append(module)
        elif activation_spec(module) is not None and current is not None and current["act"] is None:
            current["act"] = activation_spec(module)
        elif _pool_spec(module) is not None and conv and not fc and conv[-1]["pool"] is None:
            conv[-1]["pool"] = _pool_spec(module)
        elif isinstance(module, nn.Dropout) and current is not None:
            current["dropout"] = float(module.p)
        elif isinstance(module, nn.Flatten) and conv and not fc and pending is None:
            pending = True
        else:
            raise NestError(f"cannot synthesize from a {type(module).__name__} module at this position; a CNN "
                            "must be Conv2d (BatchNorm2d) activation (pooling) ... Flatten Linear ... Linear.")
    if not conv or not fc or any(c["act"] is None for c in conv) or any(f["act"] is None for f in fc[:-1]):
        raise NestError("every conv layer and every hidden Linear needs an activation, and the model needs "
                        "conv layers followed by Linear layers.")
    fc[-1]["act"] = "identity"
    if len(norms) not in (0, len(conv) + len(fc) - 1):
        raise NestError("batch norm must follow every hidden layer or none.")
    model = SparseCNN(input_shape, conv, fc, batch_norm=bool(norms))
    if model.layers[model.n_conv].in_features != linears[0].in_features:
        raise NestError(f"the conv stages give {model.layers[model.n_conv].in_features} features for an input of "
                        f"shape {tuple(input_shape)}, but the first Linear expects {linears[0].in_features}.")
    with torch.no_grad():
        for dst, src in zip(model.layers, convs + linears):
            dst.weight.copy_(src.weight)
            dst.bias.copy_(src.bias if src.bias is not None else torch.zeros_like(dst.bias))
        for dst, src in zip(model.norms, norms):
            dst.load_state_dict(copy.deepcopy(src.state_dict()))
    return model
