"""Shape surgery on a SparseMLP: every change to a layer's units changes, in one place,
its weight, bias, mask, batch-norm entries, the next layer's inputs and the
optimizer's state for all of them.

Parameters keep their identity (``param.data`` is replaced), so an optimizer built
before the surgery goes on working; its per-parameter state tensors (Adam moments,
SGD momentum) are edited the same way as the data, with zeros for new entries.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .conv import MaskedConv2d

Edit = Callable[[torch.Tensor], torch.Tensor]


def _edit(param: torch.Tensor, optimizer: torch.optim.Optimizer | None, data_fn: Edit,
          state_fn: Edit) -> None:
    """Replace ``param``'s data by ``data_fn(data)`` and its optimizer state by ``state_fn``."""
    old_shape = param.shape
    if optimizer is not None and param in optimizer.state:
        state = optimizer.state[param]
        for key, value in list(state.items()):
            if torch.is_tensor(value) and value.shape == old_shape:
                state[key] = state_fn(value)
    param.data = data_fn(param.data)
    if isinstance(param, nn.Parameter):
        param.grad = None


def _same(fn: Edit, param, optimizer) -> None:
    _edit(param, optimizer, fn, fn)


def _append(param, optimizer, new: torch.Tensor, dim: int) -> None:
    """Concatenate ``new`` to ``param`` along ``dim``; optimizer state gets zeros."""
    _edit(param, optimizer,
          lambda t: torch.cat([t, new.to(t.dtype).to(t.device)], dim),
          lambda t: torch.cat([t, torch.zeros_like(new, dtype=t.dtype, device=t.device)], dim))


def _input_columns(model, h: int, units: torch.Tensor) -> torch.Tensor:
    """Input indices of ``layers[h + 1]`` fed by units ``units`` of hidden layer ``h``.

    A linear layer after the last conv stage sees each channel as ``flat_size``
    consecutive (channel-major) inputs; everywhere else a unit is one input.
    """
    if isinstance(model.layers[h], MaskedConv2d) and not isinstance(model.layers[h + 1], MaskedConv2d):
        hw = model.flat_size
        return (units.view(-1, 1) * hw + torch.arange(hw, device=units.device)).flatten()
    return units


def keep_units(model, h: int, keep: torch.Tensor, optimizer=None) -> None:
    """Keep only units ``keep`` (sorted indices) of hidden layer ``h`` (neurons or feature maps).

    Rows (output channels) of ``layers[h]`` with their masks, entries of ``norms[h]`` and
    the matching inputs of ``layers[h + 1]`` (columns, input channels, or channel blocks
    of a flattened feature map) are cut together.
    """
    keep = keep.to(model.layers[h].weight.device)
    rows: Edit = lambda t: t.index_select(0, keep)
    in_cols = _input_columns(model, h, keep)
    cols: Edit = lambda t: t.index_select(1, in_cols)
    src, dst = model.layers[h], model.layers[h + 1]
    for p in (src.weight, src.bias, src.mask) + ((src.area,) if isinstance(src, MaskedConv2d) else ()):
        _same(rows, p, optimizer)
    if model.norms:
        bn = model.norms[h]
        for p in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
            _same(rows, p, optimizer)
        bn.num_features = len(keep)
    for p in (dst.weight, dst.mask):
        _same(cols, p, optimizer)


def warm_second_moment(param: torch.Tensor, optimizer, new: torch.Tensor) -> None:
    """Give the entries ``new`` (bool, param's shape) of Adam's ``exp_avg_sq`` the mean of
    the parameter's other, trained (positive) entries.

    Adam keeps one step count per tensor, so a grown weight that starts from zero moments
    gets no bias correction: its first steps are ``lr * m / sqrt(v)`` with both moments
    just started, several times ``lr`` (about 3x at the first step, 6x after ten).  A warm
    second moment makes its steps start at the size of the layer's other weights.
    Optimizers without ``exp_avg_sq`` (SGD) are left alone.
    """
    if optimizer is None or param not in optimizer.state:
        return
    v = optimizer.state[param].get("exp_avg_sq")
    if not torch.is_tensor(v) or v.shape != param.shape or not bool(new.any()):
        return
    trained = v[~new & (v > 0)]
    v[new] = trained.mean() if trained.numel() else 0.0


def append_units(model, h: int, w_in: torch.Tensor, w_out: torch.Tensor,
                 optimizer=None, bias: torch.Tensor | None = None, warm: bool = False) -> None:
    """Add ``k`` units (neurons or feature maps) to hidden layer ``h``.

    Args:
        w_in: (k, in_h) incoming weights, or (k, in_channels, kh, kw) kernels of new
            feature maps; its non-zero pattern becomes the mask (a new map computes its
            whole output area).
        w_out: (out_{h+1}, k) outgoing weights; (out, k, kh, kw) when the next layer is a
            convolution; (out, k * flat_size) when it is the linear layer after the last
            conv stage.  Its non-zero pattern becomes the mask.
        bias: (k,) biases of the new units (zeros when None).
        warm: the new weights' Adam second moment starts at the layer's mean
            (:func:`warm_second_moment`) instead of zero.
    """
    src, dst = model.layers[h], model.layers[h + 1]
    k = w_in.shape[0]
    _append(src.weight, optimizer, w_in, 0)
    _append(src.bias, optimizer, torch.zeros(k) if bias is None else bias, 0)
    _append(src.mask, None, (w_in != 0).float(), 0)
    if isinstance(src, MaskedConv2d):
        _append(src.area, None, torch.ones(k, *src.area.shape[1:]), 0)
    _append(dst.weight, optimizer, w_out, 1)
    _append(dst.mask, None, (w_out != 0).float(), 1)
    if model.norms:
        bn = model.norms[h]
        _append(bn.weight, optimizer, torch.ones(k), 0)
        _append(bn.bias, optimizer, torch.zeros(k), 0)
        _append(bn.running_mean, None, torch.zeros(k), 0)
        _append(bn.running_var, None, torch.ones(k), 0)
        bn.num_features += k
    if warm:  # the new units: the last k rows of src, the last k input channels/columns of dst
        new_rows = torch.arange(src.bias.shape[0], device=src.bias.device) >= src.bias.shape[0] - k
        warm_second_moment(src.bias, optimizer, new_rows)
        warm_second_moment(src.weight, optimizer, src.mask.bool() & new_rows.view(-1, *[1] * (src.mask.dim() - 1)))
        new_cols = torch.zeros_like(dst.mask, dtype=torch.bool)
        new_cols[:, dst.mask.shape[1] - w_out.shape[1]:] = True
        warm_second_moment(dst.weight, optimizer, dst.mask.bool() & new_cols)


def set_mask(layer, new_mask: torch.Tensor, optimizer=None, warm: bool = False) -> None:
    """Install a new mask on a MaskedLinear.

    Positions switched off get weight 0; positions that change either way get zeroed
    optimizer state (a grown connection starts from a clean slate, a pruned one
    cannot be moved by stale momentum).  With ``warm`` a grown connection's Adam second
    moment starts at the layer's mean instead (:func:`warm_second_moment`).
    """
    new_mask = new_mask.to(layer.mask.dtype)
    changed = new_mask != layer.mask
    layer.mask.copy_(new_mask)
    with torch.no_grad():
        layer.weight.mul_(new_mask)
    if optimizer is not None and layer.weight in optimizer.state:
        for value in optimizer.state[layer.weight].values():
            if torch.is_tensor(value) and value.shape == changed.shape:
                value.masked_fill_(changed, 0.0)
        if warm:
            warm_second_moment(layer.weight, optimizer, changed & new_mask.bool())
