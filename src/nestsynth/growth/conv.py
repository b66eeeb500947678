"""Connection growth for convolutional layers (paper §3.2.3) and memory-bounded scoring.

§3.2.3: "Convolutional layers share the connection growth methodology of Policy 1":
a dormant kernel weight is scored by |dL/dw| exactly like a dormant linear
connection, and the dormant connections with the largest scores are activated.

Dense gradients (what a dormant weight would receive)
-----------------------------------------------------
A masked weight's ``.grad`` is zero at dormant positions (the mask multiplies the
weight inside the forward), so the gradients are computed explicitly from one
forward pass (``model.trace``) and one ``torch.autograd.grad`` pass back to the
layers' outputs ``u_i``; a hook on each ``u_i`` receives ``delta_i = dL/du_i`` as
soon as the backward pass reaches it and turns it into the weight gradient, so the
deltas of all layers are never held at once (:func:`scan_batch`):

* linear layer: ``dL/dW = delta.T @ x``, (out, in), as in :mod:`growth.scores`;
* conv layer ``u = (conv2d(x, W * M) + b) * A``: the area mask ``A`` (Algorithm 2's
  Msk) zeroes outputs, so the gradient with respect to the pre-area convolution
  output is ``delta * A``; a dormant kernel weight would only act through the output
  positions the kernel still computes, hence
  ``dL/dW = conv2d_weight(x, W.shape, delta * A, stride, padding)`` (out, in, k, k).

Both are gradients of the *mean* cross-entropy over all N samples (per-batch sums
divided by N).  The model is evaluated in **eval mode** (batch norm with running
statistics, dropout off), matching :func:`growth.scores.gradient_scan`: the scores are
gradients of the function the model computes at inference, and the same function is
used by feature-map growth and pruning.

Memory-bounded global ranking (:func:`dormant_topk`, :func:`top_dormant`)
-------------------------------------------------------------------------
For large seeds (VGG-16's first linear layer is 18,816 x 3,200 at r = 0.75,
25,088 x 4,096 dense) a full dense score matrix per layer plus the concatenation
used by :func:`grow_connections_global` costs several copies of the whole model.
``dormant_topk`` keeps only a running global top-k (values + flat indices; Policy 1
ranks all layers together, flat index = the layer's offset in the concatenation of
all flattened weights, the order of ``grow_connections_global``) and scores a linear
layer ``block_rows`` output rows at a time: ``dL/dW[rows] = delta[:, rows].T @ x``.
Conv layers are scored whole (their gradient has the size of their weight).

Because the block's gradient needs *all* samples, two modes are offered (``cache``):

* ``cache=True``: one data pass; conv gradients are accumulated, and every linear
  layer's input ``x`` (N, in) and ``delta`` (N, out) are stored.  Peak extra memory
  O(N * (in + out) + block_rows * in + k) per linear layer instead of O(out * in);
  the right choice when the scan uses a data subsample (N << out).
* ``cache=False``: pass ``p`` over the data computes row block ``p`` of *every* linear
  layer at once (``max_i ceil(out_i / block_rows)`` passes; after the first, only the
  head's deltas are requested).  Peak extra memory O(block_rows * sum(in) + k),
  independent of N, at the price of repeated forward passes.
* ``cache=None`` (default) picks ``True`` when the stored linear inputs and deltas
  fit in ``max_cache_elems`` elements.

Candidates are dormant positions with a positive score (as ``grow_connections_global``:
a zero gradient cannot reduce the loss), so live connections are never selected.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.grad import conv2d_weight

from ..distributed import current
from ..select import top_k
from ..sparse.conv import MaskedConv2d


def _is_conv(layer) -> bool:
    return isinstance(layer, MaskedConv2d)


def _pre_area_delta(layer, delta: torch.Tensor) -> torch.Tensor:
    """dL/d(conv output before bias and area) from dL/du: ``delta * A`` (B, out, H', W')."""
    return delta if bool(layer.area.all()) else delta * layer.area


def weight_gradient(layer, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Dense dL/dW of one masked layer, valid at dormant positions.

    Args:
        layer: a MaskedLinear or MaskedConv2d.
        x: the layer's input, (B, in) or (B, in, H, W).
        delta: dL/du for the layer's output u, (B, out) or (B, out, H', W').

    Returns:
        A tensor of the weight's shape: ``delta.T @ x`` or
        ``conv2d_weight(x, W.shape, delta * A, stride, padding)``.
    """
    if _is_conv(layer):
        return conv2d_weight(x, layer.weight.shape, _pre_area_delta(layer, delta), layer.stride, layer.padding,
                             getattr(layer, "dilation", 1))
    return delta.T @ x


def scan_batch(model, xb: torch.Tensor, yb: torch.Tensor, n: int, wanted: list[int], on_delta) -> None:
    """One traced forward and backward pass of a batch, handing each layer's delta to a callback.

    ``on_delta(i, x_i, delta_i)`` is called (under no_grad) during the backward pass as
    soon as ``delta_i = dL/du_i`` is known, for every i in ``wanted``; the delta is not
    kept afterwards, so a scan holds the activations of one batch and a few deltas,
    not every layer's delta at once.  The loss is the batch's share of the mean
    cross-entropy over n samples.
    """
    inputs, outputs = model.trace(xb)
    loss = F.cross_entropy(outputs[-1], yb, reduction="sum") / n

    def hook(i: int):
        x = inputs[i].detach()

        def fn(g: torch.Tensor) -> None:
            with torch.no_grad():
                on_delta(i, x, g.detach())
        return fn

    for i in wanted:
        outputs[i].register_hook(hook(i))
    torch.autograd.grad(loss, outputs[min(wanted)])  # runs the hooks; the returned delta is dropped


def _batches(n: int, batch_size: int):
    for start in range(0, n, max(1, int(batch_size))):
        yield slice(start, start + batch_size)


class _EvalMode:
    """Context: the model in eval mode, its previous mode restored afterwards."""

    def __init__(self, model):
        self.model, self.was = model, model.training

    def __enter__(self):
        self.model.eval()
        return self.model

    def __exit__(self, *exc):
        self.model.train(self.was)


def layer_gradients(model, X: torch.Tensor, y: torch.Tensor, batch_size: int = 2048) -> list[torch.Tensor]:
    """Dense dL/dW of every weight layer (conv and linear) of a SparseCNN or SparseMLP.

    Args:
        model: SparseCNN or SparseMLP (evaluated in eval mode, restored afterwards).
        X: (N, *input_shape) inputs; y: (N,) labels.
        batch_size: samples per forward pass.

    Returns:
        One tensor per layer, shaped like its weight: the gradient of the mean
        cross-entropy over the N samples, at every position (dormant ones included).
    """
    n = len(X)
    layers = model.layers
    grads = [torch.zeros_like(layer.weight, memory_format=torch.contiguous_format) for layer in layers]

    def add(i, x, d):
        grads[i] += weight_gradient(layers[i], x, d)

    with _EvalMode(model):
        for sl in _batches(n, batch_size):
            scan_batch(model, X[sl], y[sl], n, list(range(len(layers))), add)
    return grads


class RunningTopK:
    """The k largest positive scores seen so far, with their global flat indices."""

    def __init__(self, k: int, device=None, dtype=torch.float32):
        self.k = max(0, int(k))
        self.values = torch.empty(0, device=device, dtype=dtype)
        self.indices = torch.empty(0, device=device, dtype=torch.long)

    def push(self, scores: torch.Tensor, offset: int) -> None:
        """Merge a block of scores (any shape; flat position p is global index offset + p).

        Non-positive scores (live positions are passed as 0) are never kept.
        """
        if self.k == 0 or scores.numel() == 0:
            return
        flat = scores.reshape(-1)
        full = len(self.values) == self.k
        # only scores at least the current k-th best (or above 0) can enter; an equal score
        # may still win its tie by a lower global index
        idx = torch.nonzero(flat >= self.values[-1] if full else flat > 0).squeeze(1)  # (m,)
        vals = torch.cat([self.values, flat[idx].to(self.values.dtype)])
        idx = torch.cat([self.indices, idx + offset])
        order = torch.argsort(idx)  # by global index: the selector's tie rule is then the global one
        vals, idx = vals[order], idx[order]
        best = top_k(vals, self.k)
        self.values, self.indices = vals[best], idx[best]


def _dormant_scores(grad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """|grad| with live positions set to 0 (never candidates)."""
    return grad.abs().masked_fill_(mask.bool(), 0.0)


def _layer_offsets(model) -> list[int]:
    offsets, total = [], 0
    for layer in model.layers:
        offsets.append(total)
        total += layer.weight.numel()
    return offsets


def _linear_cache_elems(model, n: int) -> int:
    return sum(n * (layer.in_features + layer.out_features) for layer in model.layers if not _is_conv(layer))


def dormant_topk(model, X: torch.Tensor, y: torch.Tensor, k: int, batch_size: int = 256,
                 block_rows: int = 256, cache: bool | None = None,
                 max_cache_elems: int = 2 ** 27) -> tuple[torch.Tensor, torch.Tensor]:
    """The k dormant connections with the largest |dL/dw| over all layers (Policy 1, global).

    See the module docstring for the modes.  Never forms a dense score matrix of a
    linear layer; a conv layer's (weight-sized) gradient is formed whole.

    Args:
        model: SparseCNN or SparseMLP (eval mode during the scan, restored afterwards).
        X: (N, *input_shape); y: (N,) labels.
        k: connections to select (fewer if fewer dormant positions have a positive score).
        batch_size: samples per forward pass.
        block_rows: output rows of a linear layer scored at once.
        cache: store linear inputs/deltas (True), recompute per row block (False), or
            decide by ``max_cache_elems`` (None).

    Returns:
        (values (k',), flat indices (k',)) sorted by decreasing score; flat index =
        layer offset (sum of the numel of earlier weights) + position in the layer's
        flattened weight.
    """
    n = len(X)
    layers = list(model.layers)
    offsets = _layer_offsets(model)
    conv_ids = [i for i, layer in enumerate(layers) if _is_conv(layer)]
    lin_ids = [i for i, layer in enumerate(layers) if not _is_conv(layer)]
    if cache is None:  # decided on the whole sample, so every rank takes the same path
        cache = _linear_cache_elems(model, n) <= max_cache_elems
    block_rows = max(1, int(block_rows))
    top = RunningTopK(k, X.device, layers[0].weight.dtype)
    X, y = current().shard(X, y)  # under torchrun: this rank's part; every block is summed before its push
    with _EvalMode(model):
        if cache:
            _scan_cached(model, X, y, n, top, offsets, conv_ids, lin_ids, batch_size, block_rows)
        else:
            _scan_uncached(model, X, y, n, top, offsets, conv_ids, lin_ids, batch_size, block_rows)
    return top.values, top.indices


def _push_linear_block(top: RunningTopK, layer, g_rows: torch.Tensor, r0: int, offset: int) -> None:
    """Push rows r0.. of a linear layer's gradient block (rows, in), summed across ranks."""
    g_rows = current().all_reduce_sum([g_rows])[0]
    rows = slice(r0, r0 + len(g_rows))
    top.push(_dormant_scores(g_rows, layer.mask[rows]), offset + r0 * layer.in_features)


def _push_conv(top: RunningTopK, layer, g: torch.Tensor, offset: int) -> None:
    """Push a conv layer's dormant scores from its gradient, summed across ranks."""
    top.push(_dormant_scores(current().all_reduce_sum([g])[0], layer.mask), offset)


def _scan_cached(model, X, y, n, top, offsets, conv_ids, lin_ids, batch_size, block_rows) -> None:
    """One data pass: conv gradients accumulated; linear x (B, in) and delta (B, out) stored
    (B: this process's part of the n examples)."""
    layers = model.layers
    conv_g = {i: torch.zeros_like(layers[i].weight, memory_format=torch.contiguous_format) for i in conv_ids}
    xs = {i: [] for i in lin_ids}
    ds = {i: [] for i in lin_ids}

    def on_delta(i, x, d):
        if i in conv_g:
            conv_g[i] += weight_gradient(layers[i], x, d)
        else:
            xs[i].append(x)
            ds[i].append(d)

    for sl in _batches(len(X), batch_size):
        scan_batch(model, X[sl], y[sl], n, conv_ids + lin_ids, on_delta)
    with torch.no_grad():
        for i in conv_ids:
            _push_conv(top, layers[i], conv_g.pop(i), offsets[i])
        for i in lin_ids:
            layer, xi, di = layers[i], xs.pop(i), ds.pop(i)  # a rank with no examples: zero blocks, still summed
            x = torch.cat(xi) if xi else layer.weight.new_zeros(0, layer.in_features)  # (N, in)
            d = torch.cat(di) if di else layer.weight.new_zeros(0, layer.out_features)  # (N, out)
            for r0 in range(0, layers[i].out_features, block_rows):
                g = d[:, r0:r0 + block_rows].T @ x  # (rows, in)
                _push_linear_block(top, layers[i], g, r0, offsets[i])


def _scan_uncached(model, X, y, n, top, offsets, conv_ids, lin_ids, batch_size, block_rows) -> None:
    """Pass p over the data accumulates row block p of every linear layer (and, in pass 0,
    the conv gradients)."""
    layers = model.layers
    passes = max(-(-layers[i].out_features // block_rows) for i in lin_ids) if lin_ids else 1
    for p in range(passes):
        r0 = p * block_rows
        live = [i for i in lin_ids if r0 < layers[i].out_features]
        acc = {i: torch.zeros_like(layers[i].weight, memory_format=torch.contiguous_format)
               for i in (conv_ids if p == 0 else [])}
        acc.update({i: layers[i].weight.new_zeros(min(block_rows, layers[i].out_features - r0),
                                                   layers[i].in_features) for i in live})

        def on_delta(i, x, d):
            if i in lin_ids:
                acc[i] += d[:, r0:r0 + block_rows].T @ x  # (rows, in)
            else:
                acc[i] += weight_gradient(layers[i], x, d)

        for sl in _batches(len(X), batch_size):
            scan_batch(model, X[sl], y[sl], n, [i for i in conv_ids + live if i in acc], on_delta)
        with torch.no_grad():
            for i in list(acc):
                if i in lin_ids:
                    _push_linear_block(top, layers[i], acc.pop(i), r0, offsets[i])
                else:
                    _push_conv(top, layers[i], acc.pop(i), offsets[i])


def masks_with(model, flat_indices: torch.Tensor) -> list[torch.Tensor]:
    """Every layer's mask with the given global flat positions switched on (old | selected)."""
    out = []
    for layer, off in zip(model.layers, _layer_offsets(model)):
        n = layer.mask.numel()
        new = layer.mask.clone()
        local = flat_indices[(flat_indices >= off) & (flat_indices < off + n)] - off
        new.view(-1)[local.to(new.device)] = 1
        out.append(new)
    return out


def top_dormant(model, X: torch.Tensor, y: torch.Tensor, k: int, batch_size: int = 256,
                block_rows: int = 256, cache: bool | None = None,
                max_cache_elems: int = 2 ** 27) -> list[torch.Tensor]:
    """Policy 1 over the whole network with bounded memory: new masks after waking k connections.

    Equals ``grow_connections_global([|g| for g in layer_gradients(...)], masks, k)``
    (up to ties) without the dense score matrices.  Arguments as :func:`dormant_topk`.

    Returns:
        One new mask per layer (old mask | selected dormant positions); install with
        ``sparse.set_mask``.
    """
    _, idx = dormant_topk(model, X, y, k, batch_size, block_rows, cache, max_cache_elems)
    return masks_with(model, idx)
