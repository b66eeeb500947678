"""Feature-map growth, Policy 3 (paper §3.2.3).

"To add a new feature map to the convolutional layers, randomly generate sets of
kernels, and pick the set of kernels that reduces L the most."  The paper reports
that the loss reduction of the chosen set is about twice that of a random set (the
naive approach); ``stats["ratio"]`` measures exactly that.

A candidate for hidden conv layer ``h`` is one new feature map:

* ``w_in`` (1, in_h, k, k): its incoming kernels (one k x k kernel per input channel);
* ``w_out``: its outgoing weights into layer h+1 -- (out_{h+1}, 1, k', k') kernels when
  h+1 is a convolution, (out_{h+1}, flat_size) columns when h+1 is the first linear
  layer (the new channel's flattened positions, channel-major).

Both shapes are those :func:`sparse.append_units` takes (with one unit), so the lead
installs a result with ``append_units(model, h, w_in, w_out)``.

Choices (the paper gives no details):

* Sparsity: a connection is a single kernel weight (the mask granularity of
  :class:`MaskedConv2d`); a random ``density`` share of the positions of ``w_in`` and
  of ``w_out`` (exactly ``max(1, round(density * numel))`` each, chosen uniformly) is
  active, the rest is zero (and becomes dormant under ``append_units``).
* Scale: ``scale="layer"`` (default) draws active weights from U(-a, a) with
  ``a = 2 * mean|w|`` over the active weights of the layer being extended
  (layer h for ``w_in``, layer h+1 for ``w_out``), i.e. the same mean magnitude as the
  trained layer (cf. the birth strength of Eq. 7); ``scale="default"`` uses PyTorch's
  default bound ``1 / sqrt(fan_in)`` (fan_in = in_h*k*k for ``w_in``; the current fan-in
  of layer h+1 for ``w_out``); a float is used as the bound ``a`` for both.  A layer
  without active weights falls back to the default bound.
* Outgoing weights (``out_init``): ``"random"`` keeps the random sparse ``w_out`` drawn
  with the kernels.  ``"gradient"`` (the default of the synthesis loop, an addition to the
  paper) keeps the candidate's random kernels but gives it the outgoing weights that
  reduce the loss fastest: G = dL/dw_out at w_out = 0 (exact:
  ``conv2d_weight(post, ., delta * A_{h+1})`` or ``delta.T @ post``, with delta = dL/du_{h+1}
  of the model with the earlier maps), w_out = -G on the ``max(1, round(density * numel))``
  positions of largest |G| (as connection growth, Policy 1), scaled to the mean magnitude
  of the random draw (bound / 2).  Measured on LeNet-5/MNIST (two runs each, maps whose
  mean output after growth is above the removal threshold): random outgoing weights kept
  5 of 26 grown conv1 maps and 0 of 26 conv2 maps (the others died: a random map adds
  noise to a trained network and training shuts its ReLU); gradient outgoing weights 10
  of 26 and 0 of 26; together with warm Adam state (``growth.adam_warm``) 22 of 22 and
  6 of 22.
* The new map's bias is 0; with batch norm it gets the entries ``append_units``
  installs (running mean 0, var 1, weight 1, bias 0).  The new map computes its whole
  output area.
* Loss: mean cross-entropy on the given batch, model in **eval mode** (batch norm with
  running statistics, dropout off; as the gradient scores in :mod:`growth.scores`).
  The model is not modified: one traced forward gives layer h's input x_h and layer
  h+1's output u_{h+1}; a candidate adds its exact contribution
  ``e = conv2d(post(conv2d(x_h, w_in)), w_out) * A_{h+1}`` (or ``post(.).flatten @ w_out.T``
  for a linear layer h+1) to u_{h+1}, and the rest of the network runs from there.
  A new channel does not interact with layer h's other channels, so this equals the
  model with the map installed (tested against ``append_units`` on a deep copy).
* Several maps (:func:`grow_feature_maps`): chosen one after another, each given the
  previously chosen ones (their contributions to u_{h+1} add up).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..distributed import current
from ..errors import NestError
from ..select import top_k
from ..sparse.conv import MaskedConv2d


# ---- candidates ------------------------------------------------------------------
def _check_layer(model, h: int) -> None:
    if not (0 <= h < model.n_hidden and isinstance(model.layers[h], MaskedConv2d)):
        raise NestError(f"feature-map growth needs a hidden conv layer; layer {h} is not one.")


def _mean_abs_active(layer) -> float:
    w = (layer.weight.detach() * layer.mask)
    nz = w[w != 0]
    return float(nz.abs().mean()) if nz.numel() else 0.0


def _out_shape(model, h: int) -> tuple[int, ...]:
    """Shape of one new map's outgoing weights into layer h+1."""
    nxt = model.layers[h + 1]
    if isinstance(nxt, MaskedConv2d):
        return (nxt.out_features, 1, nxt.kernel_size, nxt.kernel_size)
    return (nxt.out_features, model.flat_size)


def _bounds(model, h: int, scale) -> tuple[float, float]:
    """Uniform bounds (a_in, a_out) of the new map's incoming and outgoing weights."""
    return layer_bound(model.layers[h], scale), layer_bound(model.layers[h + 1], scale)


def layer_bound(layer, scale) -> float:
    """Uniform bound of new weights of ``layer`` (see the module docstring's "Scale"):
    a number as it is; "default": 1/sqrt(the layer's current fan-in); "layer": twice the
    mean |w| of its active weights (the default bound when it has none)."""
    default = 1.0 / math.sqrt(layer.weight[0].numel())  # in * k * k for a conv layer
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        return float(scale)
    if scale == "default":
        return default
    if scale == "layer":
        return 2 * _mean_abs_active(layer) or default
    raise NestError(f"unknown scale {scale!r}; use 'layer', 'default' or a number.")


def _sparse_uniform(shape, density: float, bound: float, generator: torch.Generator) -> torch.Tensor:
    """U(-bound, bound) weights at exactly max(1, round(density * numel)) random positions, 0 elsewhere."""
    n = math.prod(shape)
    active = min(n, max(1, round(density * n)))
    w = torch.zeros(n)
    pos = torch.randperm(n, generator=generator)[:active]
    w[pos] = (torch.rand(active, generator=generator) * 2 - 1) * bound
    return w.view(shape)


def random_feature_map(model, h: int, density: float, generator: torch.Generator,
                       scale="layer") -> tuple[torch.Tensor, torch.Tensor]:
    """One random candidate map for hidden conv layer h (see the module docstring).

    Returns:
        (w_in (1, in_h, k, k), w_out (out_{h+1}, 1, k', k') or (out_{h+1}, flat_size)),
        on the model's device and dtype.
    """
    _check_layer(model, h)
    src = model.layers[h]
    a_in, a_out = _bounds(model, h, scale)
    w_in = _sparse_uniform((1, src.in_features, src.kernel_size, src.kernel_size), density, a_in, generator)
    w_out = _sparse_uniform(_out_shape(model, h), density, a_out, generator)
    like = src.weight
    return w_in.to(like.device, like.dtype), w_out.to(like.device, like.dtype)


# ---- exact loss of a model with extra maps -----------------------------------------
def new_map_output(model, h: int, x_h: torch.Tensor, w_in: torch.Tensor) -> torch.Tensor:
    """What a new map with kernels ``w_in`` feeds layer h+1: its convolution of layer h's
    input ``x_h``, then hidden_post for a new channel (B, 1, H, W): BN with the entries
    append_units installs (eval: u / sqrt(1 + eps)), activation, pooling; flattened
    (B, flat_size) after the last conv."""
    src = model.layers[h]
    u = F.conv2d(x_h, w_in, None, src.stride, src.padding)
    if model.norms:
        u = u / math.sqrt(1.0 + model.norms[h].eps)
    u = model.pools[h](model.acts[h](u))
    return u.flatten(1) if h == model.n_conv - 1 else u


def map_contribution(model, h: int, post: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
    """The change of layer h+1's output u_{h+1} when a map of layer h is added.

    Args:
        post: the map's output (:func:`new_map_output`).
        w_out: its outgoing weights, as :func:`random_feature_map` returns them.

    Returns:
        (B, out_{h+1}, H', W') for a conv layer h+1 (area mask applied), else (B, out_{h+1}).
    """
    nxt = model.layers[h + 1]
    if isinstance(nxt, MaskedConv2d):
        extra = F.conv2d(post, w_out, None, nxt.stride, nxt.padding)
        return extra if bool(nxt.area.all()) else extra * nxt.area
    return post @ w_out.T


def forward_from(model, i: int, u: torch.Tensor) -> torch.Tensor:
    """Logits from layer i's (pre-normalisation) output u."""
    x = model.hidden_post(i, u) if i < model.n_hidden else u
    for j in range(i + 1, len(model.layers)):
        x = model.layers[j](x)
        if j < model.n_hidden:
            x = model.hidden_post(j, x)
    return x


def loss_gradient(model, h: int, u_next: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The error signal a new map of layer h feeds into: dL/du_{h+1} (mean cross-entropy,
    eval mode), times layer h+1's area mask when it is a convolution (a contribution
    :func:`map_contribution` adds is masked the same way)."""
    with torch.enable_grad():
        u = u_next.detach().requires_grad_(True)
        loss = F.cross_entropy(forward_from(model, h + 1, u), y)
        delta = torch.autograd.grad(loss, u)[0]
    nxt = model.layers[h + 1]
    return delta * nxt.area if isinstance(nxt, MaskedConv2d) and not bool(nxt.area.all()) else delta


def gradient_outgoing(model, h: int, post: torch.Tensor, delta: torch.Tensor, count: int,
                      bound: float) -> torch.Tensor:
    """Outgoing weights of a new map with output ``post`` (:func:`new_map_output`) along the
    negative loss gradient (``delta``: :func:`loss_gradient`).

    G = dL/dw_out at w_out = 0 (the map's output does not change the loss yet), computed
    explicitly; the ``count`` positions of largest |G| get -G, scaled so their mean
    magnitude is ``bound / 2``; the rest is 0.

    Under torchrun ``post`` and ``delta`` are this rank's part of the data (``delta``
    scaled to the whole mean) and G is summed across ranks before the choice.

    Returns:
        w_out with the shape :func:`random_feature_map` gives.
    """
    nxt = model.layers[h + 1]
    if isinstance(nxt, MaskedConv2d):
        g = torch.nn.grad.conv2d_weight(post, _out_shape(model, h), delta, nxt.stride, nxt.padding)
    else:
        g = delta.T @ post
    return descent_weights(current().all_reduce_sum([g])[0], count, bound)  # torchrun: shards' sums


def descent_weights(g: torch.Tensor, count: int, bound: float) -> torch.Tensor:
    """Outgoing weights along the negative gradient ``g`` (dL/dw_out at w_out = 0): -g on the
    ``count`` positions of largest |g|, scaled so their mean magnitude is ``bound / 2`` (the
    mean of a U(-bound, bound) draw); 0 elsewhere.  Shaped like ``g``."""
    flat = g.flatten()
    keep = top_k(flat.abs(), count)
    w = torch.zeros_like(flat)
    w[keep] = -flat[keep]
    size = float(w[keep].abs().mean())
    if size > 0:
        w *= (bound / 2) / size
    return w.view_as(g)


def _mean_loss(logits: torch.Tensor, y: torch.Tensor, n: int) -> float:
    """Mean cross-entropy over the ``n`` examples of which (logits, y) are this process's part
    (all of them alone; under torchrun the ranks' sums are added)."""
    dist = current()
    if not dist.active:
        return float(F.cross_entropy(logits, y))
    total = F.cross_entropy(logits, y, reduction="sum").reshape(1).double()
    return float(dist.all_reduce_sum([total])[0]) / n


def _stats(loss_before: float, losses: list[float], best: int) -> dict:
    reductions = [loss_before - v for v in losses]
    mean_red = sum(reductions) / len(reductions)
    best_red = reductions[best]
    return {"loss_before": loss_before, "best_loss": losses[best], "best_index": best,
            "best_reduction": best_red, "mean_random_reduction": mean_red,
            "ratio": best_red / mean_red if mean_red > 1e-12 else float("nan"),
            "candidate_losses": losses}


# ---- Policy 3 --------------------------------------------------------------------
def grow_feature_maps(model, h: int, n_maps: int, X: torch.Tensor, y: torch.Tensor, candidates: int,
                      density: float, generator: torch.Generator, scale="layer", out_init: str = "random"):
    """``n_maps`` new feature maps for hidden conv layer h, chosen one after another.

    Map j is the best of ``candidates`` random maps for the model with maps 0..j-1
    already added.  The model is not modified.

    Args:
        model: SparseCNN (evaluated in eval mode, restored afterwards).
        h: hidden conv layer index.
        X, y: the batch the loss is measured on (mean cross-entropy).
        candidates: random candidate maps per new map (>= 1).
        density: share of active weights in each candidate's w_in and w_out.
        generator: RNG for the candidates (candidate c of map j is the
            (j * candidates + c)-th call of :func:`random_feature_map`).
        scale: "layer", "default" or a float bound (module docstring).
        out_init: "random" (the candidate's random outgoing weights) or "gradient"
            (outgoing weights along -dL/dw_out, :func:`gradient_outgoing`).

    Returns:
        (w_in (n, in_h, k, k), w_out (out, n, k', k') or (out, n * flat_size), stats):
        ready for ``append_units(model, h, w_in, w_out)``; ``stats`` is one dict per map
        with ``loss_before`` (with the earlier maps), ``best_reduction``,
        ``mean_random_reduction`` (mean over all candidates), ``ratio`` = best / mean
        random (NaN when the mean is <= 0), ``best_loss``, ``best_index`` and
        ``candidate_losses``.
    """
    _check_layer(model, h)
    if candidates < 1:
        raise NestError("feature-map growth needs at least one candidate.")
    if out_init not in ("random", "gradient"):
        raise NestError(f"unknown out_init {out_init!r}; use 'random' or 'gradient'.")
    was = model.training
    model.eval()
    n, dist = len(X), current()
    X, y = dist.shard(X, y)  # under torchrun: this rank's part; losses and gradients are summed
    try:
        with torch.no_grad():
            inputs, outputs = model.trace(X)
            x_h, u_next = inputs[h], outputs[h + 1]
            loss_of = lambda extra: _mean_loss(forward_from(model, h + 1, u_next + extra), y, n)
            total = torch.zeros_like(u_next)
            loss_before = _mean_loss(outputs[-1], y, n)
            ins, outs, stats = [], [], []
            if out_init == "gradient":
                a_out = _bounds(model, h, scale)[1]
                count = max(1, round(density * math.prod(_out_shape(model, h))))
            for _ in range(n_maps):
                cands, losses, extras = [], [], []
                delta = loss_gradient(model, h, u_next + total, y) if out_init == "gradient" else None
                if delta is not None and dist.active:  # this rank's mean -> its share of the whole mean
                    delta = delta * (len(y) / n)
                for _ in range(candidates):
                    w_in, w_out = random_feature_map(model, h, density, generator, scale)
                    post = new_map_output(model, h, x_h, w_in)
                    if delta is not None:
                        w_out = gradient_outgoing(model, h, post, delta, count, a_out)
                    extra = map_contribution(model, h, post, w_out)
                    cands.append((w_in, w_out))
                    losses.append(loss_of(total + extra))
                    extras.append(extra)
                best = min(range(candidates), key=losses.__getitem__)
                stats.append(_stats(loss_before, losses, best))
                ins.append(cands[best][0])
                outs.append(cands[best][1])
                total = total + extras[best]
                loss_before = losses[best]
    finally:
        model.train(was)
    return torch.cat(ins, 0), torch.cat(outs, 1), stats


def grow_feature_map(model, h: int, X: torch.Tensor, y: torch.Tensor, candidates: int, density: float,
                     generator: torch.Generator, scale="layer", out_init: str = "random"):
    """Policy 3 for one new feature map of hidden conv layer h (see :func:`grow_feature_maps`).

    Returns:
        (w_in (1, in_h, k, k), w_out (out, 1, k', k') or (out, flat_size), stats) with
        stats = {"loss_before", "best_reduction", "mean_random_reduction", "ratio",
        "best_loss", "best_index", "candidate_losses"}.
    """
    w_in, w_out, stats = grow_feature_maps(model, h, 1, X, y, candidates, density, generator, scale, out_init)
    return w_in, w_out, stats[0]
