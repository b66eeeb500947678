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


def keep_units(model, h: int, keep: torch.Tensor, optimizer=None) -> None:
    """Keep only neurons ``keep`` (sorted indices) of hidden layer ``h``.

    Rows of ``layers[h]``, entries of ``norms[h]`` and columns of ``layers[h + 1]``
    are cut together.
    """
    keep = keep.to(model.layers[h].weight.device)
    rows: Edit = lambda t: t.index_select(0, keep)
    cols: Edit = lambda t: t.index_select(1, keep)
    src, dst = model.layers[h], model.layers[h + 1]
    for p in (src.weight, src.bias, src.mask):
        _same(rows, p, optimizer)
    if model.norms:
        bn = model.norms[h]
        for p in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
            _same(rows, p, optimizer)
        bn.num_features = len(keep)
    for p in (dst.weight, dst.mask):
        _same(cols, p, optimizer)


def append_units(model, h: int, w_in: torch.Tensor, w_out: torch.Tensor,
                 optimizer=None, bias: torch.Tensor | None = None) -> None:
    """Add ``k`` neurons to hidden layer ``h``.

    Args:
        w_in: (k, in_h) incoming weights; its non-zero pattern becomes the mask.
        w_out: (out_{h+1}, k) outgoing weights; likewise.
        bias: (k,) biases of the new neurons (zeros when None).
    """
    src, dst = model.layers[h], model.layers[h + 1]
    k = w_in.shape[0]
    _append(src.weight, optimizer, w_in, 0)
    _append(src.bias, optimizer, torch.zeros(k) if bias is None else bias, 0)
    _append(src.mask, None, (w_in != 0).float(), 0)
    _append(dst.weight, optimizer, w_out, 1)
    _append(dst.mask, None, (w_out != 0).float(), 1)
    if model.norms:
        bn = model.norms[h]
        _append(bn.weight, optimizer, torch.ones(k), 0)
        _append(bn.bias, optimizer, torch.zeros(k), 0)
        _append(bn.running_mean, None, torch.zeros(k), 0)
        _append(bn.running_var, None, torch.ones(k), 0)
        bn.num_features += k


def set_mask(layer, new_mask: torch.Tensor, optimizer=None) -> None:
    """Install a new mask on a MaskedLinear.

    Positions switched off get weight 0; positions that change either way get zeroed
    optimizer state (a grown connection starts from a clean slate, a pruned one
    cannot be moved by stale momentum).
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
