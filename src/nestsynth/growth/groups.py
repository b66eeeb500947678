"""Unit growth on a coupled group of a :class:`~nestsynth.graph.SparseGraph`: Policy 2
(neurons, Algorithm 1) and Policy 3 (feature maps) generalized from a chain's hidden layer
to a group (:mod:`nestsynth.graph.units`).

In a chain a new unit of hidden layer h has one incoming row (layer h, reading x_h) and one
outgoing column (layer h + 1, whose output gradient is delta_{h+1}).  In a graph a new unit
of a coupled group (e.g. the channels of a residual stream) is one output row of *every
member* (each reading its own input x_j) and input columns of *every consumer* c (whose
output gradient is delta_c); :func:`nestsynth.graph.add_units` appends it everywhere at
once (batch-norm entries the identity), and :func:`nestsynth.graph.units.install_units`
writes its weights.  The generalizations:

* **Bridging gradient (Policy 2).**  Algorithm 1 bridges the pairs (neuron m after the
  layer, neuron n before it) with the largest |G[m, n]|, G = delta_{h+1}^T x_h / N the
  gradient of a direct connection n -> m.  For a group, "after" is every consumer's output
  and "before" every member's input: G is the block matrix
  ``G[(c, m), (j, n)] = sum_b delta_c[b, m] x_j[b, n] / N`` (rows: the consumers in graph
  order, columns: the members' inputs in group order), and Algorithm 1 runs on it
  unchanged (square-root rule, shared random signs, birth strength Eq. 7 relative to the
  mean |W*| of the members' and of the consumers' weights).  The bridged column pieces
  become the new unit's incoming rows in the members, the row pieces its outgoing columns
  in the consumers (a consumer that reads the group twice gets them in its first read).
  Only pairs whose path exists are bridged: member j's contribution to the unit reaches
  consumer c only when j is among the sources of the slice c reads (in a residual stream
  a consumer that reads the stream before a later member adds to it sees the unit without
  that member's part; a direct connection from that member's input to it would be a
  cycle), so the other blocks of G are zero and never chosen.
  For a one-member, one-consumer group this is exactly the chain's G.  G is computed
  right before each group grows (so units grown in an earlier group this step are among
  the inputs; the chain scans once per step and pads).
* **Candidate kernels (Policy 3).**  "Randomly generate sets of kernels, and pick the set
  that reduces L the most": a candidate for a group is one random sparse kernel set per
  member (its own input channels and kernel size) and one random sparse column block per
  consumer read (a k x k kernel per consumer output for a convolution, H*W columns per
  output for a Linear after a flatten).  The loss of each candidate is measured exactly on
  the network with the unit appended (written into its rows and columns; eval mode), so
  every path the unit takes -- through the residual sums, batch norms, activations and
  pooling -- is accounted for.  With ``out_init = "gradient"`` the candidate's outgoing
  weights are ``descent_weights`` of each consumer's exact dL/dw at the new columns
  (taken with the candidate's kernels and zero outgoing weights): the consumers' output
  gradients times what the new unit feeds them.
* Several units per step are added one after another, each chosen on the network with the
  earlier ones installed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import distributed
from ..graph.units import column_block, current, group_reads, install_units, member_indices
from ..sparse.conv import MaskedConv2d
from .conv import _EvalMode, weight_gradient
from .feature_maps import _mean_loss, _sparse_uniform, _stats, descent_weights, layer_bound
from .neurons import grow_neurons


def is_conv_group(model, group) -> bool:
    """Every member of the group is a convolution (it grows feature maps, Policy 3)."""
    return all(isinstance(model.layers[i], MaskedConv2d) for i in member_indices(model, group))


def is_linear_group(model, group) -> bool:
    """Every member and every consumer is a Linear layer (it grows neurons, Policy 2)."""
    layers = [model.layers[i] for i in member_indices(model, group)] + \
        [model.layers[i] for i, _ in group_reads(model, group)]
    return not any(isinstance(layer, MaskedConv2d) for layer in layers)


def _consumers(model, group) -> list[int]:
    """Consumer layer indices in graph order, each once, with the position of its first read."""
    return list(dict.fromkeys(i for i, _ in group_reads(model, group)))


def _batches(n: int, batch_size: int):
    for start in range(0, n, max(1, int(batch_size))):
        yield slice(start, start + batch_size)


def group_bridging_gradient(model, group, X: torch.Tensor, y: torch.Tensor, batch_size: int = 2048) -> torch.Tensor:
    """Algorithm 1's bridging gradient of a linear group (module docstring), eval mode.

    Returns:
        (sum of the consumers' outputs, sum of the members' inputs): rows consumer by
        consumer (graph order), columns member by member (group order).
    """
    members, consumers = member_indices(model, group), _consumers(model, group)
    layers = model.layers
    G = torch.zeros(sum(layers[c].out_features for c in consumers), sum(layers[j].in_features for j in members),
                    device=X.device)
    n = len(X)
    X, y = distributed.current().shard(X, y)  # under torchrun: this rank's part, G summed below
    with _EvalMode(model):
        for sl in _batches(len(X), batch_size):
            inputs, outputs = model.trace(X[sl])
            loss = F.cross_entropy(outputs[-1], y[sl], reduction="sum") / n
            deltas = torch.autograd.grad(loss, [outputs[c] for c in consumers])
            with torch.no_grad():
                G += torch.cat(deltas, 1).T @ torch.cat([inputs[j].detach() for j in members], 1)
    distributed.current().all_reduce_sum([G])
    return G * _reachable(model, group, members, consumers).to(G)


def _reachable(model, group, members: list[int], consumers: list[int]) -> torch.Tensor:
    """(rows of G, columns of G) 0/1: member j's part of a unit reaches consumer c (j is a
    source of a slice c reads)."""
    names, layers = model.layer_names, model.layers
    sources = {c: set() for c in consumers}
    for i, s in group_reads(model, group):
        sources[i].update(s.sources)
    rows = [torch.tensor([float(names[j] in sources[c]) for j in members for _ in range(layers[j].in_features)])
            .expand(layers[c].out_features, -1) for c in consumers]
    return torch.cat(rows, 0)


def _throwaway() -> torch.Generator:
    """add_units draws the new rows; they are overwritten at once, so the run's RNG is not used."""
    return torch.Generator().manual_seed(0)


def grow_group_neurons(model, group, count: int, X: torch.Tensor, y: torch.Tensor, beta: float, alpha: float,
                       generator: torch.Generator, sign: str = "descent", optimizer=None, warm: bool = False,
                       batch_size: int = 2048) -> int:
    """Policy 2 on a linear group: ``count`` new neurons bridging the largest |G| pairs.

    Returns:
        Neurons added (fewer than ``count`` when nothing is left to bridge).
    """
    G = group_bridging_gradient(model, group, X, y, batch_size)
    members, consumers = member_indices(model, group), _consumers(model, group)
    w_in_ref = torch.cat([model.effective_weight(j).flatten() for j in members])
    w_out_ref = torch.cat([model.effective_weight(c).flatten() for c in consumers])
    w_in, w_out = grow_neurons(G, count, beta, alpha, w_in_ref, w_out_ref, generator, sign)
    k = w_in.shape[0]
    if k == 0:
        return 0
    group = model.add_units(group, k, optimizer, _throwaway())
    units = torch.arange(group.units - k, group.units)
    rows, start = {}, 0
    for pos, j in enumerate(members):
        width = model.layers[j].in_features
        rows[pos] = w_in[:, start:start + width]
        start += width
    first_read = {}
    for pos, (i, _) in enumerate(group_reads(model, group)):
        first_read.setdefault(i, pos)
    cols, start = {}, 0
    for c in consumers:
        width = model.layers[c].out_features
        cols[first_read[c]] = w_out[start:start + width]
        start += width
    install_units(model, group, units, rows, cols, optimizer, warm)
    return k


@torch.no_grad()
def _write(model, group, units: torch.Tensor, rows: dict, cols: dict) -> None:
    """Write weights of ``units`` without touching masks (candidate evaluation)."""
    members, reads = member_indices(model, group), group_reads(model, group)
    for j, w in rows.items():
        layer = model.layers[members[j]]
        layer.weight.index_copy_(0, units.to(layer.weight.device), w.to(layer.weight))
    for k, w in cols.items():
        i, s = reads[k]
        layer = model.layers[i]
        layer.weight.index_copy_(1, s.indices(units).to(layer.weight.device), w.to(layer.weight))


@torch.no_grad()
def _loss(model, X: torch.Tensor, y: torch.Tensor, n: int) -> float:
    """Mean cross-entropy over the ``n`` examples of which (X, y) are this process's part."""
    with _EvalMode(model):
        return _mean_loss(model(X), y, n)


def _column_gradients(model, group, units: torch.Tensor, X: torch.Tensor, y: torch.Tensor, n: int) -> dict:
    """Read position -> dL/dw of the consumer at the columns of ``units`` (mean cross-entropy
    over the ``n`` examples of which (X, y) are this process's part, eval mode), shaped like
    :func:`column_block`."""
    reads = group_reads(model, group)
    consumers = list(dict.fromkeys(i for i, _ in reads))
    with _EvalMode(model), torch.enable_grad():
        inputs, outputs = model.trace(X)
        loss = F.cross_entropy(outputs[-1], y)
        if distributed.current().active:  # this rank's mean -> its share of the whole mean
            loss = loss * (len(y) / n)
        deltas = dict(zip(consumers, torch.autograd.grad(loss, [outputs[i] for i in consumers])))
    out = {}
    with torch.no_grad():
        full = {i: weight_gradient(model.layers[i], inputs[i].detach(), deltas[i]) for i in consumers}
        distributed.current().all_reduce_sum(list(full.values()))  # before the descent's top-k
        for k, (i, s) in enumerate(reads):
            out[k] = full[i].index_select(1, s.indices(units).to(full[i].device))
    return out


def grow_group_maps(model, group, n_maps: int, X: torch.Tensor, y: torch.Tensor, candidates: int,
                    density: float | None, generator: torch.Generator, scale="default", out_init: str = "gradient",
                    optimizer=None, warm: bool = False) -> list[dict]:
    """Policy 3 on a group: ``n_maps`` new units, each the best of ``candidates`` random
    kernel sets (module docstring), installed one after another.

    Args:
        density: share of active weights of a candidate's kernels and column blocks; None:
            each member's present mask density for its kernels (at least one weight per
            kernel set), the members' mean for the outgoing blocks.
        scale: the uniform bound of the random weights (:func:`layer_bound` of the member
            for its kernels, of the consumer for its block).
        out_init: "random" or "gradient" (outgoing weights along -dL/dw).

    Returns:
        One stats dict per unit (as :func:`nestsynth.growth.grow_feature_maps`).
    """
    stats = []
    n = len(X)
    X, y = distributed.current().shard(X, y)  # under torchrun: losses and gradients summed over ranks
    for _ in range(n_maps):
        group = current(model, group)
        members, reads = member_indices(model, group), group_reads(model, group)
        layers = model.layers
        dens_in = [density or max(float(layers[j].mask.mean()), 1.0 / layers[j].mask[0].numel()) for j in members]
        dens_out = density or sum(dens_in) / len(dens_in)
        a_in = [layer_bound(layers[j], scale) for j in members]
        a_out = [layer_bound(layers[i], scale) for i, _ in reads]
        group = model.add_units(group, 1, optimizer, _throwaway())
        unit = torch.tensor([group.units - 1])
        shapes = [tuple(column_block(layers[i], s, unit).shape) for i, s in reads]
        zeros = {k: torch.zeros(shape) for k, shape in enumerate(shapes)}
        loss_before = _loss(model, X, y, n)  # the new unit reads nothing yet: the model without it
        cands, losses = [], []
        for _ in range(candidates):
            rows = {p: _sparse_uniform((1, *layers[j].weight.shape[1:]), d, a, generator)
                    for p, (j, d, a) in enumerate(zip(members, dens_in, a_in))}
            cols = {k: _sparse_uniform(shape, dens_out, a, generator) for k, (shape, a) in enumerate(zip(shapes, a_out))}
            if out_init == "gradient":
                _write(model, group, unit, rows, zeros)
                grads = _column_gradients(model, group, unit, X, y, n)
                cols = {k: descent_weights(grads[k], max(1, round(dens_out * math.prod(shapes[k]))), a_out[k])
                        for k in range(len(reads))}
            _write(model, group, unit, rows, cols)
            cands.append((rows, cols))
            losses.append(_loss(model, X, y, n))
        best = min(range(candidates), key=losses.__getitem__)
        stats.append(_stats(loss_before, losses, best))
        install_units(model, group, unit, *cands[best], optimizer, warm)
    return stats
